"""The one place that builds library objects from config nodes (``_target_`` instantiation)."""

from __future__ import annotations

import inspect

import torch
from diffusers import DDPMScheduler, SchedulerMixin, UNet2DModel
from diffusers.optimization import get_scheduler
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from diffexp import DiffexpError, first_line

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


# Beta schedules every diffusers sampler computes itself; others reach it as numbers (trained_betas).
PORTABLE_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def compatible_samplers(trained_with: str) -> set[str]:
    """Names of the diffusers schedulers that can sample a model trained with the schedule class
    ``trained_with``: for DDPM, diffusers' compatibles of DDPMScheduler but the EDM ones (which
    precondition the network's input and output as EDM trains it)."""
    if trained_with == "DDPMScheduler":
        return {name for name in DDPMScheduler._compatibles if not name.startswith("EDM")} - {"DPMSolverSDEScheduler"}
    return set()


def build_sampler(sampler_cfg: DictConfig, scheduler_cfg: DictConfig) -> SchedulerMixin:
    """The inference scheduler of ``sampler_cfg`` for a model trained with ``scheduler_cfg``.

    The one way every part of diffexp gets its sampler (grids, in-training evaluation, ``sample``,
    ``evaluate``, the exported pipeline): from the two config nodes alone, so the same configs give
    the same scheduler and the same images. The sampler's class takes the training schedule's
    settings it accepts (betas, prediction type, ...) and then the sampler's own
    (``sampler.scheduler.*``); a schedule the sampler cannot compute (e.g. ``sigmoid``) is handed
    over as ``trained_betas``.
    """
    own = {k: v for k, v in OmegaConf.to_container(sampler_cfg.scheduler, resolve=True).items()}
    target = str(own.pop("_target_", ""))
    own.pop("_partial_", None)
    target = target.removesuffix(".from_config")  # sampler configs saved before this function
    try:
        cls = get_class(target)
    except Exception as e:  # noqa: BLE001 - Hydra raises ImportError or its own errors
        raise DiffexpError(f"sampler.scheduler._target_={target}: not a diffusers scheduler class ({e})") from None
    trained_with = str(scheduler_cfg.get("_target_", "")).rsplit(".", 1)[-1]
    if cls.__name__ not in compatible_samplers(trained_with):
        raise DiffexpError(f"sampler={cls.__name__}: cannot sample a model trained with {trained_with} "
                           f"(compatible: {', '.join(sorted(compatible_samplers(trained_with)))})")
    accepted = inspect.signature(cls.__init__).parameters
    schedule = {k: v for k, v in OmegaConf.to_container(scheduler_cfg, resolve=True).items() if not k.startswith("_")}
    kwargs = {k: v for k, v in schedule.items() if k in accepted}
    if schedule.get("beta_schedule") not in (None, *PORTABLE_BETA_SCHEDULES) and "trained_betas" in accepted:
        kwargs["trained_betas"] = build_noise_scheduler(scheduler_cfg).betas.tolist()
    unknown = sorted(set(own) - set(accepted))
    if unknown:
        raise DiffexpError(f"sampler.scheduler.{unknown[0]}: not an option of {cls.__name__}")
    kwargs.update(own)
    try:
        return cls(**kwargs)
    except (ValueError, NotImplementedError) as e:
        raise DiffexpError(f"sampler={cls.__name__}: cannot sample this schedule ({first_line(e)})") from None


def fused_adamw(trainer_cfg: DictConfig, device: torch.device) -> bool | None:
    """``trainer.fused_adamw`` for ``device``: ``auto`` is fused on a CPU and on CUDA, where it measured
    faster (BENCHMARKS.md), and PyTorch's own choice (None) elsewhere."""
    value = trainer_cfg.get("fused_adamw")
    if value == "auto":
        return True if device.type in ("cpu", "cuda") else None
    return value


def build_optimizer(trainer_cfg: DictConfig, params, device: torch.device) -> torch.optim.Optimizer:
    """``trainer.optimizer`` (AdamW) with the trainer's ``lr``, ``betas``, ``weight_decay`` and ``eps``:
    those keys are the one source of each setting (the optimizer node only names the class)."""
    return instantiate(trainer_cfg.optimizer, _convert_="all")(
        params, lr=float(trainer_cfg.lr), betas=tuple(float(b) for b in trainer_cfg.betas),
        weight_decay=float(trainer_cfg.weight_decay), eps=float(trainer_cfg.eps),
        fused=fused_adamw(trainer_cfg, device))


def build_objective(cfg: DictConfig):
    """The training objective of ``cfg.scheduler`` (see ``diffexp.objectives``)."""
    from diffexp.objectives import DDPMObjective

    t = cfg.trainer
    return DDPMObjective(build_noise_scheduler(cfg.scheduler), t.get("loss_weighting", "uniform"),
                         t.get("snr_gamma", 5.0))


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
