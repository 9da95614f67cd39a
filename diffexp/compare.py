"""``python -m diffexp.compare RUN_DIR_OR_SWEEP_DIR... [by=model,scheduler] [out=DIR]``: compare runs.

Writes ``report.md``, ``report.html``, ``summary.json`` and PNG plots (loss and FID curves per
group, the last sample grid of every run) into ``out`` (default: ``compare/`` inside the one
folder given, else ``outputs/compare/DATE_TIME``). Rows are grouped by the ``by`` axes (a config
group such as ``model``, or any config key such as ``scheduler.prediction_type``; default: the
axes in which the runs differ, seeds aside); each group gets mean ± 95% confidence interval over
its runs (Student t). Runs that differ in anything else (dataset, steps, metric sample count, ...)
are reported, since that makes the comparison unfair.

``source=wandb project=ENTITY/PROJECT [sweep=ID]`` reads the runs from W&B instead, when W&B is
reachable.
"""

from __future__ import annotations

import html
import json
import math
import shutil
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from diffexp import DiffexpError
from diffexp.cli import report_errors
from diffexp.records import iter_runs, wandb_runs

OPTIONS = ("by", "out", "source", "project", "sweep")
# Keys that never make runs incomparable: where they were written, what they were called, seeds.
IGNORED = ("name", "seed", "group", "resume", "cache_dir", "output_root", "hydra", "choices.debug")
SCALARS = ("num_parameters", "steps", "wall_time_s", "img_per_s", "final_loss")


