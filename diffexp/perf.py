"""Speed options of the trainer config (``trainer.tf32``, ``channels_last``, ``compile``, ...).

Each is off by default until BENCHMARKS.md shows it pays on the device in question, and each
is either a no-op or correct on the CPU. Configs saved before an option existed read as "off".
"""

from __future__ import annotations

import torch
from accelerate.utils import TorchDynamoPlugin
from omegaconf import DictConfig

from diffexp import DiffexpError

COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def dynamo_plugin(trainer_cfg: DictConfig) -> TorchDynamoPlugin:
    """accelerate's ``torch.compile`` settings: inductor with ``trainer.compile_mode`` when
    ``trainer.compile`` (``prepare`` compiles the model), else none. ``reduce-overhead`` adds CUDA
    graphs, which cut the kernel-launch time that bounds small U-Nets on a GPU (BENCHMARKS.md)."""
    mode = trainer_cfg.get("compile_mode")
    if mode not in COMPILE_MODES:
        raise DiffexpError(f"trainer.compile_mode={mode}: expected one of {', '.join(m or 'null' for m in COMPILE_MODES)}")
    if not trainer_cfg.get("compile", False):
        return TorchDynamoPlugin(backend="no")
    return TorchDynamoPlugin(backend="inductor", mode=mode)


def configure_backends(trainer_cfg: DictConfig, device: torch.device) -> None:
    """TF32 matmuls and convolutions on CUDA when ``trainer.tf32`` (nothing to do on a CPU)."""
    if device.type == "cuda" and trainer_cfg.get("tf32", False):
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True


def optimize_model(model: torch.nn.Module, trainer_cfg: DictConfig) -> torch.nn.Module:
    """The model in channels-last memory layout when ``trainer.channels_last`` (convolutions then
    produce channels-last activations, so inputs need no conversion)."""
    if trainer_cfg.get("channels_last", False):
        model = model.to(memory_format=torch.channels_last)
    return model
