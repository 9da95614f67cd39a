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
from omegaconf import DictConfig, OmegaConf, open_dict

from diffexp.cli import CONFIG_PATH, apply_overrides, report_errors
from diffexp.records import RunDir


def resume_config(resume: str) -> DictConfig:
    """The saved config of run ``resume`` with this command's value overrides applied.

    Group overrides (``model=...``) would change what is being resumed and are refused.
    """
    run = RunDir(resume).require()
    cfg = apply_overrides(run.config(), skip=("resume",))
    cfg.resume = str(run.path)
    return cfg


def record_choices(cfg: DictConfig) -> None:
    """Store which option of each config group was chosen (``choices.model: unet_small``) in the config,
    so saved configs, W&B and ``compare`` can group runs by it."""
    choices = {k: v for k, v in HydraConfig.get().runtime.choices.items() if not k.startswith("hydra")}
    with open_dict(cfg):
        cfg.choices = choices


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> None:
    from diffexp.loop import train  # heavy imports after Hydra has parsed the command line

    with report_errors():
        if cfg.resume:
            cfg = resume_config(cfg.resume)
        else:
            record_choices(cfg)
        status = train(cfg, HydraConfig.get().runtime.output_dir, resume=bool(cfg.resume))
    if status == "interrupted":
        sys.exit(128 + signal.SIGINT)


if __name__ == "__main__":
    main()
