"""Sample-quality metrics (FID / IS / KID) during training and for finished runs."""

from __future__ import annotations

from typing import Callable

import torch
from accelerate import Accelerator
from omegaconf import DictConfig

# evaluate(ema_unet, sampler, sampler_steps) -> {"eval/fid_2k": ..., ...}; called on every process.
Evaluator = Callable[..., dict]


def make_evaluator(cfg: DictConfig, accelerator: Accelerator, real_images_u8: torch.Tensor) -> Evaluator | None:
    """The in-training evaluator for ``cfg.metric``, or None for ``metric=none``."""
    if cfg.metric.name == "none":
        return None
    raise NotImplementedError(f"metric={cfg.metric.name}")
