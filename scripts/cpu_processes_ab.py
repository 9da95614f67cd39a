"""One training process of all the cores' threads against one CPU process per core of one thread each.

The default run's command both ways, alternating, each a whole ``python -m diffexp.train`` (the
second through ``accelerate launch --multi_gpu --num_processes N --num_cpu_threads_per_process 1``
with ``ACCELERATE_USE_CPU=true``; the global batch is split over the processes, the losses are the
same, docs/scaling-out.md), no evaluation, sampling, checkpoints or tracking. Reads each run's
``train/img_per_s`` (global images per second) from its ``metrics.jsonl``, leaving out the first
log interval (start-up), and measures the machine's fp32 matrix-product rate before each repeat
(``diffexp.bench.matmul_rate``), since a VM's speed drifts; the share of it is the model's training
FLOPs per image (``diffexp.bench.model_flops``, of the model the run's ``config.yaml`` names) times img/s.

    python scripts/cpu_processes_ab.py [repeats] [steps] [out_dir]

Run it alone on the machine: two arms that share the cores measure the sharing.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from diffexp.bench import matmul_rate, model_flops
from diffexp.models.build import build_model


def flops_per_image(run_dir: Path) -> float:
    """Training FLOPs (forward + backward) per image of the model ``run_dir`` trained."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    n, c, r = 8, cfg.dataset.channels, cfg.dataset.resolution
    return model_flops(build_model(cfg.model).train(), torch.randn(n, c, r, r),
                       torch.randint(0, 1000, (n,)))["train_per_image"]


def train(arm: str, run_dir: Path, steps: int, cores: int) -> tuple[float, float]:
    """(median img/s after the first log interval, the process's wall seconds) of one run."""
    args = ["logger=none", "metric=none", f"trainer.max_steps={steps}", "trainer.sample_every=0",
            "trainer.checkpoint_every=0", "trainer.eval_every=0", "trainer.log_every=50", f"hydra.run.dir={run_dir}"]
    env = dict(os.environ)
    if arm == "one":
        env["OMP_NUM_THREADS"] = str(cores)
        cmd = [sys.executable, "-m", "diffexp.train", *args]
    else:
        env["ACCELERATE_USE_CPU"] = "true"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(cores),
               "--num_cpu_threads_per_process", "1", "-m", "diffexp.train", *args]
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{arm}: {' '.join(cmd)} exited {proc.returncode}\n{proc.stderr[-3000:]}")
    rates = [row["train/img_per_s"] for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "train/img_per_s" in row]
    return statistics.median(rates[1:]), wall


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 250
    out = Path(sys.argv[3] if len(sys.argv) > 3 else "outputs/cpu_processes_ab")
    cores = os.cpu_count() or 1
    rates: dict[str, list[float]] = {"one": [], "per_core": []}
    per_image = None
    for r in range(repeats):
        mm = matmul_rate(torch.device("cpu"), torch.float32, 2048)
        print(f"repeat {r}: fp32 matmul 2048^2 {mm / 1e9:.1f} GFLOP/s", flush=True)
        for arm in (("one", "per_core") if r % 2 == 0 else ("per_core", "one")):
            rate, wall = train(arm, out / f"{arm}-{r}", steps, cores)
            rates[arm].append(rate)
            per_image = per_image or flops_per_image(out / f"{arm}-{r}")
            print(f"  {arm:8s} {rate:6.1f} img/s ({100 * rate * per_image / mm:.0f}% of the matmul rate), "
                  f"process {wall:.0f} s", flush=True)
    ratios = [b / a for a, b in zip(rates["one"], rates["per_core"])]
    print(f"one process of {cores} threads: median {statistics.median(rates['one']):.1f} img/s; {cores} processes "
          f"of 1 thread: {statistics.median(rates['per_core']):.1f}; ratio median {statistics.median(ratios):.3f} "
          f"({min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
