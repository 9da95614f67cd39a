"""How BENCHMARKS.md's "Post-hoc EMA" table was measured: digits FD of a run trained with
``trainer.ema.kind=ema+phema``, at optimizer step STEP, for the default EMA (the checkpoint's, or
``model/`` at the last step) and for post-hoc EMA widths reconstructed from the snapshots, each over
several sampling seeds (``metric.seed``), in one process (one set of reference statistics).

    python scripts/phema_quality.py RUN_DIR STEP 0.03,0.05,0.07,0.1,0.15 0,1,2

Prints one JSON line per (setting, seed) and a summary (mean and spread over seeds) per setting.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
from accelerate import Accelerator
from hydra import compose, initialize_config_dir

from diffexp.config import CONFIG_PATH
from diffexp.data.datasets import load_images
from diffexp.models.build import build_model, build_sampler
from diffexp.quality.evaluator import Evaluator, resolve_metric
from diffexp.records.rundir import RunDir
from diffexp.sampling.generate import choose_sampler
from diffexp.training import phema
from diffexp.training.checkpoints import EMA_FILE


def default_ema(run: RunDir, step: int) -> dict:
    """The default EMA's weights at ``step`` (its checkpoint's EMA_FILE)."""
    return torch.load(run.find_checkpoint(step) / EMA_FILE, map_location="cpu", weights_only=True)["weights"]


def main(run_dir: str, step: int, stds: list[float], seeds: list[int]) -> None:
    run = RunDir(run_dir)
    cfg = run.config()
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        eval_cfg = compose("evaluate", overrides=[f"run={run_dir}"])
    accelerator = Accelerator()
    sampler_cfg, steps = choose_sampler(None, cfg)
    sampler = build_sampler(sampler_cfg, cfg.scheduler, latent=False)
    real = load_images(cfg.dataset, eval_cfg.cache_dir)
    model = build_model(cfg.model, channels=cfg.dataset.channels, size=cfg.dataset.resolution, num_classes=None)
    base = default_ema(run, step)
    settings = [("ema", None)] + [(f"phema {s:g}", s) for s in stds]
    summary = {}
    for name, std in settings:
        model.load_state_dict(base)
        if std is not None:
            phema.load_weights(model, phema.reconstruct(run, std, step))
        model.eval().requires_grad_(False)
        fds = []
        for seed in seeds:
            metric_cfg = resolve_metric(eval_cfg.metric, cfg.dataset)
            metric_cfg.seed = seed
            evaluator = Evaluator(metric_cfg, accelerator, real, cfg.dataset, eval_cfg.cache_dir)
            start = time.perf_counter()
            scores = evaluator(model, sampler, steps, vae=None, num_classes=None, guidance_scale=1.0)
            fd = next(v for k, v in scores.items() if k.startswith("eval/fd_digits_") and "balanced" not in k)
            fds.append(fd)
            print(json.dumps({"setting": name, "step": step, "seed": seed, "fd": fd,
                              "seconds": round(time.perf_counter() - start, 1)}), flush=True)
        summary[name] = (statistics.mean(fds), min(fds), max(fds))
    for name, (mean, lo, hi) in summary.items():
        print(f"{name:12s} FD mean {mean:.3f} (min {lo:.3f}, max {hi:.3f}) over seeds {seeds}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), [float(s) for s in sys.argv[3].split(",")],
         [int(s) for s in sys.argv[4].split(",")])
