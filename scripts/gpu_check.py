"""One prepared GPU check (issue 33): the GPU tests, the speed benchmarks against the plain loop, and
the default digits run, within one device call of under ten minutes.

    python scripts/gpu_check.py --out DIR [--size full|tiny] [--budget-s 540] [--only tests,bench,train|STEP,...]

``--size full`` is the card's check: ``pytest -m gpu`` on the card; ``python -m diffexp.bench`` for
``unet_base`` (35.7M, 3 x 32 x 32, bf16) at batch 128 and 512 and ``dit_b2`` at 32 x 32, each with the
defaults and with each speed option (compile, reduce-overhead CUDA graphs, channels-last, fused AdamW
off, EMA every step), every one beside the plain loop of the same run (img/s, MFU, host vs GPU ms per
phase); then the default digits run, timed, with its quality. ``--size tiny`` runs the same steps with
tiny models on whatever device there is, so the plan is debugged on a CPU before device minutes are spent.

Steps run in order of what the issue needs most; one that would not fit in what is left of
``--budget-s`` (by its own estimate) is skipped and said so, and each has its own time limit, so one
hang cannot take the rest. Writes ``DIR/gpu-check.json`` (every result, rewritten after each step),
``DIR/tests.log``, ``DIR/bench.log`` and ``DIR/train.log`` (what a device call brings back), and
prints a summary; the bench JSON files, Hydra folders and the run go to ``--work``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Step:
    """One command of the check: ``kind`` is tests, bench or train; ``estimate_s`` what it takes on the card."""

    name: str
    kind: str
    args: list[str]
    estimate_s: float
    limit_s: float
    result: dict = field(default_factory=dict)


# unet_base at the DDPM paper's CIFAR-10 shape, on the embedded digits (RGB, 32 px): nothing to download.
UNET_BASE = ["model=unet_base", "dataset.resolution=32", "dataset.channels=3", "trainer.mixed_precision=bf16"]
DIT_B2 = ["model=dit_b2", "dataset.resolution=32", "dataset.channels=3", "trainer.mixed_precision=bf16"]
BENCH_QUICK = ["bench.samplers=[]", "metric=none", "bench.data_batches=20"]
# What each speed option adds to a configuration's defaults (bench names each result by its key).
OPTIONS = {
    "default": [],
    "compile": ["trainer.compile=true"],
    "cudagraphs": ["trainer.compile=true", "trainer.compile_mode=reduce-overhead"],
    "channels_last": ["trainer.channels_last=true"],
    "unfused_adamw": ["trainer.fused_adamw=false"],
    "ema_every_step": ["trainer.ema.update_every=1"],
}


def plan(size: str) -> list[Step]:
    """The check's steps, most needed first."""
    if size == "tiny":  # the same steps on tiny models: a CPU runs them in a few minutes
        tests = ["-m", "gpu", "-q", "-x", "-p", "no:cacheprovider", "tests/test_gpu.py"]
        unet, dit = ["debug=tiny"], ["debug=tiny", "model=dit_xs2"]
        quick = BENCH_QUICK + ["bench.steps=2", "bench.repeats=1", "bench.profile_steps=2", "bench.data_batches=3"]
        batches, options = {"unet_base": [8], "dit_b2": [8]}, ["default", "compile"]
        compile_backend = ["trainer.compile_backend=aot_eager"]  # inductor's code generation takes minutes on 2 cores
        train = ["debug=tiny", "logger=none"]
    else:
        tests = ["-m", "gpu", "-q", "-p", "no:cacheprovider", "-n", "4", "--dist", "loadfile"]
        unet, dit = UNET_BASE, DIT_B2
        quick = BENCH_QUICK + ["bench.steps=20", "bench.repeats=2", "bench.profile_steps=5"]
        batches, options = {"unet_base": [128, 512], "dit_b2": [128]}, list(OPTIONS)
        compile_backend = []
        train = []  # the default run, as `make train` runs it

    def bench(model: str, batch: int, option: str) -> Step:
        compiled = option in ("compile", "cudagraphs")
        base = unet if model == "unet_base" else dit
        args = [*base, f"trainer.batch_size={batch}", *quick, *OPTIONS[option], *(compile_backend if compiled else [])]
        return Step(f"{model}-b{batch}-{option}", "bench", args, 75 if compiled else 30, 240 if compiled else 120)

    # Most needed first (the goal's numbers, the default run), the single speed options after, so a
    # short budget drops those first. A DiT has no convolutions for channels-last.
    first, second = batches["unet_base"][0], batches["unet_base"][-1]
    steps = [Step("tests", "tests", tests, 120, 240), bench("unet_base", first, "default"),
             bench("unet_base", first, "compile"), Step("digits-default", "train", train, 120, 300)]
    if second != first:
        steps += [bench("unet_base", second, "default"), bench("unet_base", second, "compile")]
    steps += [bench("dit_b2", batches["dit_b2"][0], o) for o in ("default", "compile")]
    steps += [bench("unet_base", first, o) for o in options if o not in ("default", "compile")]
    steps += [bench("dit_b2", batches["dit_b2"][0], o) for o in options if o in ("cudagraphs", "unfused_adamw")]
    return steps


