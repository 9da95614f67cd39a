"""The one place that builds library objects from config nodes (``_target_`` instantiation)."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from diffusers import DDPMScheduler, SchedulerMixin
from diffusers.optimization import get_scheduler
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from diffexp import DiffexpError, first_line

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def build(node: DictConfig, what: str, **overrides):
    """``node``'s ``_target_`` built with ``overrides``: the one place a config node becomes an object.
    A DiffexpError raised inside comes through as it is; any other failure is one line starting ``what``."""
    try:
        return instantiate(node, _convert_="all", **overrides)
    except InstantiationException as e:
        if isinstance(e.__cause__, DiffexpError):
            raise e.__cause__ from None
        raise DiffexpError(f"{what}: {first_line(e.__cause__ or e)}") from e


def is_transformer(model) -> bool:
    """Whether a denoiser takes its input as ``hidden_states`` (diffusers' DiT-style transformers)."""
    model = getattr(model, "_orig_mod", model)  # a compiled module's forward takes (*args, **kwargs)
    return "hidden_states" in inspect.signature(model.forward).parameters


def build_model(model_cfg: DictConfig, *, channels: int | None = None, size: int | None = None,
                num_classes: int | None = None) -> torch.nn.Module:
    """The denoiser of ``model_cfg`` for inputs of ``channels`` x ``size`` x ``size`` (the dataset's
    pixels, or an autoencoder's latents; default: as the config says) and, for class-conditional
    training, ``num_classes`` classes plus the null class of classifier-free guidance (label
    ``num_classes``). Checks that the size survives the network's downsampling or patching.

    A ``UNet2DModel`` gets a class embedding (``num_class_embeds``); a ``DiTTransformer2DModel`` its
    adaLN label embedding (``num_embeds_ada_norm``; one constant "class" when unconditional), with
    diffusers' built-in label dropout switched off: the loop's ``conditioning.p_uncond`` is the one
    label dropout.
    """
    target = str(model_cfg.get("_target_", ""))
    dit = target.rsplit(".", 1)[-1] in ("DiTTransformer2DModel", "Transformer2DModel")
    overrides = {}
    if channels is not None:
        overrides.update(in_channels=channels, out_channels=channels)
    if size is not None:
        overrides["sample_size"] = size
    if dit:
        overrides["num_embeds_ada_norm"] = num_classes or 1
    elif num_classes:
        overrides["num_class_embeds"] = num_classes + 1
    model = build(model_cfg, f"model: cannot build {target}", **overrides)
    size = model.config.sample_size
    if dit:
        from diffusers.models.embeddings import LabelEmbedding

        for module in model.modules():
            if isinstance(module, LabelEmbedding):
                module.dropout_prob = 0.0
        if isinstance(size, int) and size % model.config.patch_size:
            raise DiffexpError(f"dataset.resolution={size} (as the model sees it) is not divisible by the patch size "
                               f"{model.config.patch_size}")
        return model
    levels = len(model.config.block_out_channels)
    if isinstance(size, int) and size % 2 ** (levels - 1):
        raise DiffexpError(
            f"dataset.resolution={size} is not divisible by {2 ** (levels - 1)}, which this {levels}-level U-Net needs"
        )
    return model


def build_noise_scheduler(scheduler_cfg: DictConfig) -> DDPMScheduler:
    """The training noise scheduler (betas, prediction type)."""
    if scheduler_cfg.get("prediction_type") not in PREDICTION_TYPES:
        raise DiffexpError(f"scheduler.prediction_type={scheduler_cfg.get('prediction_type')}: expected one of {PREDICTION_TYPES}")
    return build(scheduler_cfg, "scheduler")


# Beta schedules every diffusers sampler computes itself; others reach it as numbers (trained_betas).
PORTABLE_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def objective_class(scheduler_cfg: DictConfig) -> type:
    """The objective class a ``scheduler`` config trains with: ``DDPMObjective`` for a diffusers
    ``DDPMScheduler`` node (the DDPM family), else the node's ``_target_`` (flow matching, EDM)."""
    from diffexp.objectives.ddpm import DDPMObjective

    target = str(scheduler_cfg.get("_target_", ""))
    if target.rsplit(".", 1)[-1] == "DDPMScheduler":
        return DDPMObjective
    try:
        cls = get_class(target)
    except Exception as e:  # noqa: BLE001 - Hydra raises ImportError or its own errors
        raise DiffexpError(f"scheduler._target_={target}: not an objective class ({first_line(e)})") from None
    if not hasattr(cls, "noise") or not hasattr(cls, "compatible_samplers"):
        raise DiffexpError(f"scheduler._target_={target}: not an objective (see diffexp/objectives)")
    return cls


def sampler_config(name: str) -> DictConfig:
    """The sampler config ``conf/sampler/<name>.yaml`` (what ``sampler=<name>`` composes): the one way a
    command loads a sampler option by name."""
    from diffexp.config import CONFIG_PATH

    path = Path(CONFIG_PATH) / "sampler" / f"{name}.yaml"
    if not path.is_file():
        raise DiffexpError(f"sampler={name}: no conf/sampler/{name}.yaml")
    return OmegaConf.load(path)


def sampler_names() -> list[str]:
    """The options of the ``sampler`` config group (``auto`` is not one: it names the objective's own)."""
    from diffexp.config import CONFIG_PATH

    return sorted(p.stem for p in (Path(CONFIG_PATH) / "sampler").glob("*.yaml") if p.stem != "auto")


def resolve_sampler(sampler_cfg: DictConfig, scheduler_cfg: DictConfig) -> DictConfig:
    """``sampler=auto`` (the default) as the objective's own sampler config (``conf/sampler/<name>.yaml``),
    with the ``sampler.steps`` and ``sampler.scheduler.*`` options given on the command line applied to
    it; any other sampler config as it is."""
    if sampler_cfg.get("name") != "auto":
        return sampler_cfg
    resolved = sampler_config(objective_class(scheduler_cfg).default_sampler)
    if sampler_cfg.get("steps") is not None:
        resolved.steps = sampler_cfg.steps
    if sampler_cfg.get("scheduler") is not None:
        resolved.scheduler = OmegaConf.merge(resolved.scheduler, sampler_cfg.scheduler)
    return resolved


# Sampler options that bound x_0 predictions to pixel values [-1, 1]: wrong for latents.
PIXEL_ONLY = {"clip_sample": False, "thresholding": False}


def build_sampler(sampler_cfg: DictConfig, scheduler_cfg: DictConfig, latent: bool = False) -> SchedulerMixin:
    """The inference scheduler of ``sampler_cfg`` for a model trained with ``scheduler_cfg``.

    The one way every part of diffexp gets its sampler (grids, in-training evaluation, ``sample``,
    ``evaluate``, the exported pipeline): from the two config nodes alone, so the same configs give
    the same scheduler and the same images. The sampler's class takes the training schedule's
    settings it accepts (betas, prediction type, ...) and then the sampler's own
    (``sampler.scheduler.*``); a schedule the sampler cannot compute (e.g. ``sigmoid``) is handed
    over as ``trained_betas``. For a ``latent`` model, clipping to pixel values is switched off.
    """
    own = dict(OmegaConf.to_container(resolve_sampler(sampler_cfg, scheduler_cfg).scheduler, resolve=True))
    target = str(own.pop("_target_", ""))
    own.pop("_partial_", None)
    target = target.removesuffix(".from_config")  # sampler configs saved before this function
    try:
        cls = get_class(target)
    except Exception as e:  # noqa: BLE001 - Hydra raises ImportError or its own errors
        raise DiffexpError(f"sampler.scheduler._target_={target}: not a diffusers scheduler class ({first_line(e)})") from None
    trained_with = objective_class(scheduler_cfg)
    if cls.__name__ not in trained_with.compatible_samplers:
        name = "DDPMScheduler" if trained_with.__name__ == "DDPMObjective" else trained_with.__name__
        raise DiffexpError(f"sampler={cls.__name__}: cannot sample a model trained with {name} "
                           f"(compatible: {', '.join(sorted(trained_with.compatible_samplers))})")
    accepted = inspect.signature(cls.__init__).parameters
    schedule = {k: v for k, v in OmegaConf.to_container(scheduler_cfg, resolve=True).items()
                if not k.startswith("_") and v is not None}
    kwargs = {k: v for k, v in schedule.items() if k in accepted}
    if schedule.get("beta_schedule") not in (None, *PORTABLE_BETA_SCHEDULES) and "trained_betas" in accepted:
        kwargs["trained_betas"] = build_noise_scheduler(scheduler_cfg).betas.tolist()
    if hasattr(trained_with, "sampler_settings"):  # what this objective's path needs of a shared sampler class
        kwargs.update(trained_with.sampler_settings(scheduler_cfg, accepted))
    unknown = sorted(set(own) - set(accepted))
    if unknown:
        raise DiffexpError(f"sampler.scheduler.{unknown[0]}: not an option of {cls.__name__}")
    kwargs.update(own)
    if latent:
        kwargs.update({k: v for k, v in PIXEL_ONLY.items() if k in accepted})
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
    return build(trainer_cfg.optimizer, "trainer.optimizer")(
        params, lr=float(trainer_cfg.lr), betas=tuple(float(b) for b in trainer_cfg.betas),
        weight_decay=float(trainer_cfg.weight_decay), eps=float(trainer_cfg.eps),
        fused=fused_adamw(trainer_cfg, device))


def build_objective(scheduler_cfg: DictConfig, trainer_cfg: DictConfig):
    """The training objective of a ``scheduler`` node (see ``diffexp.objectives``): the DDPM family
    with the trainer's loss weighting (uniform or min-SNR) and timestep density, or the node's own
    objective class (which has its own)."""
    from diffexp.objectives.ddpm import DDPMObjective

    t = trainer_cfg
    cls = objective_class(scheduler_cfg)
    if cls is DDPMObjective:
        return DDPMObjective(build_noise_scheduler(scheduler_cfg), t.get("loss_weighting", "uniform"),
                             t.get("snr_gamma", 5.0), t.get("time_distribution", "uniform"),
                             t.get("logit_mean", 0.0), t.get("logit_std", 1.0))
    if t.get("loss_weighting", "uniform") != "uniform":
        raise DiffexpError(f"trainer.loss_weighting={t.loss_weighting}: min-SNR weighting is for the DDPM family; "
                           f"{cls.__name__} weights its loss as its paper does")
    if t.get("time_distribution", "uniform") != "uniform":
        raise DiffexpError(f"trainer.time_distribution={t.time_distribution}: the DDPM family's timestep density; "
                           f"{cls.__name__} has its own (scheduler.time_distribution, scheduler.P_mean, ...)")
    return build(scheduler_cfg, "scheduler")


def build_lr_scheduler(trainer_cfg: DictConfig, optimizer: torch.optim.Optimizer):
    """diffusers' ``get_scheduler``: warm-up, then the named schedule over ``max_steps``; or ``wsd``
    (warm-up, stable, decay: Hägele et al. 2024), the warm-up, the constant rate, and a linear cool-down
    to 0 over the last ``trainer.cooldown`` fraction of the steps."""
    if trainer_cfg.lr_schedule == "wsd":
        warmup, steps = int(trainer_cfg.warmup_steps), int(trainer_cfg.max_steps)
        cooldown = max(1, round(float(trainer_cfg.get("cooldown", 0.2)) * steps))

        def wsd(step: int) -> float:
            return min(step / max(1, warmup), 1.0, max(0.0, (steps - step) / cooldown))  # get_scheduler's warm-up
        return torch.optim.lr_scheduler.LambdaLR(optimizer, wsd)
    try:
        return get_scheduler(trainer_cfg.lr_schedule, optimizer, num_warmup_steps=trainer_cfg.warmup_steps,
                             num_training_steps=trainer_cfg.max_steps)
    except ValueError as e:
        raise DiffexpError(f"trainer.lr_schedule={trainer_cfg.lr_schedule}: {e}") from e


def build_image_source(loader_cfg: DictConfig):
    """What a dataset's ``loader`` node returns (a ``datasets.Dataset`` with an ``image`` column, or
    PIL images); a loader's own DiffexpError comes through as it was raised."""
    return build(loader_cfg, f"dataset.loader: cannot build {loader_cfg.get('_target_')}")
