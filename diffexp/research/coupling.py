"""A fast sampler's images coupled to ancestral DDPM over every training step (the slow reference).

To tell whether a 20-step sampler is within a few percent of DDPM-1000, independent sample sets
are hopeless on a CPU: the FD of 2,000 digits varies by about 25% between sampling seeds, so a
±5% answer needs hundreds of DDPM-1000 sets. Both samplers integrate the same reverse SDE, so their
images can instead be driven by the same randomness (the coupling of multilevel Monte Carlo):

- both start from the same noise x_T (the reference's first draw for its seed);
- a stochastic sampler's step from timestep s down to t gets, as its ``variance_noise``, the
  reference's own draws z_k for its steps k = s, ..., t + 1, each weighted by what the exact linear
  part of the SDE carries of it to t, and normalised to unit variance.

With DDPM's posterior step x_{k-1} = a_k x_k + (x_0 term) + sqrt(v_k) z_k, draw z_k reaches t with the
weight sqrt(v_k) times a_j for every later step j = k - 1, ..., t + 1. The normalising sum of squares
equals the noise variance sigma_t^2 (1 - exp(-2h)) of DPM-Solver++ SDE's step (an exponential
integrator) over the same interval, so for it this is the Brownian path itself (tested). Disjoint
draws, unit variance: each sampler's images are distributed exactly as it samples alone (valid for
any sampler); only their pairing is new. A deterministic sampler, or one whose step takes no
``variance_noise``, shares x_T only (its own step noise comes from a separate generator).
The core pipeline takes x_T as ``latents=``; the step noise is handed to the sampler instance itself
(``fed_step_noise`` wraps its ``step``), so the pipeline knows nothing of the coupling.

Each image then has a twin, and quality differences are measured on pairs (``diffexp.research.paired``):
on the default run's cosine schedule, 88% of DPM-Solver++ SDE 20-step images show the same digit
as their DDPM-1000 twin.
"""

from __future__ import annotations

import contextlib
import inspect

import numpy as np
import torch
from diffusers import DDPMScheduler, SchedulerMixin
from tqdm.auto import tqdm

from diffexp import DiffexpError
from diffexp.sampling.generate import chunk_seed, chunk_sizes, make_pipeline, to_uint8

SEPARATE_STREAM = 1 << 62  # seed offset of noise not taken from the reference: off the chunk seeds' lattice


def reference_steps(reference: DDPMScheduler) -> int:
    """The reference's step count: every training timestep."""
    return int(reference.config.num_train_timesteps)


def check_reference(reference: SchedulerMixin) -> None:
    """The reference must be ancestral DDPM with its fixed posterior variance (what the weights assume)."""
    if not isinstance(reference, DDPMScheduler) or reference.config.variance_type not in ("fixed_small",
                                                                                           "fixed_small_log", None):
        raise DiffexpError(f"reference={type(reference).__name__} (variance_type="
                           f"{getattr(reference.config, 'variance_type', None)}): the coupled reference must be "
                           "DDPMScheduler with variance_type=fixed_small")


def draw_weights(reference: DDPMScheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, s)`` (float64, index = timestep k): DDPM's step from k to k - 1 is
    x_{k-1} = a_k x_k + (x_0 term) + s_k z_k (a_0 = 1, s_0 = 0: the last step adds no noise)."""
    ac = reference.alphas_cumprod.double()
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    a = (ac / prev).sqrt() * (1 - prev) / (1 - ac)
    s = ((1 - prev) / (1 - ac) * (1 - ac / prev)).clamp(min=0).sqrt()
    a[0], s[0] = 1.0, 0.0
    return a, s


def step_intervals(timesteps, total: int) -> list[tuple[int, int]]:
    """For each entry of a sampler's ``timesteps``, the reference draws its step noise is made of:
    steps k with ``lo < k <= hi`` (from its timestep to the next one; the last entry to timestep 0).
    Non-integer timesteps are rounded; a repeated timestep (Heun-type schedulers) gets none."""
    points = [min(int(round(float(t))), total - 1) for t in timesteps] + [0]
    return [(max(lo, 0), hi) for hi, lo in zip(points[:-1], points[1:])]


def interval_weights(reference: DDPMScheduler, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference steps k (lo < k <= hi) and what of their draws z_k reaches timestep lo:
    sqrt(v_k) a_{k-1} ... a_{lo+1} (not normalised: the root of their sum of squares is the noise's std there)."""
    a, s = draw_weights(reference)
    ks = np.arange(lo + 1, hi + 1)
    w = np.empty(len(ks))
    carried = 1.0
    for i, k in enumerate(ks):  # ascending k: the last draw of the interval first
        w[i] = carried * float(s[k])
        carried *= float(a[k])
    return ks, w


