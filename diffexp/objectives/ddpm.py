"""The DDPM family: a diffusers ``DDPMScheduler``'s betas (linear, scaled_linear, cosine, sigmoid),
with an epsilon, v or x_0 target (``scheduler.prediction_type``)."""

from __future__ import annotations

import math

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from diffexp import DiffexpError
from diffexp.objectives import LOSS_WEIGHTINGS, TIME_DISTRIBUTIONS, Noised, gaussian_logp, logit_normal

ODE_SIGMA_MAX = 80.0  # the likelihood's ODE stops here (EDM's sampling range): x_0 is 1/80 of x there


class DDPMObjective:
    """The DDPM family (Ho et al. 2020) on a diffusers ``DDPMScheduler``: a timestep ``t``,
    ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``, and the scheduler's ``prediction_type`` as
    target (epsilon, v = sqrt(abar) eps - sqrt(1 - abar) x_0, or x_0 itself), with uniform or
    min-SNR-gamma weights (Hang et al. 2023).

    Timesteps are uniform (DDPM's), or with ``time_distribution="logit_normal"`` the integer part of
    ``T sigmoid(N(logit_mean, logit_std^2))``: flow matching's density (SD3) on the DDPM grid, which
    favours the middle timesteps (and, for a negative mean, the less noisy ones)."""

    # diffusers' compatibles of DDPMScheduler, but the EDM ones (which precondition the network's input
    # and output as EDM trains it) and the SDE one (which needs torchsde)
    compatible_samplers = tuple(n for n in DDPMScheduler._compatibles
                                if not n.startswith("EDM") and n != "DPMSolverSDEScheduler")
    default_sampler = "dpmpp_sde"

    def __init__(self, scheduler: DDPMScheduler, loss_weighting: str = "uniform", snr_gamma: float = 5.0,
                 time_distribution: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0):
        if time_distribution not in TIME_DISTRIBUTIONS:
            raise DiffexpError(f"trainer.time_distribution={time_distribution}: expected one of "
                               f"{', '.join(TIME_DISTRIBUTIONS)}")
        if not logit_std > 0:
            raise DiffexpError(f"trainer.logit_std={logit_std}: expected a positive number")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise DiffexpError(f"trainer.loss_weighting={loss_weighting}: expected one of {', '.join(LOSS_WEIGHTINGS)}")
        if loss_weighting == "min_snr" and not snr_gamma > 0:
            raise DiffexpError(f"trainer.snr_gamma={snr_gamma}: expected a positive number")
        self.scheduler = scheduler
        self.loss_weighting = loss_weighting
        self.snr_gamma = float(snr_gamma)
        self.time_distribution, self.logit_mean, self.logit_std = time_distribution, float(logit_mean), float(logit_std)

    def timesteps(self, n: int, device: torch.device) -> torch.Tensor:
        """``n`` training timesteps in [0, T), from the global RNG."""
        steps = self.scheduler.config.num_train_timesteps
        if self.time_distribution == "uniform":
            return torch.randint(0, steps, (n,), device=device)
        return (logit_normal(n, self.logit_mean, self.logit_std, device) * steps).long().clamp(max=steps - 1)

    def noise(self, clean: torch.Tensor, noise: torch.Tensor | None = None,
              timesteps: torch.Tensor | None = None) -> Noised:
        """A noised batch; draws its noise and timesteps (unless given) from the global RNG, which
        checkpoints save."""
        noise = torch.randn_like(clean) if noise is None else noise
        if timesteps is None:
            timesteps = self.timesteps(clean.shape[0], clean.device)
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

    def predicted_noise(self, out: torch.Tensor, x: torch.Tensor, a, s) -> torch.Tensor:
        """The noise the network's output ``out`` at ``x = a x_0 + s eps`` stands for, whatever its prediction type."""
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return out
        if kind == "v_prediction":  # v = a eps - s x_0, x = a x_0 + s eps
            return a * out + s * x
        return (x - a * out) / s

    def log_sigmas(self) -> torch.Tensor:
        """``ln sigma`` per training timestep (float64, increasing), ``sigma^2 = (1 - abar) / abar``; a zero-SNR
        last timestep (infinite sigma) is left out."""
        abar = self.scheduler.alphas_cumprod.double()
        return (0.5 * ((1 - abar) / abar).log())[abar > 0]

    def ode_times(self, steps: int) -> torch.Tensor:
        """The ODE's time is ``ln sigma``, from the first training timestep's to the last's or
        ``ODE_SIGMA_MAX``, whichever is lower (the cosine schedule's last sigma, 642, would spend a third
        of the steps where x is noise already)."""
        ls = self.log_sigmas()
        return torch.linspace(float(ls[0]), min(float(ls[-1]), math.log(ODE_SIGMA_MAX)), steps + 1, dtype=torch.float64)

    def velocity(self, net, x: torch.Tensor, log_sigma: float) -> torch.Tensor:
        """The VP probability-flow ODE in ``u = ln sigma``: ``dx/du = s (eps_hat - s x)`` with ``s = sqrt(1 - abar)``
        (from ``x = x_0 / sqrt(1 + sigma^2) + sigma eps / sqrt(1 + sigma^2)``); the network sees the
        fractional timestep whose sigma that is (linear in ``ln sigma`` between training timesteps)."""
        ls = self.log_sigmas()
        u = torch.tensor(float(log_sigma), dtype=torch.float64).clamp(ls[0], ls[-1])
        i = int(torch.searchsorted(ls, u).clamp(1, len(ls) - 1))
        timestep = (i - 1) + float((u - ls[i - 1]) / (ls[i] - ls[i - 1]))
        sigma = math.exp(float(u))
        a, s = 1 / math.sqrt(1 + sigma**2), sigma / math.sqrt(1 + sigma**2)
        out = net(x, torch.full((x.shape[0],), timestep, device=x.device))
        return s * (self.predicted_noise(out, x, a, s) - s * x)

    def prior_logp(self, x: torch.Tensor) -> torch.Tensor:
        """N(0, I): the VP marginal at the ODE's end (up to x_0 / sqrt(1 + sigma^2), at most 1/80)."""
        return gaussian_logp(x)
