"""``python -m diffexp.research.paired run=RUN_DIR [sampler=dpmpp_sde] [seeds=[0,1,2]]``: is a fast sampler within
``tolerance`` of ancestral DDPM over every training step, on the same run?

Examples::

    python -m diffexp.research.paired run=RUN_DIR                                   # the run's sampler, seed 0
    python -m diffexp.research.paired run=RUN_DIR sampler=ddim sampler.steps=20 seeds=[0,1,2]
    python -m diffexp.research.paired -m run=RUN_DIR sampler=dpmpp_sde,dpmpp sampler.steps=10,20

For each seed, ``metric.num_samples`` images come from DDPM over all T training steps (the images
``evaluate sampler=ddpm`` scores for that seed, sampled as it samples: bf16 autocast on a GPU; cached in
``RUN_DIR/paired/``, so they are made once per run, seed and count) and as many from the sampler, each
the coupled twin of a DDPM image (``diffexp.research.coupling``). The Fréchet distances (and, with the
digits network, the class-balanced one) of the pooled sets are compared as ``sampler / DDPM - 1`` with a
95% bootstrap interval over the pairs (of FD at the pooled count, whose small-sample bias dilutes
relative differences); the sampler is *within tolerance* of DDPM when the interval's upper end is at
most ``tolerance`` (worse by at most that; better is fine). Results accumulate in
``RUN_DIR/paired/results.json`` (the same sampler, steps, seeds, count and weights, hashed in ``weights``,
again replace their own entry) and are printed as JSON on the last line;
``python -m diffexp.research.paired_report RUN_OR_SWEEP_DIR...`` shows them over runs as one table.

The study stands apart from diffexp's core, which imports nothing of it: its files live under
``RUN_DIR/paired/`` (``paired_dir``), and the coupled step noise reaches the sampler through the sampler
instance's own ``step`` (``coupling.fed_step_noise``), not through the pipeline.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from diffexp import DiffexpError
from diffexp.config import CONFIG_PATH, report_errors
from diffexp.records.rundir import RunDir, now

log = logging.getLogger("diffexp.research.paired")
# What makes two results the same measurement: also the weights (a run re-exported after more training is
# another model) and the real set the features are compared with.
KEY = ("sampler", "sampler_options", "sampler_steps", "seeds", "num_samples", "network", "num_real", "weights")


def paired_dir(run: RunDir) -> Path:
    """Where the study keeps a run's results.json and cached DDPM images: ``RUN_DIR/paired/``."""
    return run.path / "paired"


def results_file(run: RunDir) -> Path:
    """The study's results of a run (``paired_results``)."""
    return paired_dir(run) / "results.json"


def paired_results(run: RunDir) -> list[dict]:
    """The results recorded in ``RUN_DIR/paired/results.json`` (one per sampler, steps, seeds, count and weights)."""
    path = results_file(run)
    return json.loads(path.read_text())["results"] if path.is_file() else []


def samples_in_bf16(device: torch.device | str) -> bool:
    """Whether evaluation samples under bf16 autocast on ``device`` (``sampling_precision``): the cached
    DDPM images are named by it, since bf16 gives other images than float32."""
    from diffexp.quality.evaluator import sampling_precision

    with sampling_precision(device):
        return torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16


