"""Speed options of the trainer config (``trainer.tf32``, ``channels_last``, ``compile``, ...).

Each is off by default until BENCHMARKS.md shows it pays on the device in question, and each
is either a no-op or correct on the CPU. Configs saved before an option existed read as "off".
"""

from __future__ import annotations

import torch
from accelerate.utils import DynamoBackend, TorchDynamoPlugin
from omegaconf import DictConfig

from diffexp import DiffexpError

COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# accelerate's names (DynamoBackend) of torch.compile's backends, "no" (compile=false) aside
COMPILE_BACKENDS = tuple(b.value.lower() for b in DynamoBackend if b.value.lower() != "no")


def dynamo_plugin(trainer_cfg: DictConfig) -> TorchDynamoPlugin:
    """accelerate's ``torch.compile`` settings when ``trainer.compile`` (``prepare`` compiles the
    model), else none: ``trainer.compile_backend`` (inductor; ``aot_eager`` or ``eager`` tell
    whether a problem is inductor's, as PyTorch's troubleshooting guide does) with
    ``trainer.compile_mode``, an inductor setting. ``reduce-overhead`` adds CUDA graphs, which cut
    the kernel-launch time that bounds small U-Nets on a GPU (BENCHMARKS.md)."""
    mode = trainer_cfg.get("compile_mode")
    if mode not in COMPILE_MODES:
        raise DiffexpError(f"trainer.compile_mode={mode}: expected one of {', '.join(m or 'null' for m in COMPILE_MODES)}")
    backend = str(trainer_cfg.get("compile_backend", "inductor"))
    if backend not in COMPILE_BACKENDS:
        raise DiffexpError(f"trainer.compile_backend={backend}: expected one of {', '.join(COMPILE_BACKENDS)}")
    if mode is not None and backend != "inductor":
        raise DiffexpError(f"trainer.compile_mode={mode}: a mode of the inductor backend, not of "
                           f"trainer.compile_backend={backend} (use compile_mode=null)")
    if not trainer_cfg.get("compile", False):
        return TorchDynamoPlugin(backend="no")
    return TorchDynamoPlugin(backend=backend, mode=mode)


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
