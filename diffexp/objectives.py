"""Training objectives: what the loop asks of a noise schedule for one batch of clean images.

An objective turns clean images into the network's input, its noise-level conditioning, the
target it must output and a per-sample loss weight (``Noised``); the loop does the rest
(``loss = weight * |net(input, timestep) - target|^2``). Sampling is the diffusers scheduler's
job, built from the same config node by ``diffexp.build.build_sampler``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from diffexp import DiffexpError

LOSS_WEIGHTINGS = ("uniform", "min_snr")


@dataclass
class Noised:
    """One batch as the network sees it: input, noise-level conditioning, target, per-sample weight."""

    model_input: torch.Tensor
    timestep: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor | None  # None: uniform


class DDPMObjective:
    """The DDPM family (Ho et al. 2020) on a diffusers ``DDPMScheduler``: a uniform timestep,
    ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``, and the scheduler's ``prediction_type`` as
    target (epsilon, v = sqrt(abar) eps - sqrt(1 - abar) x_0, or x_0 itself), with uniform or
    min-SNR-gamma weights (Hang et al. 2023)."""

    def __init__(self, scheduler: DDPMScheduler, loss_weighting: str = "uniform", snr_gamma: float = 5.0):
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise DiffexpError(f"trainer.loss_weighting={loss_weighting}: expected one of {', '.join(LOSS_WEIGHTINGS)}")
        if loss_weighting == "min_snr" and not snr_gamma > 0:
            raise DiffexpError(f"trainer.snr_gamma={snr_gamma}: expected a positive number")
        self.scheduler = scheduler
        self.loss_weighting = loss_weighting
        self.snr_gamma = float(snr_gamma)

    def noise(self, clean: torch.Tensor) -> Noised:
        """A noised batch; draws its noise and timesteps from the global RNG (saved in checkpoints)."""
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (clean.shape[0],), device=clean.device)
        noisy = self.scheduler.add_noise(clean, noise, timesteps)
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = self.scheduler.get_velocity(clean, noise, timesteps)
        else:  # "sample"
            target = clean
        return Noised(noisy, timesteps, target, self.weights(timesteps))

    def weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Per-sample weights: None (uniform) or min-SNR-gamma, which makes every target's loss weigh
        like min(SNR, gamma) x the x_0 error. For epsilon that is min(SNR, gamma) / SNR, whose limit at
        zero SNR (``rescale_betas_zero_snr``'s last timestep) is 1, not 0/0."""
        if self.loss_weighting == "uniform":
            return None
        snr = compute_snr(self.scheduler, timesteps)
        clipped = snr.clamp(max=self.snr_gamma)
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))
        if kind == "v_prediction":
            return clipped / (snr + 1)
        return clipped