def noise_weights(reference: DDPMScheduler, timesteps) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per entry of a sampler's ``timesteps``: the reference steps whose draws make its step noise and
    their weights, normalised to unit norm (both empty where it gets none)."""
    out = []
    for lo, hi in step_intervals(timesteps, reference_steps(reference)):
        ks, w = interval_weights(reference, lo, hi)
        norm = float(np.sqrt((w * w).sum()))
        out.append((ks, w / norm) if norm > 0 else (ks[:0], w[:0]))
    return out


def takes_step_noise(sampler: SchedulerMixin) -> bool:
    """Whether ``sampler.step`` takes the step noise from outside (``variance_noise``)."""
    return "variance_noise" in inspect.signature(sampler.step).parameters


def coupled_noise(generator: torch.Generator, shape: tuple[int, ...], reference: DDPMScheduler,
                  weights: list[tuple[np.ndarray, np.ndarray]] | None) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """``(x_T, step_noise)`` from the draws the reference makes with ``generator``: x_T first, then one
    draw per step for timesteps T-1 .. 1 (``DDPMScheduler.step`` draws for t > 0), as
    ``DiffexpPipeline`` does with it. ``weights=None``: x_T only (and no step noise)."""
    x_t = torch.randn(shape, generator=generator)
    if weights is None:
        return x_t, None
    sums = [torch.zeros(shape, dtype=torch.float64) for _ in weights]
    owner = {int(k): (i, float(w)) for i, (ks, ws) in enumerate(weights) for k, w in zip(ks, ws)}
    for k in range(reference_steps(reference) - 1, 0, -1):
        z = torch.randn(shape, generator=generator)
        if k in owner:
            i, w = owner[k]
            sums[i] += w * z.double()
    fresh = torch.Generator().manual_seed(int(generator.initial_seed()) + SEPARATE_STREAM)
    return x_t, [sums[i].float() if len(ks) else torch.randn(shape, generator=fresh)
                 for i, (ks, _) in enumerate(weights)]


@contextlib.contextmanager
def fed_step_noise(sampler: SchedulerMixin, step_noise: list[torch.Tensor] | None):
    """Within the context, each call of ``sampler.step`` (this instance only) takes the next of
    ``step_noise`` as its ``variance_noise`` instead of drawing from the pipeline's generator: one noise
    tensor per entry of the sampler's ``timesteps``, in order. ``None``: the sampler is left alone."""
    if step_noise is None:
        yield sampler
        return
    noise = iter(step_noise)
    step = sampler.step

    def fed(model_output, timestep, sample, generator=None, **kwargs):  # noqa: ARG001 - instead of the generator
        # (DDIM refuses a generator and variance_noise at once)
        return step(model_output, timestep, sample, variance_noise=next(noise).to(sample.device), **kwargs)

    sampler.step = fed
    try:
        yield sampler
    finally:
        del sampler.step  # the class's own step again


@torch.inference_mode()
def coupled_generate(denoiser, reference: DDPMScheduler, sampler: SchedulerMixin, *, n: int, steps: int, seed: int,
                     batch_size: int = 256, progress: bool = False) -> np.ndarray:
    """``n`` uint8 images (N x H x W x C) of ``sampler`` in ``steps`` steps, image i the twin of image i of
    ``generate(denoiser, reference, n=n, steps=T, seed=seed, batch_size=batch_size)`` (same chunks,
    same chunk seeds). Unconditional pixel-space denoisers."""
    check_reference(reference)
    probe = make_pipeline(denoiser, sampler)
    sampler.set_timesteps(steps)
    weights = noise_weights(reference, sampler.timesteps) if takes_step_noise(sampler) else None
    chunks = []
    was_training = denoiser.training
    denoiser.eval()
    try:
        with tqdm(total=n, desc="coupled samples", unit="img", disable=not progress, leave=False) as bar:
            for c, count in enumerate(chunk_sizes(n, batch_size)):
                generator = torch.Generator("cpu").manual_seed(chunk_seed(seed, c))
                x_t, step_noise = coupled_noise(generator, probe.latent_shape(count), reference, weights)
                own = torch.Generator("cpu").manual_seed(chunk_seed(seed, c) + SEPARATE_STREAM)
                with fed_step_noise(sampler, step_noise):
                    out = probe(batch_size=count, num_inference_steps=steps, generator=own, latents=x_t,
                                output_type="np").images
                chunks.append(to_uint8(out))
                bar.update(count)
    finally:
        denoiser.train(was_training)
    return np.concatenate(chunks)
