"""``DiffexpPipeline``: generation from a diffexp run with any diffusers scheduler.

This file depends only on torch and diffusers: the export copies it next to the weights as
``model/pipeline.py``, so a plain diffusers install loads the folder with
``DiffusionPipeline.from_pretrained(model_dir, trust_remote_code=True)``.

It is diffusers' ``DDPMPipeline`` loop plus what that loop leaves out: the scheduler's
``init_noise_sigma`` and ``scale_model_input`` (so Euler, Heun, LMS, EDM and flow-matching
schedulers give right images), class labels with classifier-free guidance, autoguidance by a
second, weaker denoiser (the optional ``guide``), guidance limited to an interval of the trajectory,
a transformer or a U-Net as the denoiser, and an optional autoencoder for latent diffusion. With a DDPM, DDIM or
DPM-Solver scheduler, an unconditional pixel-space run gives exactly ``DDPMPipeline``'s images.
"""

from __future__ import annotations

import inspect

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


def call_denoiser(model, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """``model(x, t, class_labels=labels).sample`` for a ``UNet2DModel`` or a DiT-style transformer
    (which needs labels even unconditional: its one constant class, 0)."""
    base = getattr(model, "module", model)  # through DistributedDataParallel and torch.compile wrappers
    base = getattr(base, "_orig_mod", base)
    if labels is None and "hidden_states" in inspect.signature(base.forward).parameters:
        labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    return model(x, t, class_labels=labels).sample[:, : x.shape[1]]


def in_interval(index: int, count: int, interval) -> bool:
    """Whether network evaluation ``index`` of the ``count`` a sampling makes is guided under
    ``guidance_interval`` ``interval`` (None: every one).

    The interval is a fraction of the sampling trajectory: evaluation ``index`` sits at ``index / count``
    (0: the first, at pure noise; just below 1: the last), and is guided when ``lo <= index / count < hi``.
    So ``[0, 1]`` guides every evaluation and ``[x, x]`` none. Kynkaanniemi et al. (2024) state their
    interval in EDM's sigma, (0.28, 5.42]; a fraction of the sampler's own evaluations means the same
    for every objective (DDPM timesteps, flow-matching t, EDM sigma) and every sampler (Heun's two
    evaluations a step, multistep solvers) without converting one noise parameterisation into another,
    which diffusers' schedulers do not expose alike. It depends on the sampler's spacing of noise levels:
    on EDM's 32-step rho=7 schedule from sigma 80 to 0.002, the paper's sigma interval is about [0.41, 0.71].
    """
    if interval is None:
        return True
    lo, hi = interval
    return lo <= index / count < hi


class DiffexpPipeline(DiffusionPipeline):
    """``unet`` (a ``UNet2DModel`` or a DiT-style transformer), ``scheduler`` (any diffusers
    scheduler), for latent diffusion ``vae`` (an ``AutoencoderKL``) and, for autoguidance, ``guide``
    (a weaker denoiser of the same kind of data: an earlier checkpoint or a smaller model).

    Class-conditional models take labels ``0 .. num_classes - 1``; label ``num_classes`` is the
    null class of classifier-free guidance (recorded as ``num_classes`` in the pipeline config).
    """

    model_cpu_offload_seq = "unet->guide->vae"
    _optional_components = ["vae", "guide"]

    def __init__(self, unet, scheduler, vae=None, guide=None, num_classes: int | None = None,
                 class_names: list[str] | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae, guide=guide)
        self.register_to_config(num_classes=num_classes, class_names=class_names)

    @property
    def labels(self) -> dict[str, int]:
        """Class name -> class id (as diffusers' DiTPipeline offers its ImageNet labels)."""
        return {name: i for i, name in enumerate(self.config.class_names or [])}

    def get_label_ids(self, names: str | list[str]) -> list[int]:
        """The class ids of class names (``pipe(class_labels=pipe.get_label_ids(["3", "7"]))``)."""
        names = [names] if isinstance(names, str) else names
        missing = [n for n in names if n not in self.labels]
        if missing:
            raise ValueError(f"{missing} are not among the classes: {sorted(self.labels)}")
        return [self.labels[n] for n in names]

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        """Shape of the tensor the denoiser works on (latents when there is a vae)."""
        c = self.unet.config
        size = c.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, c.in_channels, *size)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, model=None) -> torch.Tensor:
        """The raw output of the denoiser (or of ``model``, e.g. the guide) at timestep ``t`` (U-Nets and
        DiT-style transformers alike)."""
        return call_denoiser(model if model is not None else self.unet, x,
                             t.expand(x.shape[0]) if t.ndim else t.repeat(x.shape[0]), labels)

    def guided(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, scale: float) -> torch.Tensor:
        """The guided prediction at ``x`` (already scaled for the model) and ``t``: with a ``guide``,
        autoguidance ``guide + scale * (unet - guide)``, both asked for ``labels``; else classifier-free
        guidance ``uncond + scale * (cond - uncond)`` (``labels``: the null class for each image, then
        its class; ``x`` is evaluated once for each half).

        Guidance combines the raw outputs in the objective's parameterisation (epsilon, v, velocity,
        EDM's F): for fixed x and t each is an affine function of the denoised image D with the same
        coefficients for both models, and the weights (1 - scale, scale) sum to 1, so combining outputs
        is combining D (Karras et al. 2024, D = D_guide + w (D_main - D_guide)) exactly."""
        if self.guide is not None:
            main, weak = self.denoise(x, t, labels), self.denoise(x, t, labels, model=self.guide)
            return weak + scale * (main - weak)
        uncond, cond = self.denoise(torch.cat([x, x]), t, labels).chunk(2)
        return uncond + scale * (cond - uncond)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, num_inference_steps: int = 50,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 class_labels: torch.Tensor | list[int] | None = None, guidance_scale: float = 1.0,
                 output_type: str = "pil", return_dict: bool = True, latents: torch.Tensor | None = None,
                 guidance_interval: tuple[float, float] | None = None):
        """``batch_size`` images in ``num_inference_steps`` scheduler steps.

        ``class_labels`` (one per image) asks a class-conditional model for those classes. With
        ``guidance_scale`` != 1 the prediction is guided: by the pipeline's ``guide`` when it has one
        (autoguidance, ``guide + scale * (unet - guide)``, both models asked for the class; also for
        unconditional models), else, for a class-conditional model, classifier-free
        (``uncond + scale * (cond - uncond)``). ``guidance_interval`` ``(lo, hi)``: guide only the
        network evaluations in that fraction of the trajectory (``in_interval``; None: all of them).
        ``output_type``: ``"pil"``, ``"np"`` (floats in [0, 1], N x H x W x C) or ``"pt"``.
        ``latents``: the starting noise (unit variance) instead of drawing it from ``generator``.
        """
        device = self._execution_device
        conditional = self.config.num_classes is not None
        labels = None
        if conditional:
            if class_labels is None:
                raise ValueError("this model is class-conditional: pass class_labels")
            labels = torch.as_tensor(class_labels, device=device).long().reshape(-1)
            if labels.numel() != batch_size:
                raise ValueError(f"{labels.numel()} class_labels for batch_size={batch_size}")
            if bool((labels < 0).any() or (labels >= self.config.num_classes).any()):
                raise ValueError(f"class_labels must be in 0..{self.config.num_classes - 1}")
        elif class_labels is not None:
            raise ValueError("this model is unconditional: class_labels cannot be used")
        # w = 1 is the unguided model: no second evaluation (so the images are exactly the unguided ones)
        guiding = guidance_scale != 1.0 and (self.guide is not None or conditional)
        cfg = guiding and self.guide is None
        both = torch.cat([torch.full_like(labels, self.config.num_classes), labels]) if cfg else None

        dtype = next(self.unet.parameters()).dtype
        if latents is None:
            x = randn_tensor(self.latent_shape(batch_size), generator=generator, device=device, dtype=dtype)
        else:
            x = latents.to(device=device, dtype=dtype)
        # Flow-matching schedulers start from unit noise and feed the sample as it is (they have neither).
        x = x * getattr(self.scheduler, "init_noise_sigma", 1.0)
        scale = getattr(self.scheduler, "scale_model_input", lambda sample, t: sample)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        accepted = inspect.signature(self.scheduler.step).parameters
        step_kwargs = {"generator": generator} if "generator" in accepted else {}
        count = len(self.scheduler.timesteps)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            x_in = scale(x, t)
            if guiding and in_interval(i, count, guidance_interval):
                out = self.guided(x_in, t, both if cfg else labels, guidance_scale)
            else:
                out = self.denoise(x_in, t, labels)
            x = self.scheduler.step(out, t, x, **step_kwargs).prev_sample

        if self.vae is not None:
            x = self.vae.decode(x.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        image = (x / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            images = image
        else:
            images = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