def parse_args(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """(run or sweep paths, options) from ``PATH... key=value...``."""
    paths, options = [], {}
    for a in argv:
        key = a.split("=", 1)[0]
        if "=" in a and key in OPTIONS:
            options[key] = a.split("=", 1)[1]
        elif "=" in a and not Path(a).exists():
            raise DiffexpError(f"{a}: unknown option (expected one of {', '.join(OPTIONS)}) and not a path")
        else:
            paths.append(a)
    return paths, options


def axis_value(cfg, axis: str) -> Any:
    """A run's value on a comparison axis: its chosen option of a config group, else the config key."""
    choice = OmegaConf.select(cfg, f"choices.{axis}")
    if choice is not None:
        return choice
    value = OmegaConf.select(cfg, axis, default="(missing)")
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def flat_config(cfg) -> dict[str, Any]:
    """``{"trainer.lr": 0.001, ...}`` for every leaf of a config."""
    out = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return out


def duration_s(info: dict[str, Any]) -> float | None:
    try:
        return (datetime.fromisoformat(info["end"]) - datetime.fromisoformat(info["start"])).total_seconds()
    except (KeyError, TypeError, ValueError):
        return None


def summarize(run) -> dict[str, Any]:
    """One table row for a run: its config, size, progress, speed, final loss, best/final metrics."""
    cfg, info, rows = run.config(), run.info(), run.metrics()
    train_rows = [r for r in rows if "train/loss" in r]
    speeds = [r["train/img_per_s"] for r in train_rows if "train/img_per_s" in r]
    out = {
        "run": str(run.path), "name": cfg.get("name"), "status": info.get("status"),
        "num_parameters": info.get("num_parameters"),
        "steps": max((r["step"] for r in rows), default=0),
        "wall_time_s": duration_s(info) if duration_s(info) is not None else info.get("wall_time_s"),
        "img_per_s": sum(speeds) / len(speeds) if speeds else None,
        "final_loss": train_rows[-1]["train/loss"] if train_rows else None,
    }
    for key in sorted({k for r in rows for k in r if k.startswith("eval/")}):
        values = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
        lower_is_better = not key.startswith("eval/is")
        best = min(v for _, v in values) if lower_is_better else max(v for _, v in values)
        out[f"final {key}"], out[f"best {key}"] = values[-1][1], best
    return out


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """Mean and half-width of the 95% Student-t interval (None for fewer than two values)."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    sem = stats.sem(values)
    return mean, float(sem * stats.t.ppf(0.975, n - 1))


def default_axes(configs: list) -> list[str]:
    """The config groups whose chosen option differs between runs (``model``, ``scheduler``, ...)."""
    choices = [OmegaConf.to_container(c.get("choices") or {}) for c in configs]
    keys = sorted({k for c in choices for k in c if k not in ("debug",)})
    varying = [k for k in keys if len({str(c.get(k)) for c in choices}) > 1]
    return varying or ["group"]


def mismatches(configs: list, axes: list[str], summaries: list[dict]) -> list[str]:
    """One line per config key (other than the compared axes) on which the runs disagree."""
    flats = [flat_config(c) for c in configs]
    # A group compared by its option (model=...) may differ in all of its keys.
    covered = [a for a in axes] + [f"choices.{a}" for a in axes]
    keys = sorted({k for f in flats for k in f})
    lines = []
    for key in keys:
        if any(key == c or key.startswith(c + ".") for c in covered) or any(
                key == i or key.startswith(i + ".") for i in IGNORED):
            continue
        values = sorted({json.dumps(f.get(key, "(missing)"), default=str) for f in flats})
        if len(values) > 1:
            lines.append(f"runs differ in {key} besides by={','.join(axes)}: {', '.join(values)}")
    steps = sorted({s["steps"] for s in summaries})
    if len(steps) > 1:
        lines.append(f"runs reached different steps: {', '.join(map(str, steps))}")
    return lines


def group_rows(summaries: list[dict], keys: list[tuple]) -> list[dict]:
    """Per distinct axis tuple: n and mean ± CI of every numeric column."""
    columns = [c for c in summaries[0] if c in SCALARS or c.startswith(("final eval/", "best eval/"))]
    columns = sorted({c for s in summaries for c in s if c in columns or c.startswith(("final eval/", "best eval/"))},
                     key=lambda c: (c not in SCALARS, SCALARS.index(c) if c in SCALARS else c))
    groups = []
    for key in dict.fromkeys(keys):
        members = [s for s, k in zip(summaries, keys) if k == key]
        row = {"axes": list(key), "n": len(members), "runs": [m["name"] for m in members]}
        for c in columns:
            values = [m[c] for m in members if isinstance(m.get(c), (int, float))]
            if values:
                mean, half = mean_ci(values)
                row[c] = {"mean": mean, "ci95": half, "n": len(values)}
        groups.append(row)
    return groups


def fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() and abs(v) < 1e15 else f"{v:.4g}"
    return str(v)


def fmt_ci(cell: dict | None) -> str:
    if not cell:
        return "–"
    return fmt(cell["mean"]) if cell["ci95"] is None else f"{fmt(cell['mean'])} ± {fmt(cell['ci95'])}"


def plot_curves(runs, keys, axes, metric_prefix: str, ylabel: str, path: Path) -> bool:
    """Mean curve per group (thin lines: its runs) of the first metric starting with ``metric_prefix``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for run, key in zip(runs, keys):
        rows = run.metrics()
        names = sorted({k for r in rows for k in r if k.startswith(metric_prefix)})
        if not names:
            continue
        points = [(r["step"], r[names[0]]) for r in rows if r.get(names[0]) is not None]
        series.setdefault(key, []).append((names[0], points))
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (key, members) in enumerate(series.items()):
        color = f"C{i % 10}"
        by_step: dict[int, list[float]] = {}
        for _, points in members:
            ax.plot(*zip(*points), color=color, alpha=0.25, linewidth=0.8)
            for step, v in points:
                by_step.setdefault(step, []).append(v)
        steps = sorted(by_step)
        ax.plot(steps, [sum(by_step[s]) / len(by_step[s]) for s in steps], color=color, linewidth=2,
                label=f"{', '.join(f'{a}={v}' for a, v in zip(axes, key))} (n={len(members)})")
    ax.set_xlabel("step")
    ax.set_ylabel(members[0][0] if ylabel is None else ylabel)
    if metric_prefix == "train/loss":
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_grids(runs, names: list[str], path: Path) -> bool:
    """The last sample grid of every run, side by side, titled with the run's name and step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    grids = [(n, r.sample_grids()[-1]) for r, n in zip(runs, names) if r.sample_grids()]
    if not grids:
        return False
    cols = min(4, len(grids))
    nrows = math.ceil(len(grids) / cols)
    fig, axs = plt.subplots(nrows, cols, figsize=(3 * cols, 3.6 * nrows), squeeze=False)
    for ax in axs.flat:
        ax.axis("off")
    for ax, (name, grid) in zip(axs.flat, grids):
        ax.imshow(Image.open(grid), cmap="gray")
        ax.set_title(f"{name}\n{grid.stem}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_report(runs, axes: list[str] | None, out: Path) -> dict[str, Any]:
    """Write the report files into ``out``; returns the summary (also in ``summary.json``)."""
    runs = list(runs)
    configs = [r.config() for r in runs]
    axes = axes or default_axes(configs)
    summaries = [summarize(r) for r in runs]
    for s, c in zip(summaries, configs):
        s["axes"] = {a: axis_value(c, a) for a in axes}
        s["seed"] = c.get("seed")
    keys = [tuple(str(s["axes"][a]) for a in axes) for s in summaries]
    warnings = mismatches(configs, axes, summaries)
    groups = group_rows(summaries, keys)
    out.mkdir(parents=True, exist_ok=True)
    plots = {
        "loss": plot_curves(runs, keys, axes, "train/loss", "train/loss", out / "loss.png"),
        "fid": plot_curves(runs, keys, axes, "eval/fid", None, out / "fid.png"),
        "grids": plot_grids(runs, [s["name"] for s in summaries], out / "grids.png"),
    }
    summary = {"axes": axes, "runs": summaries, "groups": groups, "warnings": warnings,
               "plots": [f"{k}.png" for k, ok in plots.items() if ok]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")

    metric_cols = sorted({c for s in summaries for c in s if c.startswith(("final eval/", "best eval/"))})
    run_header = ["run", *axes, "seed", "parameters", "steps", "wall time (s)", "images/s", "final loss", *metric_cols]
    run_rows = [[s["name"], *(fmt(s["axes"][a]) for a in axes), fmt(s["seed"]), fmt(s["num_parameters"]),
                 fmt(s["steps"]), fmt(s["wall_time_s"]), fmt(s["img_per_s"]), fmt(s["final_loss"]),
                 *(fmt(s.get(c)) for c in metric_cols)] for s in summaries]
    group_cols = [c for c in ("num_parameters", "steps", "wall_time_s", "img_per_s", "final_loss", *metric_cols)
                  if any(c in g for g in groups)]
    group_header = [*axes, "n", *(c.replace("_", " ") for c in group_cols)]
    group_table = [[*g["axes"], str(g["n"]), *(fmt_ci(g.get(c)) for c in group_cols)] for g in groups]

    md = [f"# Comparison of {len(runs)} runs by {', '.join(axes)}", ""]
    md += [f"> warning: {w}" for w in warnings] + ([""] if warnings else [])
    md += ["## Groups (mean ± 95% CI over runs, Student t)", "", markdown_table(group_header, group_table), "",
           "## Runs", "", markdown_table(run_header, run_rows), ""]
    titles = {"loss": "Training loss", "fid": "FID", "grids": "Last sample grids"}
    for name, ok in plots.items():
        if ok:
            md += [f"## {titles[name]}", "", f"![{titles[name]}]({name}.png)", ""]
    (out / "report.md").write_text("\n".join(md))
    (out / "report.html").write_text(to_html(md_title=md[0][2:], warnings=warnings, tables=[
        ("Groups (mean ± 95% CI over runs, Student t)", group_header, group_table),
        ("Runs", run_header, run_rows)], plots=[(titles[k], f"{k}.png") for k, ok in plots.items() if ok]))
    return summary


def to_html(md_title: str, warnings: list[str], tables, plots) -> str:
    e = html.escape
    parts = [f"<!doctype html><meta charset='utf-8'><title>{e(md_title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}.warn{color:#a40}</style>",
             f"<h1>{e(md_title)}</h1>"]
    parts += [f"<p class='warn'>warning: {e(w)}</p>" for w in warnings]
    for title, header, rows in tables:
        parts.append(f"<h2>{e(title)}</h2><table><tr>{''.join(f'<th>{e(h)}</th>' for h in header)}</tr>")
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    parts += [f"<h2>{e(t)}</h2><img src='{e(src)}' alt='{e(t)}'>" for t, src in plots]
    return "\n".join(parts) + "\n"


def default_out(paths: list[str]) -> Path:
    if len(paths) == 1 and Path(paths[0]).is_dir():
        return Path(paths[0]) / "compare"
    return Path("outputs") / "compare" / f"{datetime.now():%Y-%m-%d_%H-%M-%S}"


def main(argv: list[str] | None = None) -> None:
    """Read the runs, print the warnings and where the report went."""
    with report_errors():
        paths, options = parse_args(sys.argv[1:] if argv is None else argv)
        axes = [a for a in options.get("by", "").split(",") if a] or None
        if options.get("source", "dirs") == "wandb":
            if not options.get("project"):
                raise DiffexpError("source=wandb needs project=ENTITY/PROJECT (and optionally sweep=ID)")
            runs = list(wandb_runs(options["project"], options.get("sweep")))
            out = Path(options.get("out") or default_out([]))
        elif options.get("source", "dirs") != "dirs":
            raise DiffexpError(f"source={options['source']}: expected dirs or wandb")
        else:
            if not paths:
                raise DiffexpError("usage: python -m diffexp.compare RUN_OR_SWEEP_DIR... [by=model,scheduler] [out=DIR]")
            runs = list(iter_runs(paths))
            out = Path(options.get("out") or default_out(paths))
        if out.exists() and (out / "summary.json").exists():
            shutil.rmtree(out)  # a previous report of the same runs: replace it whole
        summary = write_report(runs, axes, out)
    for w in summary["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    print(f"compared {len(summary['runs'])} runs in {len(summary['groups'])} groups by {','.join(summary['axes'])}: "
          f"{out / 'report.md'} (and report.html)")


if __name__ == "__main__":
    main()
