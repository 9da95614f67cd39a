"""Negative log-likelihood in bits per dimension (``eval/nll_bpd_<n>``), the metric that needs no
feature network: the same number means the same on every dataset and machine.

Two estimators, both upper bounds (in expectation) on the NLL of the data's 8-bit values:

- ``ode``: the exact likelihood of the probability-flow ODE (Song et al. 2021), for every objective.
  ``d/du [x, log p] = [f(x, u), -div f]`` is integrated with classic Runge-Kutta (RK4) in ``nll_steps``
  steps from the data to the noise end (the objective's ``ode_times``: evenly in ``ln sigma``), where the prior's
  density is known; ``div f`` is Hutchinson's estimate with ``nll_probes`` Rademacher probes per image
  (fixed for the whole path, drawn from the image chunk's seed). The data are dequantized uniformly,
  ``z = 2 (x + u) / 256 - 1`` with ``u ~ U[0, 1)``, and the change of variables counted: bits/dim
  = ``-log p(z) / (D ln 2) + 7`` (8 bits of the 256 bins, less 1 for [0, 1] -> [-1, 1]).
- ``vlb``: the variational bound of the DDPM family (Ho et al. 2020; Nichol & Dhariwal 2021): the
  prior term KL(q(x_T | x_0) || N(0, I)), the KL terms KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))
  and the discretized Gaussian decoder -log p(x_0 | x_1) on the 255-step bins of [-1, 1] (no
  dequantization). The reverse mean comes from the network's prediction (any prediction type; x_0
  clipped to [-1, 1] when the schedule's ``clip_sample`` is on), the reverse variance is the
  scheduler's fixed one (``variance_type``: ``fixed_small`` the posterior variance beta~_t,
  ``fixed_large`` beta_t; both with beta~_2 at t = 1, as Ho et al.'s code). With ``nll_vlb_terms: k``
  the T - 1 KL terms are estimated from k of them per image, one drawn in each of k equal strata
  and weighted (T - 1) / k: an unbiased estimate of the bound (null: all of them, the exact bound).

Images: ``nll_images`` of the training images (diffexp's datasets have no held-out split), a fixed
random subset (``metric.seed``), in chunks of ``nll_batch_size``; each chunk has its own seed, and
several processes split the chunks, so the numbers do not depend on the number of processes.
"""

from __future__ import annotations

import itertools
import logging
import math
import time

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from omegaconf import DictConfig
from tqdm.auto import tqdm

from diffexp import DiffexpError
from diffexp.sampling.generate import chunk_seed, chunk_sizes
from diffexp.sampling.pipeline import call_denoiser

log = logging.getLogger(__name__)

ESTIMATORS = ("ode", "vlb")
DEQUANTIZATION_BITS = 7.0  # log2(256) for the bins, less log2(2) for [0, 1] -> [-1, 1]
SOLVER = "rk4"
LN2 = math.log(2)


