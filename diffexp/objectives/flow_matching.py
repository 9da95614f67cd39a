"""Flow matching / rectified flow (Lipman et al. 2023; Liu et al. 2023) as Stable Diffusion 3 trains
it (Esser et al. 2024): the straight path between data and noise, and its velocity as the target."""

from __future__ import annotations

import math

import torch

from diffexp import DiffexpError
from diffexp.objectives import TIME_DISTRIBUTIONS, Noised, gaussian_logp, logit_normal

ODE_SIGMAS = (0.002, 80.0)  # the likelihood's range of sigma = t / (1 - t): EDM's sampling range


class FlowMatching:
    """``x_t = (1 - t) x_0 + t eps``, target ``v = eps - x_0`` (dx_t/dt), uniform weight.

    Training times ``t`` in (0, 1) come from ``time_distribution``: ``uniform``, or ``logit_normal``
    (``sigmoid(N(logit_mean, logit_std^2))``, SD3's choice, which favours the middle of the path);
    then ``shift`` maps ``t -> shift t / (1 + (shift - 1) t)`` (more time at high noise for
    shift > 1), as diffusers' flow-matching samplers shift their inference times. The network sees
    ``t x num_train_timesteps``, the timesteps of those samplers.
    """

    compatible_samplers = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler",
                           "DPMSolverMultistepScheduler")
    default_sampler = "dpmpp_sde"  # the DDPM family's, on the flow path (sampler_settings)

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, time_distribution: str = "logit_normal",
                 logit_mean: float = 0.0, logit_std: float = 1.0, prediction_type: str | None = None):
        if prediction_type is not None:
            raise DiffexpError(f"scheduler.prediction_type={prediction_type}: flow matching always predicts the "
                               "velocity eps - x_0; prediction_type is for the DDPM family")
        if time_distribution not in TIME_DISTRIBUTIONS:
            raise DiffexpError(f"scheduler.time_distribution={time_distribution}: expected one of "
                               f"{', '.join(TIME_DISTRIBUTIONS)}")
        if not shift > 0 or not logit_std > 0:
            raise DiffexpError(f"scheduler.shift={shift}, scheduler.logit_std={logit_std}: both must be positive")
        self.num_train_timesteps, self.shift = int(num_train_timesteps), float(shift)
        self.time_distribution, self.logit_mean, self.logit_std = time_distribution, float(logit_mean), float(logit_std)

    @staticmethod
    def sampler_settings(scheduler_cfg, accepted) -> dict:
        """What a DPM-Solver++ sampler (``accepted``: its options) needs to sample this path: diffusers'
        flow sigmas ``t``, the velocity as ``flow_prediction``, and the training's ``shift``."""
        if "use_flow_sigmas" not in accepted:
            return {}
        return {"use_flow_sigmas": True, "prediction_type": "flow_prediction",
                "flow_shift": float(scheduler_cfg.get("shift", 1.0))}

    def times(self, n: int, device: torch.device) -> torch.Tensor:
        """``n`` training times in (0, 1), from the global RNG."""
        if self.time_distribution == "uniform":
            t = torch.rand(n, device=device)
        else:
            t = logit_normal(n, self.logit_mean, self.logit_std, device)
        return self.shift * t / (1 + (self.shift - 1) * t)

    def noise(self, clean: torch.Tensor, noise: torch.Tensor | None = None, t: torch.Tensor | None = None) -> Noised:
        """A noised batch; draws its noise and times (unless given) from the global RNG."""
        noise = torch.randn_like(clean) if noise is None else noise
        t = self.times(clean.shape[0], clean.device) if t is None else t
        t4 = t.reshape(-1, 1, 1, 1)
        noisy = (1 - t4) * clean + t4 * noise
        return Noised(noisy, t * self.num_train_timesteps, noise - clean, None)

    def ode_times(self, steps: int) -> torch.Tensor:
        """The ODE's time is ``ln sigma`` with ``sigma = t / (1 - t)`` (x_t / (1 - t) = x_0 + sigma eps),
        evenly spaced over ``ODE_SIGMAS``: the path's time ``t = sigmoid(ln sigma)`` runs from 0.002 to 0.988."""
        lo, hi = ODE_SIGMAS
        return torch.linspace(math.log(lo), math.log(hi), steps + 1, dtype=torch.float64)

    def velocity(self, net, x: torch.Tensor, log_sigma: float) -> torch.Tensor:
        """``dx/du = v t (1 - t)`` for ``u = ln sigma``, ``t = sigmoid(u)``, ``v`` the network's dx/dt."""
        t = 1 / (1 + math.exp(-float(log_sigma)))
        return t * (1 - t) * net(x, torch.full((x.shape[0],), t * self.num_train_timesteps, device=x.device))

    def prior_logp(self, x: torch.Tensor) -> torch.Tensor:
        """N(0, t^2 I) at the last time (the data's share, (1 - t) x_0, adds 1.5e-4 of the variance)."""
        hi = ODE_SIGMAS[1]
        return gaussian_logp(x, hi / (1 + hi))
