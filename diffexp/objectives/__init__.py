"""Training objectives: what the loop asks of a noise schedule for one batch of clean images.

An objective turns clean images into the network's input, its noise-level conditioning, the
target it must output and a per-sample loss weight (``Noised``); the loop does the rest
(``loss = weight * |net(input, timestep) - target|^2``). Sampling is a diffusers scheduler's job,
built from the same config node by ``diffexp.models.build.build_sampler``; an objective names the
sampler classes that can integrate what it trains (``compatible_samplers``) and its default
(``default_sampler``, a ``conf/sampler`` option). A sampler class that serves several objectives
(DPM-Solver++ samples the DDPM family and the flow-matching path) gets what this objective's path
needs of it from ``sampler_settings(scheduler_cfg, accepted)``, where the objective defines one.

The three peers: ``ddpm.DDPMObjective`` (the DDPM family on diffusers' ``DDPMScheduler``),
``flow_matching.FlowMatching`` and ``edm.EDM``. A new objective is one file here and one
``conf/scheduler`` config whose ``_target_`` is its class.

For the likelihood (``diffexp.quality.likelihood``) each objective also states its probability-flow
ODE in its own parametrisation: ``ode_times(steps)`` (a grid of its time variable from the data end
to the noise end), ``velocity(net, x, time)`` (dx/dtime; ``net(x, timestep)`` is the raw network)
and ``prior_logp(x)`` (the log density of the noise end, per image, in nats).
"""

from __future__ import annotations

from dataclasses import dataclass

import math

import torch

LOSS_WEIGHTINGS = ("uniform", "min_snr")
TIME_DISTRIBUTIONS = ("uniform", "logit_normal")  # training-time densities (DDPM timesteps, flow-matching times)


@dataclass
class Noised:
    """One batch as the network sees it: input, noise-level conditioning, target, per-sample weight."""

    model_input: torch.Tensor
    timestep: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor | None  # None: uniform


def logit_normal(n: int, mean: float, std: float, device: torch.device) -> torch.Tensor:
    """``n`` draws of ``sigmoid(N(mean, std^2))`` in (0, 1) from the global RNG: SD3's training-time
    density, which flow matching's times and the DDPM family's timesteps share."""
    return torch.sigmoid(mean + std * torch.randn(n, device=device))


def gaussian_logp(x: torch.Tensor, std: float = 1.0) -> torch.Tensor:
    """Per-image log density (nats, float64) of ``x`` under N(0, std^2 I)."""
    x = x.double().flatten(1)
    return -0.5 * (x / std).square().sum(1) - x.shape[1] * (math.log(std) + 0.5 * math.log(2 * math.pi))