def weights_digest(run: RunDir) -> str:
    """A short hash of the run's exported denoiser weights: cached reference images belong to them."""
    digest = hashlib.sha256()
    for path in sorted(p for p in run.model_dir.rglob("*") if p.suffix in (".safetensors", ".bin")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def reference_file(run: RunDir, *, steps: int, seed: int, n: int, batch_size: int, weights: str, bf16: bool) -> Path:
    """Where DDPM's ``n`` images of ``seed`` (chunks of ``batch_size``) are cached for the weights hashed
    ``weights``, sampled in float32 or (``bf16``, on a GPU) under bf16 autocast."""
    return paired_dir(run) / f"ddpm{steps}_seed{seed}_n{n}_b{batch_size}{'_bf16' if bf16 else ''}_{weights}.npz"


def reference_images(run: RunDir, denoiser, reference, *, seed: int, n: int, batch_size: int,
                     weights: str) -> np.ndarray:
    """DDPM's images over every training step for ``seed``: from the cache, else made (slow) and cached."""
    from diffexp.quality.evaluator import sampling_precision
    from diffexp.research.coupling import reference_steps
    from diffexp.sampling.generate import generate, save_grid, save_npz

    steps = reference_steps(reference)
    bf16 = samples_in_bf16(denoiser.device)  # the twins are made the same way
    path = reference_file(run, steps=steps, seed=seed, n=n, batch_size=batch_size, weights=weights, bf16=bf16)
    if path.is_file():
        log.info("DDPM-%d images of seed %d: cached in %s", steps, seed, path)
        return np.load(path)["images"]
    log.info("DDPM-%d images of seed %d: making %d (%d network evaluations each; cached in %s)",
             steps, seed, n, steps, path)
    with sampling_precision(denoiser.device):  # as evaluate samples: these are its images of the seed
        images = generate(denoiser, reference, n=n, steps=steps, seed=seed, batch_size=batch_size, progress=True)
    save_npz(path, images=images)  # atomic_path makes RUN_DIR/paired/
    save_grid(images[:64], path.with_suffix(".png"))
    return images


def fd_against(real: torch.Tensor):
    """``fd(features) -> float``: the Fréchet distance of a feature set against ``real`` (stats computed once)."""
    from diffexp.quality.stats import frechet_distance

    real = real.flatten(1).double()
    mu, cov = real.mean(0), torch.cov(real.T)

    def fd(features: torch.Tensor) -> float:
        features = features.flatten(1).double()
        return frechet_distance(features.mean(0), torch.cov(features.T), mu, cov)

    return fd


def relative_differences(real: torch.Tensor, real_logits: torch.Tensor | None, ref: tuple, cand: tuple, *,
                         resamples: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """``{kind: {reference, sampler, relative, low, high}}`` for ``fd`` (and ``fd_balanced`` with logits):
    each set's value, ``sampler / reference - 1`` and its 95% basic bootstrap interval over ``resamples``
    resamples of the pairs (pair i = ``ref[.][i]``, ``cand[.][i]``; (features, logits) each).

    Both are of FD at this many samples: its small-sample bias (about 13% of the default run's
    DDPM-1000 FD at 6,000 samples) is in both sets and dilutes a relative difference towards 0."""
    from diffexp.quality.stats import class_balanced_fd

    fd = fd_against(real)
    kinds = {"fd": lambda f, lg: fd(f)}
    if real_logits is not None:
        kinds["fd_balanced"] = lambda f, lg: class_balanced_fd(real, f, real_logits, lg)
    n = len(ref[0])
    generator = torch.Generator().manual_seed(seed)
    draws = [torch.randint(n, (n,), generator=generator) for _ in range(resamples)]
    out = {}
    for kind, stat in kinds.items():
        a, b = stat(*ref), stat(*cand)
        relative = b / a - 1
        boot = np.array([stat(cand[0][i], cand[1][i]) / stat(ref[0][i], ref[1][i]) - 1 for i in draws])
        # The basic interval (2 x estimate - percentiles): a resample repeats about a third of its pairs,
        # which adds FD's small-sample bias to both sets and pulls every resampled ratio towards 0; the
        # plain percentile interval would inherit that pull, this one reflects it back.
        q_low, q_high = np.percentile(boot, [2.5, 97.5])
        out[kind] = {"reference": a, "sampler": b, "relative": relative,
                     "low": float(2 * relative - q_high), "high": float(2 * relative - q_low)}
    return out


def paired(cfg: DictConfig) -> dict:
    """Compare ``cfg.sampler`` (default: the run's) with DDPM over every training step on coupled pairs;
    records and returns the result."""
    from accelerate import Accelerator

    from diffexp.data.datasets import load_images
    from diffexp.models.build import build_sampler, sampler_config
    from diffexp.quality.evaluator import Evaluator, features_of, metric_name, resolve_metric, sampling_precision
    from diffexp.quality.stats import class_mix_distance
    from diffexp.research.coupling import coupled_generate, reference_steps
    from diffexp.sampling.generate import check_steps, choose_sampler, load_run_model, network_evaluations, sampler_name

    run = RunDir(cfg.run).require()
    run_cfg = run.config()
    seeds = list(cfg.seeds) if OmegaConf.is_list(cfg.seeds) else [cfg.seeds]
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or len(set(seeds)) < len(seeds):
        raise DiffexpError(f"seeds={cfg.seeds}: expected a list of distinct integer sampling seeds, e.g. [0,1,2]")
    seeds = sorted(seeds)  # the pooled pairs, their bootstrap and the results key do not depend on the order typed
    if not isinstance(cfg.bootstrap, int) or cfg.bootstrap < 100:
        raise DiffexpError(f"bootstrap={cfg.bootstrap}: expected an integer number of resamples of at least 100")
    if not isinstance(cfg.tolerance, (int, float)) or cfg.tolerance <= 0:
        raise DiffexpError(f"tolerance={cfg.tolerance}: expected a positive fraction (0.05 = 5%)")
    metric_cfg = resolve_metric(cfg.metric, run_cfg.dataset)
    if metric_cfg.name == "none":
        raise DiffexpError("metric=none: paired needs a feature network (metric=auto)")
    reference = build_sampler(sampler_config("ddpm"), run_cfg.scheduler)  # refuses objectives DDPM cannot sample
    sampler_cfg, steps = choose_sampler(cfg.sampler, run_cfg)
    sampler = build_sampler(sampler_cfg, run_cfg.scheduler)
    check_steps(sampler, steps)
    n, batch_size = int(metric_cfg.num_samples), int(metric_cfg.batch_size)

    model = load_run_model(run, "cpu")
    if model.names is not None or model.vae is not None:
        raise DiffexpError(f"run={run.path}: paired compares unconditional pixel-space runs only")
    accelerator = Accelerator()
    if accelerator.num_processes > 1:
        raise DiffexpError(f"paired runs in one process (this launch has {accelerator.num_processes}): "
                           "use python -m diffexp.research.paired, not accelerate launch")
    denoiser = model.denoiser.to(accelerator.device)
    evaluator = Evaluator(metric_cfg, accelerator, load_images(run_cfg.dataset, cfg.cache_dir), run_cfg.dataset,
                          cfg.cache_dir)
    weights = weights_digest(run)  # once: the cache and the result name the same weights
    ref, cand = [], []
    for seed in seeds:
        images = reference_images(run, denoiser, reference, seed=seed, n=n, batch_size=batch_size, weights=weights)
        ref.append(features_of(evaluator.net, torch.from_numpy(images).permute(0, 3, 1, 2), int(metric_cfg.batch_size)))
        with sampling_precision(denoiser.device):
            twins = coupled_generate(denoiser, reference, sampler, n=n, steps=steps, seed=seed, batch_size=batch_size,
                                     progress=True)
        cand.append(features_of(evaluator.net, torch.from_numpy(twins).permute(0, 3, 1, 2), int(metric_cfg.batch_size)))
    ref = tuple(torch.cat(parts) for parts in zip(*ref))
    cand = tuple(torch.cat(parts) for parts in zip(*cand))
    diffs = relative_differences(evaluator.reference, evaluator.reference_logits, ref, cand,
                                 resamples=int(cfg.bootstrap))
    pairs = len(ref[0])
    net = metric_cfg.network
    result = {
        "sampler": sampler_name(sampler_cfg), "sampler_options": OmegaConf.to_container(sampler_cfg.scheduler, resolve=True),
        "sampler_steps": steps, "nfe": network_evaluations(sampler, steps),
        "reference": f"ddpm{reference_steps(reference)}", "seeds": seeds, "num_samples": n, "pairs": pairs,
        "network": net, "num_real": evaluator.num_real, "weights": weights, "tolerance": float(cfg.tolerance),
        "bootstrap": int(cfg.bootstrap),
        "same_class": float((ref[1].argmax(1) == cand[1].argmax(1)).double().mean()) if net == "digits" else None,
        "metrics": {metric_name(kind, net, pairs): {**d, "within_tolerance": d["high"] <= cfg.tolerance}
                    for kind, d in diffs.items()},
        "at": now(),
    }
    if evaluator.reference_logits is not None:
        result["metrics"][metric_name("classmix", net, pairs)] = {
            "reference": class_mix_distance(ref[1], evaluator.reference_logits),
            "sampler": class_mix_distance(cand[1], evaluator.reference_logits)}
    run.keep_result(results_file(run), result, KEY, ordered=False)
    if result["same_class"] is not None:
        log.info("the two images of a pair show the same digit in %.1f%% of %d pairs (10%% by chance)",
                 100 * result["same_class"], pairs)
    for name, d in result["metrics"].items():
        if "relative" in d:
            log.info("%s: DDPM-%d %.4f, %s %d steps %.4f: %+.1f%% (95%% CI %+.1f%% .. %+.1f%%) -> %s", name,
                     reference_steps(reference), d["reference"], result["sampler"], steps, d["sampler"],
                     100 * d["relative"], 100 * d["low"], 100 * d["high"],
                     f"within {100 * cfg.tolerance:g}%" if d["within_tolerance"] else
                     f"not shown within {100 * cfg.tolerance:g}%")
    accelerator.end_training()
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="paired")
def main(cfg: DictConfig) -> None:
    with report_errors():
        result = paired(cfg)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