def dequantize(images_u8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Uniformly dequantized uint8 images on the model's [-1, 1] scale: ``2 (x + u) / 256 - 1``."""
    u = torch.rand(images_u8.shape, generator=generator, dtype=torch.float64)
    return (2 * (images_u8.double() + u) / 256 - 1).float()


def rademacher(shape: tuple, generator: torch.Generator) -> torch.Tensor:
    """Random signs (+1 / -1), float32."""
    return torch.randint(0, 2, shape, generator=generator).float() * 2 - 1


def velocity_and_divergence(objective, net, x: torch.Tensor, u: float, probes: torch.Tensor):
    """``(f(x, u), div f)`` with the divergence per image from Hutchinson's estimator
    ``mean_k z_k^T (df/dx) z_k`` (one vector-Jacobian product per probe; float64)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        f = objective.velocity(net, x, u)
        div = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for k, z in enumerate(probes):
            (vjp,) = torch.autograd.grad((f * z).sum(), x, retain_graph=k < len(probes) - 1)
            div += (vjp * z).flatten(1).sum(1).double()
    return f.detach(), div / len(probes)


def ode_log_likelihood(objective, net, x: torch.Tensor, *, steps: int, probes: torch.Tensor) -> torch.Tensor:
    """Per-image ``log p(x)`` (nats, float64) of continuous ``x`` at the objective's data end, by the
    probability-flow ODE: ``log p_0(x_0) = log p_T(x_T) + integral of div f``, classic Runge-Kutta (RK4,
    four network calls a step) in ``steps`` steps, ``probes`` (K x shape of x) for the divergence."""
    times = objective.ode_times(steps).tolist()
    total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for u0, u1 in itertools.pairwise(times):
        h = u1 - u0
        f1, d1 = velocity_and_divergence(objective, net, x, u0, probes)
        f2, d2 = velocity_and_divergence(objective, net, x + h / 2 * f1, u0 + h / 2, probes)
        f3, d3 = velocity_and_divergence(objective, net, x + h / 2 * f2, u0 + h / 2, probes)
        f4, d4 = velocity_and_divergence(objective, net, x + h * f3, u1, probes)
        x = x + h / 6 * (f1 + 2 * f2 + 2 * f3 + f4)
        total += h / 6 * (d1 + 2 * d2 + 2 * d3 + d4)
    return objective.prior_logp(x) + total


def normal_kl(mean1, var1, mean2, var2) -> torch.Tensor:
    """KL(N(mean1, var1) || N(mean2, var2)) elementwise (nats)."""
    return 0.5 * (var1 / var2 - 1 + (mean1 - mean2).square() / var2 + (var2 / var1).log())


def discretized_gaussian_nll(x0: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """-log of the probability (nats, elementwise) that N(mean, std^2) lands in ``x0``'s 8-bit bin:
    width 2/255 around x0, the outermost bins reaching to -inf and +inf (Ho et al. 2020, eq. 13)."""
    normal = torch.distributions.Normal(mean, std)
    upper = torch.where(x0 > 0.999, torch.ones_like(x0), normal.cdf(x0 + 1 / 255))
    lower = torch.where(x0 < -0.999, torch.zeros_like(x0), normal.cdf(x0 - 1 / 255))
    return -(upper - lower).clamp(min=1e-12).log()


def schedule(scheduler) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(beta_t, abar_t, abar_{t-1})`` per timestep in float64, abar from the betas (diffusers' float32
    alphas_cumprod puts 1 - abar_1 off beta_1 by ~1e-3 of it: enough to move the decoder's mean)."""
    betas = scheduler.betas.double()
    abar = torch.cumprod(1 - betas, 0)
    return betas, abar, torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])


def reverse_variances(scheduler) -> torch.Tensor:
    """The fixed reverse variance sigma_t^2 per timestep (float64): ``fixed_small`` (diffusers' default)
    the posterior variance beta~_t, ``fixed_large`` beta_t; at t = 1 (index 0) beta~_2, whose own beta~_1 is 0."""
    betas, abar, abar_prev = schedule(scheduler)
    posterior = betas * (1 - abar_prev) / (1 - abar)
    kind = scheduler.config.variance_type
    if kind in ("fixed_small", "fixed_small_log"):
        variance = posterior
    elif kind in ("fixed_large", "fixed_large_log"):
        variance = betas.clone()
    else:
        raise DiffexpError(f"scheduler.variance_type={kind}: the variational bound needs a fixed reverse variance "
                           "(fixed_small or fixed_large)")
    variance[0] = posterior[1]
    return variance


