"""Speed options of the trainer config (``trainer.tf32``, ``channels_last``, ``compile``, ...).

Each is off by default until BENCHMARKS.md shows it pays on the device in question, and each
is either a no-op or correct on the CPU. Configs saved before an option existed read as "off".
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig


def dynamo_backend(trainer_cfg: DictConfig) -> str:
    """accelerate's ``dynamo_backend``: ``inductor`` (``torch.compile`` in ``prepare``) or ``no``."""
    return "inductor" if trainer_cfg.get("compile", False) else "no"


def configure_backends(trainer_cfg: DictConfig, device: torch.device) -> None:
    """TF32 matmuls and convolutions on CUDA when ``trainer.tf32`` (nothing to do on a CPU), and
    ``trainer.fused_adamw: auto`` resolved for ``device`` in the config (so the run records it):
    fused on a CPU, where it measured faster (BENCHMARKS.md), PyTorch's choice elsewhere until
    measured there."""
    if trainer_cfg.get("fused_adamw") == "auto":
        trainer_cfg.fused_adamw = True if device.type == "cpu" else None
    if device.type == "cuda" and trainer_cfg.get("tf32", False):
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True


def optimize_model(model: torch.nn.Module, trainer_cfg: DictConfig) -> torch.nn.Module:
    """The model in channels-last memory layout when ``trainer.channels_last`` (convolutions then
    produce channels-last activations, so inputs need no conversion)."""
    if trainer_cfg.get("channels_last", False):
        model = model.to(memory_format=torch.channels_last)
    return model
