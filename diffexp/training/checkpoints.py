"""Checkpoints of the training state: written whole (every process into one temporary folder,
sealed with a manifest, renamed into place), and read back to resume or to start a new run from a
parent's weights."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from omegaconf import DictConfig
from safetensors.torch import load_file

from diffexp import DiffexpError, first_line
from diffexp.records.rundir import RunDir, replace_path, step_of, write_manifest
from diffexp.training.state import EMA, TrainState

log = logging.getLogger(__name__)
# What the loop registers for checkpointing, in order, is saved as custom_checkpoint_<index>.pkl.
EMA_FILE = "custom_checkpoint_1.pkl"
PHEMA_FILE = "custom_checkpoint_3.pkl"  # trainer.ema.kind=ema+phema: the power-function profiles beside the EMA


def all_finite(accelerator: Accelerator, state: TrainState, *models: torch.nn.Module) -> bool:
    """Whether, on every process, the losses since the last log step and all weights are finite (one sync)."""
    bad = state.sums[2] + sum((~torch.isfinite(p)).any().float() for m in models for p in m.parameters())
    return accelerator.reduce(bad.reshape(1), "sum").item() == 0


def save_checkpoint(accelerator: Accelerator, run: RunDir, step: int, keep: int) -> Path:
    """Full training state, written to a temporary folder, sealed with its manifest and renamed into
    place (atomic)."""
    final = run.checkpoint_dir(step)
    tmp = final.with_name(f".tmp_{final.name}")  # one name for every process: each writes its RNG state there
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_manifest(tmp)  # last: sizes and checksums of every file the processes wrote
        replace_path(tmp, final)
        run.prune_checkpoints(keep)
    accelerator.wait_for_everyone()
    return final


def load_parent(cfg: DictConfig, net: torch.nn.Module, ema: EMA, optimizer, device: torch.device, phema=None) -> None:
    """A new run's start from checkpoint ``cfg.checkpoint`` of run ``cfg.init_from``: its model and EMA
    weights (and a separate power-function tracker ``phema``'s, with ``trainer.ema.kind=ema+phema``),
    and with ``init_optimizer`` its Adam moments (the settings, the LR schedule, the step and the data
    order stay this run's). A checkpoint that does not fit the model is one line."""
    folder = RunDir(cfg.init_from).find_checkpoint(cfg.checkpoint)
    try:
        weights = load_file(folder / "model.safetensors", device=str(device))
        net.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in weights.items()})
        averages = [(ema, EMA_FILE)] + ([(phema, PHEMA_FILE)] if phema is not None and phema is not ema else [])
        for average, file in averages:
            if not (folder / file).exists():
                raise DiffexpError(f"init_from={cfg.init_from} checkpoint={cfg.checkpoint}: it holds no {file} "
                                   f"(trained with another trainer.ema.kind)")
            average.load_state_dict(torch.load(folder / file, map_location=device, weights_only=True))
    except RuntimeError as e:  # load_state_dict's first line only names the class; the next says what differs
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), first_line(e))
        raise DiffexpError(f"init_from={cfg.init_from} checkpoint={cfg.checkpoint}: its weights do not fit "
                           f"this model ({detail})") from None
    for average, _ in averages:  # the average goes on, counting the parent's steps
        average.age, average.step = average.age + step_of(folder), 0
    if cfg.get("init_optimizer"):
        moments = torch.load(folder / "optimizer.bin", map_location=device, weights_only=True)["state"]
        optimizer.load_state_dict({"state": moments, "param_groups": optimizer.state_dict()["param_groups"]})
    log.info("started from %s (model, EMA%s)", folder, ", optimizer moments" if cfg.get("init_optimizer") else "")


def checkpoint_ema(folder: Path, denoiser: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``denoiser`` (a network of the run's architecture) holding checkpoint ``folder``'s EMA
    weights: the model a checkpoint is, as ``model/`` is the final EMA. Read as a resume reads them."""
    ema = EMA(denoiser, None)
    ema.load_state_dict(torch.load(folder / EMA_FILE, map_location="cpu", weights_only=True))
    return ema.model


def continue_schedule(optimizer, lr_scheduler) -> None:
    """After loading a checkpoint: the next step's learning rate from the schedule as built, at the
    saved position (``LambdaLR`` saves no lambdas, so a longer ``trainer.max_steps`` takes effect)."""
    for group, base, lr_lambda in zip(optimizer.param_groups, lr_scheduler.base_lrs, lr_scheduler.lr_lambdas):
        group["lr"] = base * lr_lambda(lr_scheduler.last_epoch)  # as LambdaLR computes it