def bound_terms(objective, net, x0: torch.Tensor, steps: torch.Tensor, generator: torch.Generator,
                discrete: bool = True, batch: int = 256) -> torch.Tensor:
    """Per image, the bound's term at each timestep index of ``steps`` (B x k, nats, float64): the KL
    term for index i >= 1, the decoder -log p(x_0 | x_1) for i = 0 (discretized on the 8-bit bins, or
    the continuous Gaussian density when not ``discrete``). One noise draw per image and term; the
    terms go through the network several at a time, up to ``batch`` images a forward pass."""
    sch = objective.scheduler
    betas, abar, abar_prev = schedule(sch)
    variance, clip = reverse_variances(sch), bool(sch.config.get("clip_sample", False))
    out = torch.zeros(x0.shape[0], steps.shape[1], dtype=torch.float64)
    x0_64 = x0.double().cpu()
    view = (-1,) + (1,) * (x0.dim() - 1)
    per_pass = max(1, batch // x0.shape[0])
    for first in range(0, steps.shape[1], per_pass):
        columns = range(first, min(first + per_pass, steps.shape[1]))
        noised = []  # (a, s, x_t) of each term
        for j in columns:
            i = steps[:, j]
            a, s = abar[i].sqrt().view(view), (1 - abar[i]).sqrt().view(view)
            noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
            noised.append((a, s, (a * x0_64 + s * noise).float().double()))  # the maths uses the x_t the network sees
        xt_all = torch.cat([xt for _, _, xt in noised]).float().to(x0.device)
        preds = net(xt_all, steps[:, columns.start:columns.stop].T.reshape(-1).to(x0.device)).double().cpu()
        for j, (a, s, xt), pred in zip(columns, noised, preds.split(x0.shape[0])):
            i = steps[:, j]
            x0_hat = (xt - s * objective.predicted_noise(pred, xt, a, s)) / a
            if clip:
                x0_hat = x0_hat.clamp(-1, 1)
            c0 = (abar_prev[i].sqrt() * betas[i] / (1 - abar[i])).view(view)  # the posterior mean's coefficients
            ct = ((1 - betas[i]).sqrt() * (1 - abar_prev[i]) / (1 - abar[i])).view(view)
            mean = c0 * x0_hat + ct * xt
            var = variance[i].view(view)
            kl = normal_kl(c0 * x0_64 + ct * xt, (betas[i] * (1 - abar_prev[i]) / (1 - abar[i])).view(view), mean, var)
            if discrete:
                decoder = discretized_gaussian_nll(x0_64, mean, var.sqrt())
            else:
                decoder = 0.5 * ((x0_64 - mean).square() / var + var.log() + math.log(2 * math.pi))
            out[:, j] = torch.where(i > 0, kl.flatten(1).sum(1), decoder.flatten(1).sum(1))
    return out


def variational_bound(objective, net, x0: torch.Tensor, generator: torch.Generator, terms: int | None = None,
                      discrete: bool = True, batch: int = 256) -> torch.Tensor:
    """Per-image variational bound (nats, float64) of ``x0`` (on the [-1, 1] scale): prior term + KL
    terms + decoder. ``terms``: estimate the T - 1 KL terms from that many, one per stratum, each
    weighted (T - 1) / terms (unbiased); None: all of them. ``batch``: images per forward pass."""
    sch = objective.scheduler
    T = len(sch.alphas_cumprod)
    n = x0.shape[0]
    if terms is None or terms >= T - 1:
        kl_steps, weight = torch.arange(1, T).expand(n, T - 1), 1.0
    else:
        edges = torch.linspace(1, T, terms + 1, dtype=torch.float64)
        u = torch.rand(n, terms, generator=generator, dtype=torch.float64)
        kl_steps = (edges[:-1] + u * (edges[1:] - edges[:-1])).floor().long().clamp(1, T - 1)
        weight = (T - 1) / terms
    decoder = bound_terms(objective, net, x0, torch.zeros(n, 1, dtype=torch.long), generator, discrete, batch)[:, 0]
    kls = bound_terms(objective, net, x0, kl_steps, generator, discrete, batch).sum(1) * weight
    abar_T = schedule(sch)[1][-1]
    x = x0.double().cpu()
    prior = normal_kl(abar_T.sqrt() * x, 1 - abar_T, torch.zeros_like(x), torch.ones_like(x)).flatten(1).sum(1)
    return prior + kls + decoder


def check_nll_config(metric_cfg: DictConfig) -> None:
    """DiffexpError naming the first bad ``metric.nll_*`` setting."""
    if not isinstance(metric_cfg.get("nll"), bool):
        raise DiffexpError(f"metric.nll={metric_cfg.get('nll')}: expected true or false")
    for key, least in (("nll_images", 2), ("nll_steps", 1), ("nll_probes", 1), ("nll_batch_size", 1)):
        value = metric_cfg.get(key)
        if not isinstance(value, int) or value < least:
            raise DiffexpError(f"metric.{key}={value}: expected an integer of at least {least}")
    estimators = list(metric_cfg.get("nll_estimators") or [])
    if not estimators or any(e not in ESTIMATORS for e in estimators):
        raise DiffexpError(f"metric.nll_estimators={estimators}: expected some of {list(ESTIMATORS)}")
    terms = metric_cfg.get("nll_vlb_terms")
    if terms is not None and (not isinstance(terms, int) or terms < 1):
        raise DiffexpError(f"metric.nll_vlb_terms={terms}: expected a positive integer or null (all terms)")


def estimators_for(metric_cfg: DictConfig, objective) -> list[str]:
    """The estimators that apply to ``objective``: ``vlb`` only for the DDPM family (a discrete schedule)."""
    family = hasattr(objective, "scheduler") and hasattr(objective, "predicted_noise")
    return [e for e in metric_cfg.nll_estimators if e == "ode" or family]


def nll_names(metric_cfg: DictConfig, n: str) -> dict[str, str]:
    """``eval/nll_bpd_<n>`` (ODE) and ``eval/nll_bpd_vlb_<n>`` (bound) per estimator."""
    return {"ode": f"eval/nll_bpd_{n}", "vlb": f"eval/nll_bpd_vlb_{n}"}


def network_calls_per_image(metric_cfg: DictConfig, objective) -> float:
    """Forward-pass equivalents per image (a vector-Jacobian product counted as two forwards), for the budget."""
    calls = 0.0
    chosen = estimators_for(metric_cfg, objective)
    if "ode" in chosen:
        calls += 4 * int(metric_cfg.nll_steps) * (1 + 2 * int(metric_cfg.nll_probes))
    if "vlb" in chosen:
        T = len(objective.scheduler.alphas_cumprod)
        calls += 1 + min(T - 1, metric_cfg.get("nll_vlb_terms") or T)
    return calls


def describe(metric_cfg: DictConfig, objective) -> dict:
    """How the NLL was measured, for the results: estimators, dequantization, images, solver, probes, ..."""
    chosen = estimators_for(metric_cfg, objective)
    out = {"estimators": chosen, "images": "training", "num_images": int(metric_cfg.nll_images)}
    if "ode" in chosen:
        out.update(ode={"solver": SOLVER, "steps": int(metric_cfg.nll_steps), "probes": int(metric_cfg.nll_probes),
                        "probe": "rademacher", "dequantization": "uniform"})
    if "vlb" in chosen:
        out.update(vlb={"variance": objective.scheduler.config.variance_type, "decoder": "discretized",
                        "terms": metric_cfg.get("nll_vlb_terms")})
    return out


def chunk_nll(metric_cfg: DictConfig, objective, net, images_u8: torch.Tensor, chosen: list[str], seed: int,
              device) -> dict[str, torch.Tensor]:
    """Per-image bits/dim of one chunk of uint8 images (B x C x H x W) for each estimator in ``chosen``."""
    generator = torch.Generator().manual_seed(seed)
    dims = images_u8[0].numel()
    out = {}
    if "ode" in chosen:
        z = dequantize(images_u8, generator).to(device)
        probes = rademacher((int(metric_cfg.nll_probes), *z.shape), generator).to(device)
        logp = ode_log_likelihood(objective, net, z, steps=int(metric_cfg.nll_steps), probes=probes)
        out["ode"] = (-logp.cpu() / (dims * LN2) + DEQUANTIZATION_BITS)
    if "vlb" in chosen:
        with torch.no_grad():
            x0 = (images_u8.float() / 127.5 - 1).to(device)
            nats = variational_bound(objective, net, x0, generator, metric_cfg.get("nll_vlb_terms"),
                                     batch=int(metric_cfg.batch_size))
        out["vlb"] = nats / (dims * LN2)
    return out


def likelihood_scores(metric_cfg: DictConfig, objective, denoiser, real_images_u8: torch.Tensor,
                      accelerator: Accelerator, num_classes: int | None = None) -> dict[str, float]:
    """Mean bits/dim (``eval/nll_bpd_<n>``, ``eval/nll_bpd_vlb_<n>``) and its standard error over the images
    (``..._se_<n>``) of ``nll_images`` training images, with ``eval/nll_seconds``; every process takes part
    (each its share of the chunks) and gets the result. A class-conditional denoiser is asked for its
    null class: the unconditional likelihood."""
    from diffexp.quality.evaluator import short_count

    t0 = time.perf_counter()
    acc, n = accelerator, min(int(metric_cfg.nll_images), len(real_images_u8))
    chosen = estimators_for(metric_cfg, objective)
    order = torch.randperm(len(real_images_u8), generator=torch.Generator().manual_seed(int(metric_cfg.seed)))[:n]
    images = real_images_u8[order]
    sizes = chunk_sizes(n, int(metric_cfg.nll_batch_size))
    starts = [sum(sizes[:c]) for c in range(len(sizes))]

    def net(x, timestep):
        labels = None if not num_classes else torch.full((x.shape[0],), num_classes, device=x.device)
        return call_denoiser(denoiser, x, timestep, labels)

    was_training = denoiser.training
    denoiser.eval()
    mine = []
    with tqdm(total=n, desc="likelihood", unit="img", leave=False, disable=not acc.is_main_process) as bar:
        for c in range(acc.process_index, len(sizes), acc.num_processes):
            chunk = images[starts[c]:starts[c] + sizes[c]]
            mine.append((c, chunk_nll(metric_cfg, objective, net, chunk, chosen, chunk_seed(int(metric_cfg.seed), c),
                                      acc.device)))
            bar.update(sizes[c] * acc.num_processes)
    denoiser.train(was_training)
    gathered = sorted(gather_object(mine) if acc.num_processes > 1 else mine, key=lambda item: item[0])
    results = None
    if acc.is_main_process:
        names, results = nll_names(metric_cfg, short_count(n)), {}
        for e in chosen:
            bpd = torch.cat([per[e] for _, per in gathered]).double()
            results[names[e]] = float(bpd.mean())
            results[names[e].replace(f"_{short_count(n)}", f"_se_{short_count(n)}")] = float(bpd.std() / math.sqrt(n))
    results = broadcast_object_list([results])[0]
    results["eval/nll_seconds"] = time.perf_counter() - t0
    return results
