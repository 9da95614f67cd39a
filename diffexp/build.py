"""The one place that builds library objects from config nodes (``_target_`` instantiation)."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, SchedulerMixin, UNet2DModel
from diffusers.optimization import get_scheduler
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from diffexp import DiffexpError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def build_model(model_cfg: DictConfig) -> UNet2DModel:
    """The denoiser; checks that the resolution survives the U-Net's downsampling."""
    try:
        model = instantiate(model_cfg, _convert_="all")
    except InstantiationException as e:
        raise DiffexpError(f"model: cannot build {model_cfg.get('_target_')}: {e.__cause__ or e}") from e
    levels = len(model.config.block_out_channels)
    size = model.config.sample_size
    if isinstance(size, int) and size % 2 ** (levels - 1):
        raise DiffexpError(
            f"dataset.resolution={size} is not divisible by {2 ** (levels - 1)}, which this {levels}-level U-Net needs"
        )
    return model


def build_noise_scheduler(scheduler_cfg: DictConfig) -> DDPMScheduler:
    """The training noise scheduler (betas, prediction type)."""
    if scheduler_cfg.get("prediction_type") not in PREDICTION_TYPES:
        raise DiffexpError(f"scheduler.prediction_type={scheduler_cfg.get('prediction_type')}: expected one of {PREDICTION_TYPES}")
    try:
        return instantiate(scheduler_cfg, _convert_="all")
    except InstantiationException as e:
        raise DiffexpError(f"scheduler: {e.__cause__ or e}") from e


def build_sampler(sampler_cfg: DictConfig, noise_scheduler: SchedulerMixin) -> SchedulerMixin:
    """An inference scheduler built from the training scheduler's config (same betas and target).

    The betas are handed over as numbers, so any training schedule works with any sampler
    (DDIM and DPM-Solver cannot compute every named schedule themselves, e.g. ``sigmoid``).
    """
    from_config = instantiate(sampler_cfg.scheduler, _convert_="all")
    return from_config(noise_scheduler.config, trained_betas=noise_scheduler.betas.tolist())


def build_optimizer(trainer_cfg: DictConfig, params) -> torch.optim.Optimizer:
    return instantiate(trainer_cfg.optimizer, _convert_="all")(params)


def build_lr_scheduler(trainer_cfg: DictConfig, optimizer: torch.optim.Optimizer):
    """diffusers' ``get_scheduler``: warm-up, then the named schedule over ``max_steps``."""
    try:
        return get_scheduler(trainer_cfg.lr_schedule, optimizer, num_warmup_steps=trainer_cfg.warmup_steps,
                             num_training_steps=trainer_cfg.max_steps)
    except ValueError as e:
        raise DiffexpError(f"trainer.lr_schedule={trainer_cfg.lr_schedule}: {e}") from e


def build_image_source(loader_cfg: DictConfig):
    """What a dataset's ``loader`` node returns (a ``datasets.Dataset`` with an ``image`` column, or
    PIL images); a loader's own DiffexpError comes through as it was raised."""
    try:
        return instantiate(loader_cfg, _convert_="all")
    except InstantiationException as e:
        if isinstance(e.__cause__, DiffexpError):
            raise e.__cause__ from None
        raise DiffexpError(f"dataset.loader: cannot build {loader_cfg.get('_target_')}: {e.__cause__ or e}") from e
