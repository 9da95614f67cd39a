"""``python -m diffexp.train [overrides]``: train a diffusion model from the composed config.

Examples::

    python -m diffexp.train                                   # unet_small on digits, CPU, minutes
    python -m diffexp.train model=unet_tiny trainer.max_steps=200
    python -m diffexp.train resume=outputs/2026-11-26/10-00-00_unet_small-linear-s0
    python -m diffexp.train -m scheduler=linear,cosine seed=0,1
    python -m diffexp.train --cfg job                         # print the composed config
"""

from __future__ import annotations

import signal
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from diffexp.cli import CONFIG_PATH, apply_overrides, record_choices, report_errors
from diffexp.records import RunDir


def resume_config(resume: str) -> DictConfig:
    """The saved config of run ``resume`` with this command's value overrides applied.

    Group overrides (``model=...``) would change what is being resumed and are refused.
    """
    run = RunDir(resume).require()
    cfg = apply_overrides(run.config(), skip=("resume",))
    cfg.resume = str(run.path)
    return cfg


def run(cfg: DictConfig, run_dir: str | None) -> str:
    """What ``python -m diffexp.train`` does with its composed config: train a new run into
    ``run_dir``, or continue ``cfg.resume``; returns the run's final status."""
    from diffexp.evaluation import resolve_metric
    from diffexp.loop import train  # heavy imports after Hydra has parsed the command line

    resume = bool(cfg.resume)
    if resume:
        cfg = resume_config(cfg.resume)
        run_dir = cfg.resume
    elif "choices" not in cfg:
        record_choices(cfg)
    with open_dict(cfg):
        cfg.metric = resolve_metric(cfg.metric, cfg.dataset)  # metric=auto: decided for the dataset, and recorded
    return train(cfg, run_dir, resume=resume)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> None:
    with report_errors():
        status = run(cfg, HydraConfig.get().runtime.output_dir)
    if status == "interrupted":
        sys.exit(128 + signal.SIGINT)


if __name__ == "__main__":
    main()
