"""Which diffexp modules are handed the whole composed config (a DictConfig with trainer, model and
dataset at its top) while `python -m diffexp.train` runs a tiny training in-process.

    python scripts/config_trace.py [overrides]
"""
import sys
import tempfile
from pathlib import Path

from omegaconf import DictConfig

seen: dict[str, set[str]] = {}


def whole(value) -> bool:
    return isinstance(value, DictConfig) and all(k in value for k in ("trainer", "model", "dataset"))


def profile(frame, event, arg):
    if event != "call":
        return
    module = frame.f_globals.get("__name__", "")
    if not module.startswith("diffexp"):
        return
    code = frame.f_code
    for name in code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]:
        try:
            if whole(frame.f_locals.get(name)):
                seen.setdefault(module, set()).add(code.co_name)
        except Exception:
            pass


sys.setprofile(profile)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import compose_config  # noqa: E402  (the tests compose commands in-process)

from diffexp.train import run  # noqa: E402

out = tempfile.mkdtemp()
cfg = compose_config(["debug=tiny", "logger=none", f"output_root={out}", "trainer.eval_every=4",
                      "metric.num_samples=8", "metric.batch_size=8", "metric.num_real=16", *sys.argv[1:]])
profile(type("F", (), {"f_globals": {"__name__": "diffexp.train"}, "f_code": run.__code__, "f_locals": {"cfg": cfg}})(), "call", None)
run(cfg, f"{out}/run")
sys.setprofile(None)
for m in sorted(seen):
    print(f"{m:35s} {', '.join(sorted(seen[m]))}")
print(f"{len(seen)} modules are handed the whole config")
