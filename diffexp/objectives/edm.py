"""EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"):
the sigma parameterisation with preconditioning, log-normal training noise levels and the loss
weight that makes every level count alike."""

from __future__ import annotations

import math

import torch

from diffexp import DiffexpError
from diffexp.objectives import Noised, gaussian_logp


class EDM:
    """``x = x_0 + sigma n`` with ``ln sigma ~ N(p_mean, p_std^2)``; the denoiser is
    ``D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)`` with

        c_in = 1 / sqrt(sigma^2 + sigma_data^2)       c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)
        c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)       c_noise = ln(sigma) / 4

    and the loss ``lambda(sigma) |D - x_0|^2`` with ``lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2``.
    The network F sees ``c_in x`` and ``c_noise`` and is trained towards
    ``(x_0 - c_skip x) / c_out``: then ``lambda |D - x_0|^2 = lambda c_out^2 |F - target|^2`` and
    ``lambda c_out^2 = 1``, a uniform weight. diffusers' EDM schedulers apply the same
    preconditioning when sampling (their ``epsilon`` prediction type is this F).
    ``sigma_min``, ``sigma_max`` and ``rho`` shape the sampling schedule.
    """

    compatible_samplers = ("EDMEulerScheduler", "EDMHeunScheduler", "EDMDPMSolverMultistepScheduler")
    default_sampler = "edm_dpmpp_sde"

    def __init__(self, sigma_data: float = 0.5, p_mean: float = -1.2, p_std: float = 1.2, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, rho: float = 7.0, prediction_type: str | None = None):
        if prediction_type is not None:
            raise DiffexpError(f"scheduler.prediction_type={prediction_type}: EDM trains its own preconditioned "
                               "target (Karras et al. 2022, eq. 8); prediction_type is for the DDPM family")
        if not (sigma_data > 0 and p_std > 0 and 0 < sigma_min < sigma_max and rho > 0):
            raise DiffexpError(f"scheduler: sigma_data={sigma_data}, p_std={p_std}, sigma_min={sigma_min}, "
                               f"sigma_max={sigma_max}, rho={rho}: expected positive values and sigma_min < sigma_max")
        self.sigma_data, self.p_mean, self.p_std = float(sigma_data), float(p_mean), float(p_std)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def sigmas(self, n: int, device: torch.device) -> torch.Tensor:
        """``n`` training noise levels, log-normal, from the global RNG."""
        return torch.exp(self.p_mean + self.p_std * torch.randn(n, device=device))

    def noise(self, clean: torch.Tensor, noise: torch.Tensor | None = None,
              sigma: torch.Tensor | None = None) -> Noised:
        """A noised, preconditioned batch; draws its noise and levels (unless given) from the global RNG."""
        noise = torch.randn_like(clean) if noise is None else noise
        sigma = self.sigmas(clean.shape[0], clean.device) if sigma is None else sigma
        s, sd = sigma.reshape(-1, 1, 1, 1), self.sigma_data
        x = clean + s * noise
        c_in = 1 / (s**2 + sd**2).sqrt()
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        return Noised(c_in * x, sigma.log() / 4, (clean - c_skip * x) / c_out, None)

    def ode_times(self, steps: int) -> torch.Tensor:
        """The ODE's time is ``ln sigma``, from ``sigma_min`` to ``sigma_max`` (the sampling range)."""
        return torch.linspace(math.log(self.sigma_min), math.log(self.sigma_max), steps + 1, dtype=torch.float64)

    def velocity(self, net, x: torch.Tensor, log_sigma: float) -> torch.Tensor:
        """``dx/du = x - D(x; sigma)`` for ``u = ln sigma`` (Karras et al. 2022, eq. 3: dx/dsigma = (x - D) / sigma)."""
        sigma, sd = math.exp(float(log_sigma)), self.sigma_data
        c_in, c_skip, c_out = 1 / math.sqrt(sigma**2 + sd**2), sd**2 / (sigma**2 + sd**2), sigma * sd / math.sqrt(sigma**2 + sd**2)
        out = net(c_in * x, torch.full((x.shape[0],), float(log_sigma) / 4, device=x.device))
        return x - (c_skip * x + c_out * out)

    def prior_logp(self, x: torch.Tensor) -> torch.Tensor:
        """N(0, sigma_max^2 I) (the data's own spread adds sigma_data^2 / sigma_max^2 ~ 4e-5 to the variance)."""
        return gaussian_logp(x, self.sigma_max)
