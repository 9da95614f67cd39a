"""One check of a composed training config, before anything is created.

``check_train_config`` raises a DiffexpError naming the first bad key, its value and what is
expected (the command turns it into one ``error:`` line and exit status 2); values that are
valid but surprising come back as warning lines. Checks that need built objects (a resolution the
U-Net cannot halve, a batch that does not split over processes, a sampler the schedule cannot
use) stay where those objects are built, also before anything is recorded.
"""

from __future__ import annotations

import os
from numbers import Integral, Real
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from diffexp import DiffexpError

MIXED_PRECISION = ("no", "fp16", "bf16")
CHANNELS = (1, 3)


def _value(cfg: DictConfig, key: str):
    return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)


def need_int(cfg: DictConfig, key: str, minimum: int, *, allow: tuple = ()) -> None:
    """``key`` is an integer of at least ``minimum`` (or one of ``allow``)."""
    v = _value(cfg, key)
    if v in allow and not isinstance(v, bool):
        return
    if isinstance(v, bool) or not isinstance(v, Integral) or v < minimum:
        what = f"an integer >= {minimum}" + (f" or {' or '.join(map(str, allow))}" if allow else "")
        raise DiffexpError(f"{key}={v}: expected {what}")


def need_number(cfg: DictConfig, key: str, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False, allow_none: bool = False) -> None:
    """``key`` is a number within the bounds (open or closed)."""
    v = _value(cfg, key)
    if v is None and allow_none:
        return
    ok = isinstance(v, Real) and not isinstance(v, bool)
    if ok and low is not None:
        ok = v > low if low_open else v >= low
    if ok and high is not None:
        ok = v < high if high_open else v <= high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        raise DiffexpError(f"{key}={v}: expected a number {' and '.join(x for x in (lo, hi) if x)}".rstrip())


def need_writable_dir(key: str, path: str) -> None:
    """``path`` is, or can be created as, a folder this process can write in."""
    p = Path(str(path)).expanduser()
    existing = next((q for q in (p, *p.parents) if q.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise DiffexpError(f"{key}={path}: not a folder this user can write in")


def check_train_config(cfg: DictConfig, *, cuda: bool | None = None) -> list[str]:
    """Raise DiffexpError (one line) for the first setting that cannot work; return warnings for
    settings that work but are probably not what was meant."""
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    warnings: list[str] = []
    need_int(cfg, "seed", 0)
    t = "trainer"
    need_int(cfg, f"{t}.batch_size", 1)
    need_int(cfg, f"{t}.grad_accum", 1)
    need_int(cfg, f"{t}.max_steps", 1)
    need_number(cfg, f"{t}.lr", low=0, low_open=True)
    need_number(cfg, f"{t}.weight_decay", low=0)
    need_number(cfg, f"{t}.eps", low=0, low_open=True)
    betas = _value(cfg, f"{t}.betas")
    if not (OmegaConf.is_list(betas) and len(betas) == 2 and all(isinstance(b, Real) and 0 <= b < 1 for b in betas)):
        raise DiffexpError(f"{t}.betas={betas}: expected two numbers in [0, 1), e.g. [0.9,0.999]")
    need_int(cfg, f"{t}.warmup_steps", 0)
    need_number(cfg, f"{t}.max_grad_norm", low=0, allow_none=True)
    need_int(cfg, f"{t}.log_every", 1)
    need_int(cfg, f"{t}.sample_every", 0)
    need_int(cfg, f"{t}.checkpoint_every", 0)
    need_int(cfg, f"{t}.eval_every", 0, allow=("auto",))
    need_int(cfg, f"{t}.keep_checkpoints", 1)
    need_int(cfg, f"{t}.grid_size", 1)
    need_number(cfg, f"{t}.ema.decay", low=0, high=1, high_open=True)
    need_int(cfg, f"{t}.ema.update_every", 1)
    need_number(cfg, f"{t}.ema.inv_gamma", low=0, low_open=True)
    need_number(cfg, f"{t}.ema.power", low=0, low_open=True)
    need_int(cfg, f"{t}.ema.update_after_step", 0)
    mp = _value(cfg, f"{t}.mixed_precision")
    if mp not in MIXED_PRECISION:
        raise DiffexpError(f"{t}.mixed_precision={mp}: expected one of {', '.join(MIXED_PRECISION)}")
    if mp == "fp16" and not cuda:
        raise DiffexpError(f"{t}.mixed_precision=fp16: needs a CUDA GPU, and this machine has none; use bf16 "
                           "(autocast on CPUs too) or no")
    need_int(cfg, "sampler.steps", 1)
    need_int(cfg, "dataset.resolution", 1)
    channels = _value(cfg, "dataset.channels")
    if channels not in CHANNELS or isinstance(channels, bool):
        raise DiffexpError(f"dataset.channels={channels}: expected 1 (grayscale) or 3 (RGB)")
    need_writable_dir("output_root", cfg.output_root)
    need_writable_dir("cache_dir", cfg.cache_dir)

    steps = cfg.trainer.max_steps
    if cfg.trainer.warmup_steps >= steps:
        warnings.append(f"trainer.warmup_steps={cfg.trainer.warmup_steps} is not below trainer.max_steps={steps}: "
                        "the learning rate never reaches trainer.lr")
    horizon = 1 / (1 - cfg.trainer.ema.decay) if cfg.trainer.ema.decay < 1 else float("inf")
    if not cfg.trainer.ema.get("use_warmup", True) and horizon > steps:
        warnings.append(f"trainer.ema.decay={cfg.trainer.ema.decay} averages over ~{horizon:.0f} steps, more than "
                        f"the run's {steps}, without warm-up: the exported weights stay close to the initial ones")
    if cfg.trainer.lr > 0.1:
        warnings.append(f"trainer.lr={cfg.trainer.lr} is unusually large for Adam (1e-4 to 2e-3 is typical)")
    return warnings
