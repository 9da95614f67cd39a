"""``model/``: what a finished run exports, a diffusers pipeline anyone can load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

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
                    class_names: list[str] | None = None) -> None:
    """``model/``: a diffusers pipeline of the EMA weights, the run's sampler and, for latent
    diffusion, the autoencoder (written atomically).

    An unconditional pixel-space model with a sampler that diffusers' ``DDPMPipeline`` runs as it
    is, is a plain ``DDPMPipeline`` folder. Any other is a ``DiffexpPipeline`` (class names in its
    config), whose code is copied beside the weights as ``pipeline.py``, so plain diffusers loads it
    with ``DiffusionPipeline.from_pretrained(model_dir, trust_remote_code=True)``. (diffusers'
    ``DiTPipeline`` is not used for class-conditional DiTs: it hard-codes ImageNet's null class,
    label 1000.) Either gives the images of ``diffexp.sample`` for the same seed.
    """
    num_classes = len(class_names) if class_names else None
    pipe = DiffexpPipeline(unet=denoiser, scheduler=sampler, vae=vae, num_classes=num_classes, class_names=class_names)
    plain_loop = type(sampler).__name__ in DDPM_PIPELINE_SAMPLERS
    with atomic_path(run.model_dir) as tmp:
        pipe.save_pretrained(tmp)
        index_file = tmp / "model_index.json"
        index = json.loads(index_file.read_text())
        if plain_loop and vae is None and num_classes is None and not is_transformer(denoiser):
            index = {k: v for k, v in index.items() if k not in ("vae", "num_classes", "class_names")}
            index["_class_name"] = "DDPMPipeline"
        else:
            shutil.copyfile(Path(pipeline_module.__file__), tmp / "pipeline.py")
            index["_class_name"] = ["pipeline", "DiffexpPipeline"]
        if type(sampler).__module__ == schedulers_module.__name__:  # a scheduler of diffexp's own
            shutil.copyfile(Path(schedulers_module.__file__), tmp / "scheduler" / "schedulers.py")
            index["scheduler"] = ["schedulers", type(sampler).__name__]
        index_file.write_text(json.dumps(index, indent=2) + "\n")
