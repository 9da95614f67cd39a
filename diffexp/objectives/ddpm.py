"""The DDPM family: a diffusers ``DDPMScheduler``'s betas (linear, scaled_linear, cosine, sigmoid),
with an epsilon, v or x_0 target (``scheduler.prediction_type``)."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from diffexp import DiffexpError
from diffexp.objectives import LOSS_WEIGHTINGS, Noised


class DDPMObjective:
    """The DDPM family (Ho et al. 2020) on a diffusers ``DDPMScheduler``: a uniform timestep,
    ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``, and the scheduler's ``prediction_type`` as
    target (epsilon, v = sqrt(abar) eps - sqrt(1 - abar) x_0, or x_0 itself), with uniform or
    min-SNR-gamma weights (Hang et al. 2023)."""

    # diffusers' compatibles of DDPMScheduler, but the EDM ones (which precondition the network's input
    # and output as EDM trains it) and the SDE one (which needs torchsde)
    compatible_samplers = tuple(n for n in DDPMScheduler._compatibles
                                if not n.startswith("EDM") and n != "DPMSolverSDEScheduler")
    default_sampler = "dpmpp_sde"

    def __init__(self, scheduler: DDPMScheduler, loss_weighting: str = "uniform", snr_gamma: float = 5.0):
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise DiffexpError(f"trainer.loss_weighting={loss_weighting}: expected one of {', '.join(LOSS_WEIGHTINGS)}")
        if loss_weighting == "min_snr" and not snr_gamma > 0:
            raise DiffexpError(f"trainer.snr_gamma={snr_gamma}: expected a positive number")
        self.scheduler = scheduler
        self.loss_weighting = loss_weighting
        self.snr_gamma = float(snr_gamma)

    def noise(self, clean: torch.Tensor, noise: torch.Tensor | None = None,
              timesteps: torch.Tensor | None = None) -> Noised:
        """A noised batch; draws its noise and timesteps (unless given) from the global RNG, which
        checkpoints save."""
        noise = torch.randn_like(clean) if noise is None else noise
        if timesteps is None:
            timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (clean.shape[0],),
                                      device=clean.device)
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
