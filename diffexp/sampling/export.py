"""``model/``: what a finished run exports, a diffusers pipeline anyone can load, and the one way
diffexp loads it back (``load_pipeline``: weights and configs only, never code from the folder)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import diffusers
import torch
from diffusers import ModelMixin, SchedulerMixin

from diffexp import DiffexpError, first_line
from diffexp.models.build import is_transformer
from diffexp.records.rundir import RunDir, atomic_path
from diffexp.sampling import pipeline as pipeline_module
from diffexp.sampling import schedulers as schedulers_module
from diffexp.sampling.pipeline import DiffexpPipeline

# Samplers whose initial noise is unscaled and whose network input is the sample itself: the
# loop of diffusers' DDPMPipeline runs them as they are.
DDPM_PIPELINE_SAMPLERS = ("DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler",
                          "DPMSolverSinglestepScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler",
                          "PNDMScheduler")


def export_pipeline(denoiser: torch.nn.Module, sampler, run: RunDir, vae=None,
                    class_names: list[str] | None = None, guide: torch.nn.Module | None = None) -> None:
    """``model/``: a diffusers pipeline of the EMA weights, the run's sampler, for latent diffusion
    the autoencoder and, when given, a ``guide`` denoiser for autoguidance (written atomically; the
    pipeline sampled with ``guidance_scale=w`` then guides with it).

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
    with atomic_path(run.model_dir) as tmp:
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
