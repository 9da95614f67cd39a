"""``model/``: what a finished run exports, a diffusers pipeline anyone can load, and the one way
diffexp loads it back (``load_pipeline``: weights and configs only, never code from the folder).

Every complete checkpoint is a model too: ``model_source`` says which weights ``checkpoint=`` names
(``model/``, a step, ``last``, ``best``) and ``run_pipeline`` builds the pipeline of either, the one
way ``sample``, ``evaluate``, the app and ``export`` get a run's model."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from diffusers import ModelMixin, SchedulerMixin

from diffexp import DiffexpError, first_line
from diffexp.models.build import is_transformer
from diffexp.records.rundir import RunDir, atomic_path, step_of
from diffexp.sampling import pipeline as pipeline_module
from diffexp.sampling import schedulers as schedulers_module
from diffexp.sampling.pipeline import DiffexpPipeline

log = logging.getLogger(__name__)
# Samplers whose initial noise is unscaled and whose network input is the sample itself: the
# loop of diffusers' DDPMPipeline runs them as they are.
DDPM_PIPELINE_SAMPLERS = ("DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler",
                          "DPMSolverSinglestepScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler",
                          "PNDMScheduler")


def export_pipeline(denoiser: torch.nn.Module, sampler, run: RunDir, vae=None,
                    class_names: list[str] | None = None, guide: torch.nn.Module | None = None,
                    out: Path | None = None) -> None:
    """``model/`` (or ``out``): a diffusers pipeline of the EMA weights, the run's sampler, for latent
    diffusion the autoencoder and, when given, a ``guide`` denoiser for autoguidance (written
    atomically; the pipeline sampled with ``guidance_scale=w`` then guides with it).

    An unconditional pixel-space model with a sampler that diffusers' ``DDPMPipeline`` runs as it
    is, is a plain ``DDPMPipeline`` folder. Any other is a ``DiffexpPipeline`` (class names in its
    config), whose code is copied beside the weights as ``pipeline.py``, so plain diffusers loads it
    with ``DiffusionPipeline.from_pretrained(model_dir, trust_remote_code=True)``. (diffusers'
    ``DiTPipeline`` is not used for class-conditional DiTs: it hard-codes ImageNet's null class,
    label 1000.) Either gives the images of ``diffexp.sample`` for the same seed.
    """
    num_classes = len(class_names) if class_names else None
    pipe = DiffexpPipeline(unet=denoiser, scheduler=sampler, vae=vae, guide=guide, num_classes=num_classes,
                           class_names=class_names)
    plain_loop = type(sampler).__name__ in DDPM_PIPELINE_SAMPLERS
    with atomic_path(out or run.model_dir) as tmp:
        pipe.save_pretrained(tmp)
        index_file = tmp / "model_index.json"
        index = json.loads(index_file.read_text())
        if plain_loop and vae is None and guide is None and num_classes is None and not is_transformer(denoiser):
            index = {k: v for k, v in index.items() if k not in ("vae", "guide", "num_classes", "class_names")}
            index["_class_name"] = "DDPMPipeline"
        else:
            shutil.copyfile(Path(pipeline_module.__file__), tmp / "pipeline.py")
            index["_class_name"] = ["pipeline", "DiffexpPipeline"]
        if type(sampler).__module__ == schedulers_module.__name__:  # a scheduler of diffexp's own
            shutil.copyfile(Path(schedulers_module.__file__), tmp / "scheduler" / "schedulers.py")
            index["scheduler"] = ["schedulers", type(sampler).__name__]
        index_file.write_text(json.dumps(index, indent=2) + "\n")


def _component_class(model_dir: Path, name: str, entry) -> type:
    """The class of ``model_index.json``'s entry ``name`` (``["diffusers", "UNet2DModel"]``), taken from
    diffusers itself or from diffexp's own schedulers (``["schedulers", ...]``): the folder names a
    class, it never supplies one."""
    library, class_name = entry
    if library == "schedulers":  # what export_pipeline writes for diffexp's own schedulers
        cls = getattr(schedulers_module, str(class_name), None)
    else:
        cls = getattr(diffusers, str(class_name), None) if library == "diffusers" else None
    if not (isinstance(cls, type) and issubclass(cls, (ModelMixin, SchedulerMixin))):
        raise DiffexpError(f"{model_dir}/model_index.json: {name} is {library}.{class_name}, not a diffusers "
                           "model or scheduler diffexp can load")
    return cls


def load_pipeline(model_dir: str | Path) -> DiffexpPipeline:
    """The pipeline ``export_pipeline`` wrote to ``model_dir`` (a ``DDPMPipeline`` or ``DiffexpPipeline``
    folder), built from diffexp's and diffusers' own classes: only JSON configs and safetensors weights
    are read, so a ``pipeline.py`` or scheduler code in the folder is never imported. Every command
    that samples a run (``sample``, ``evaluate``, the app, research) loads it here, U-Net and DiT alike."""
    model_dir = Path(model_dir)
    try:
        index = json.loads((model_dir / "model_index.json").read_text())
    except (OSError, ValueError) as e:
        raise DiffexpError(f"{model_dir}: not an exported diffexp model ({type(e).__name__} reading "
                           "model_index.json)") from None
    parts = {}
    for name in ("unet", "transformer", "scheduler", "vae", "guide"):  # DiT exports of diffexp 0.1 named it transformer
        entry = index.get(name)
        if not entry or entry[0] is None:
            continue
        cls = _component_class(model_dir, name, entry)
        try:
            if issubclass(cls, SchedulerMixin):
                parts[name] = cls.from_pretrained(model_dir, subfolder=name)
            else:
                parts[name] = cls.from_pretrained(model_dir, subfolder=name, use_safetensors=True)
        except (OSError, ValueError, EnvironmentError) as e:
            raise DiffexpError(f"{model_dir / name}: cannot be loaded as {cls.__name__} ({first_line(e)})") from None
    denoiser = parts.get("unet", parts.get("transformer"))
    if denoiser is None or "scheduler" not in parts:
        raise DiffexpError(f"{model_dir}/model_index.json: no denoiser (unet) or no scheduler")
    guide = parts["guide"].eval() if "guide" in parts else None
    pipe = DiffexpPipeline(unet=denoiser.eval(), scheduler=parts["scheduler"], vae=parts.get("vae"), guide=guide,
                           num_classes=index.get("num_classes"), class_names=index.get("class_names"))
    return pipe


@dataclass
class ModelSource:
    """Which weights of a run are the model: its exported ``model/`` (``checkpoint`` None) or the EMA
    weights of the complete checkpoint ``folder`` of step ``checkpoint``; ``step``: the training step
    the weights are from."""

    folder: Path
    checkpoint: int | None
    step: int

    def describe(self) -> str:
        return "model/" if self.checkpoint is None else f"checkpoint {self.checkpoint}"


def model_source(run: RunDir, checkpoint: int | str | None = None, metric_key: str | None = None) -> ModelSource:
    """The weights ``checkpoint=`` names: None, the run's ``model/`` (a run without one, interrupted,
    its newest complete checkpoint, said in a log line); a step; ``last``, the newest complete
    checkpoint; ``best``, the one with the best ``metric_key`` computed so far (``catalog.best_checkpoint``).
    A checkpoint that is not there is one line naming the steps that are."""
    from diffexp.records.catalog import best_checkpoint

    run.require()
    if checkpoint is None:
        if run.model_dir.is_dir():
            return ModelSource(run.model_dir, None, int(run.config().trainer.max_steps))
        folder = run.latest_checkpoint()
        if folder is None:
            raise DiffexpError(f"run={run.path}: no model/ and no complete checkpoint (nothing to sample yet)")
        log.info("%s has no model/ (status %s): using its newest complete checkpoint, step %d (checkpoint=STEP "
                 "picks another)", run.path, run.info().get("status", "unknown"), step_of(folder))
        return ModelSource(folder, step_of(folder), step_of(folder))
    if checkpoint == "best":
        step, key, value = best_checkpoint(run, metric_key)
        log.info("checkpoint=best: step %d (%s %.4g, the best computed so far)", step, key, value)
        checkpoint = step
    folder = run.find_checkpoint(checkpoint)
    return ModelSource(folder, step_of(folder), step_of(folder))


def run_pipeline(run: RunDir, source: ModelSource) -> DiffexpPipeline:
    """The pipeline of ``source``'s weights: ``model/`` as ``load_pipeline`` reads it, or a checkpoint's
    EMA weights in the run's network with its sampler, autoencoder and classes (from ``model/`` when the
    run has one, else built from its config as training built them): what ``model/`` would have been
    had the run ended at that step."""
    from diffexp.training.checkpoints import checkpoint_ema

    if source.checkpoint is None:
        return load_pipeline(source.folder)
    if run.model_dir.is_dir():
        pipe = load_pipeline(run.model_dir)  # everything but the weights
        parts = pipe.unet, pipe.scheduler, pipe.vae, pipe.config.num_classes, pipe.config.class_names
    else:
        parts = built_parts(run)
    denoiser, sampler, vae, num_classes, names = parts
    try:
        denoiser = checkpoint_ema(source.folder, denoiser)
    except RuntimeError as e:  # load_state_dict's first line only names the class; the next says what differs
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), first_line(e))
        raise DiffexpError(f"checkpoint={source.checkpoint}: its EMA weights do not fit the run's network ({detail})") from None
    return DiffexpPipeline(unet=denoiser.eval(), scheduler=sampler, vae=vae, num_classes=num_classes, class_names=names)


def built_parts(run: RunDir) -> tuple:
    """(network, sampler, autoencoder or None, number of classes and class names or None) of a run without ``model/``, built
    from its config as training built them (the network's weights are the initial ones)."""
    from diffexp.data.latents import trained_autoencoder
    from diffexp.models.build import build_model, build_sampler, resolve_sampler

    cfg = run.config()
    conditional = (cfg.get("conditioning") or {}).get("kind", "none") == "class"
    names = [str(n) for n in run.info().get("class_names") or []] if conditional else None
    vae = trained_autoencoder(cfg)
    if vae is None:
        channels, size = int(cfg.dataset.channels), int(cfg.dataset.resolution)
    else:
        channels = int(vae.config.latent_channels)
        size = int(cfg.dataset.resolution) // 2 ** (len(vae.config.block_out_channels) - 1)
    denoiser = build_model(cfg.model, channels=channels, size=size, num_classes=len(names) if names else None)
    sampler = build_sampler(resolve_sampler(cfg.sampler, cfg.scheduler), cfg.scheduler, latent=vae is not None)
    return denoiser, sampler, vae, len(names) if names else None, names
