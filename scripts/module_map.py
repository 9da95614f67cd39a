"""Module map of a diffexp tree: modules, lines, intra-package imports (lazy ones too), circles, depth.

    python scripts/module_map.py .  [-v]     # -v: every module, its lines and what it imports
"""
import ast
import sys
from pathlib import Path

root = Path(sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] != "-v" else ".")
pkg = root / "diffexp"
mods = {}
for f in sorted(pkg.rglob("*.py")):
    name = ".".join(f.relative_to(root).with_suffix("").parts)
    name = name.removesuffix(".__init__")
    mods[name] = f
edges = {m: set() for m in mods}
for m, f in mods.items():
    tree = ast.parse(f.read_text())
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("diffexp"):
            base = node.module
            for a in node.names:
                targets.append(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base)
        elif isinstance(node, ast.Import):
            targets += [a.name for a in node.names if a.name.startswith("diffexp")]
        for t in targets:
            while t not in mods and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in mods and t != m and t != "diffexp":
                edges[m].add(t)
# cycles: Tarjan
index, low, stack, on, sccs, i = {}, {}, [], set(), [], [0]
sys.setrecursionlimit(10000)
def strong(v):
    index[v] = low[v] = i[0]; i[0] += 1; stack.append(v); on.add(v)
    for w in edges[v]:
        if w not in index:
            strong(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v: break
        sccs.append(comp)
for v in mods:
    if v not in index:
        strong(v)
circles = [c for c in sccs if len(c) > 1]
depth = {}
def d(v, seen=()):
    if v in depth: return depth[v]
    if v in seen: return 0
    r = 1 + max((d(w, seen + (v,)) for w in edges[v]), default=0)
    depth[v] = r
    return r
lines = {m: len(f.read_text().splitlines()) for m, f in mods.items()}
code_mods = [m for m in mods if lines[m] > 0 and not (mods[m].name == "__init__.py" and lines[m] == 0)]
nonempty = [m for m in mods if lines[m] > 0]
print(f"modules (non-empty .py): {len(nonempty)}, lines: {sum(lines.values())}, top-level modules in diffexp/: "
      f"{sum(1 for m in nonempty if m.count('.') == 1)}")
print(f"import circles: {len(circles)} {circles}")
print(f"import depth (longest chain of modules): {max(d(m) for m in mods)}")
print(f"largest: {sorted(((lines[m], m) for m in mods), reverse=True)[:5]}")
if "-v" in sys.argv:
    for m in sorted(mods):
        print(f"  {m:40s} {lines[m]:5d}  -> {', '.join(sorted(edges[m]))}")
