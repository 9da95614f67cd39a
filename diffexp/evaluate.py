"""``python -m diffexp.evaluate run=RUN_DIR [overrides]``: FID/IS/KID of a finished run.

Examples::

    python -m diffexp.evaluate run=outputs/2026-11-26/10-00-00_unet_small-linear-s0          # 50k, DDIM 50
    python -m diffexp.evaluate run=RUN_DIR metric=fid_is_kid metric.num_samples=10000 sampler=ddpm sampler.steps=1000
    accelerate launch -m diffexp.evaluate run=RUN_DIR                                          # several GPUs

Writes ``RUN_DIR/eval.json`` and prints the same result as JSON on its last stdout line.
"""

from __future__ import annotations

import json
import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from diffexp.cli import CONFIG_PATH, report_errors
from diffexp.records import RunDir, now, write_json_atomic
from diffexp.tracking import add_to_wandb_summary

log = logging.getLogger("diffexp.evaluate")


def evaluate(cfg: DictConfig) -> dict | None:
    """Evaluate the EMA pipeline of ``cfg.run``; the main process writes eval.json and gets the result (others None)."""
    from accelerate import Accelerator

    from diffexp.build import build_sampler
    from diffexp.data import load_images
    from diffexp.evaluation import build_evaluator

    run = RunDir(cfg.run).require()
    run_cfg = run.config()
    accelerator = Accelerator()
    pipe = run.pipeline()
    unet = pipe.unet.to(accelerator.device).eval().requires_grad_(False)
    sampler = build_sampler(cfg.sampler, run_cfg.scheduler)
    with accelerator.main_process_first():
        real = load_images(run_cfg.dataset, cfg.cache_dir)
    evaluator = build_evaluator(cfg, accelerator, real, run_cfg.dataset)
    scores = evaluator(unet, sampler, cfg.sampler.steps)  # sampling and Inception run in inference mode
    choices = HydraConfig.get().runtime.choices
    result = {**scores, "metric": choices.get("metric"), "num_samples": int(cfg.metric.num_samples),
              "num_real": evaluator.num_real,
              "sampler": choices.get("sampler"), "sampler_steps": int(cfg.sampler.steps), "seed": int(cfg.metric.seed),
              "num_processes": accelerator.num_processes, "at": now()}
    if accelerator.is_main_process:
        write_json_atomic(run.eval_file, result)
        if cfg.wandb:
            add_to_wandb_summary(run, result)
    main_process = accelerator.is_main_process
    accelerator.end_training()
    return result if main_process else None


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with report_errors():
        result = evaluate(cfg)
    if result is not None:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