def run_step(step: Step, out: Path, work: Path, env: dict) -> None:
    """Run one step, filling ``step.result`` (never raises for the step's own failure). Logs go to
    ``out``, everything else a step writes (bench JSON, Hydra folders, the run) to ``work``."""
    start = time.perf_counter()
    if step.kind == "tests":
        cmd = [sys.executable, "-m", "pytest", *step.args]
        log = out / "tests.log"
    elif step.kind == "bench":
        json_out = work / "bench" / f"{step.name}.json"
        cmd = [sys.executable, "-m", "diffexp.bench", *step.args, f"bench.out={json_out}",
               f"hydra.run.dir={work / 'hydra' / step.name}"]
        log = out / "bench.log"
    else:
        run_dir = work / "digits-run"
        cmd = [sys.executable, "-m", "diffexp.train", *step.args, f"hydra.run.dir={run_dir}"]
        log = out / "train.log"
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=step.limit_s)
        code, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        code = "timeout"
        text = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
    seconds = time.perf_counter() - start
    with log.open("a") as f:
        f.write(f"\n===== {step.name}: {' '.join(cmd[2:])}\n{text}\n===== exit {code} after {seconds:.0f} s\n")
    step.result = {"exit": code, "seconds": round(seconds, 1), "last_line": text.strip().splitlines()[-1:] or [""]}
    if code == 0 and step.kind == "bench":
        step.result.update(bench_summary(json.loads(json_out.read_text())))
    elif code == 0 and step.kind == "train":
        step.result.update(train_summary(run_dir))
    elif step.kind == "tests":
        step.result["summary"] = next((line for line in reversed(text.splitlines()) if " in " in line), "")


def bench_summary(result: dict) -> dict:
    """What the check reports of one ``diffexp.bench`` result."""
    t, f = result["train"], result["flops"]
    return {"full": result, "ours_img_per_s": t["ours_img_per_s"]["median"], "plain_img_per_s": t["plain_img_per_s"]["median"],
            "ratio": t["ratio"]["median"], "mfu": f["fraction_of_peak"],
            "of_measured_bf16_matmul": f.get("fraction_of_matmul_bf16"), "gflop_per_img": f["train_per_image"] / 1e9,
            "ms_per_step": {name: {k: round(v, 2) for k, v in row.items() if k.endswith("_ms")}
                            for name, row in result["breakdown_ms_per_step"].items()},
            "syncs_per_step": t["host_device_syncs_per_step"], "peak_memory_mib": result["peak_memory_mib"],
            "device": result["device"], "config": result["config"]}


def train_summary(run_dir: Path) -> dict:
    """The default run's wall time, speed and last quality numbers (from its run.json and metrics.jsonl)."""
    info = json.loads((run_dir / "run.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = {k: v for row in rows for k, v in row.items() if k.startswith(("eval/", "train/loss", "train/img_per_s"))}
    return {"device": info.get("device"), "status": info.get("status"), "loop_s": info.get("loop_seconds"),
            "eval_s": info.get("eval_seconds"), "last": last}


def machine() -> dict:
    """The card, the driver and the library versions."""
    import torch

    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True) if torch.cuda.is_available() else None
    return {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "nvidia_smi": smi.stdout.strip() if smi else None, "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": sys.version.split()[0], "cpu_count": os.cpu_count()}


def summary_lines(steps: list[Step]) -> list[str]:
    lines = [f"{'step':<30}{'exit':>8}{'s':>6}  result"]
    for s in steps:
        r = s.result
        if not r:
            continue
        if s.kind == "bench" and r.get("exit") == 0:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
            what = f"ours {r['ours_img_per_s']:.0f} img/s, plain {r['plain_img_per_s']:.0f}, ratio {r['ratio']:.2f}, MFU {mfu}"
        elif s.kind == "train" and r.get("exit") == 0:
            shown = {k: v for k, v in r["last"].items() if k.startswith(("eval/fd_", "train/"))}
            what = f"loop {r['loop_s']:.0f} s (eval {r['eval_s'] or 0:.0f} s), " + ", ".join(
                f"{k} {v:.4g}" for k, v in sorted(shown.items()))
        else:
            what = r.get("summary") or r.get("skipped") or " ".join(r.get("last_line", []))
        lines.append(f"{s.name:<30}{str(r.get('exit', '-')):>8}{r.get('seconds', 0):>6.0f}  {what}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="gpu-check.json and the logs (four files)")
    parser.add_argument("--work", type=Path, default=None, help="scratch: bench JSON, Hydra folders, the run "
                        "(default: OUT/../gpu-check-work)")
    parser.add_argument("--size", choices=["full", "tiny"], default="full")
    parser.add_argument("--budget-s", type=float, default=540.0)
    parser.add_argument("--only", default="tests,bench,train",
                        help="comma-separated kinds (tests, bench, train) or names of steps to run (a second "
                             "call runs what the first call's budget skipped)")
    a = parser.parse_args()
    out = a.out.resolve()
    work = (a.work or out.parent / "gpu-check-work").resolve()
    out.mkdir(parents=True, exist_ok=True)
    (work / "bench").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "WANDB_MODE": "offline",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "DIFFEXP_CACHE": str(work / "cache")}
    wanted = set(a.only.split(","))
    steps = [s for s in plan(a.size) if s.kind in wanted or s.name in wanted]
    report = {"size": a.size, "machine": machine(), "steps": {}}
    deadline = time.perf_counter() + a.budget_s
    for step in steps:
        left = deadline - time.perf_counter()
        if step.estimate_s > left:
            step.result = {"exit": "skipped", "skipped": f"needs ~{step.estimate_s:.0f} s, {left:.0f} s left"}
        else:
            step.limit_s = min(step.limit_s, max(left, 1))
            print(f"[{time.strftime('%H:%M:%S')}] {step.name} ...", flush=True)
            run_step(step, out, work, env)
        report["steps"][step.name] = {"args": step.args, **step.result}
        (out / "gpu-check.json").write_text(json.dumps(report, indent=2))
    print("\n".join(summary_lines(steps)))
    print(f"wrote {out / 'gpu-check.json'}")


if __name__ == "__main__":
    main()
