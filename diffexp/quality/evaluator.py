"""Sample quality during training and for finished runs.

A feature network turns images into features and class logits: InceptionV3 (``network:
inception``, the papers' FID/IS/KID, weights not shipped) or the digits classifier shipped with
diffexp (``network: digits``, for digit datasets, on any machine). On its features:

- ``fd``: Fréchet distance (torchmetrics ``FrechetInceptionDistance`` with our features);
- ``fd_balanced``: the Fréchet distance with the samples reweighted to the real class mix
  (``diffexp.quality.stats.class_balanced_fd``; a classifier network only): the quality within the
  classes, without the chance class counts that dominate FD's spread over sampling seeds, and
  without any tilt of the class mix (which ``classmix`` measures);
- ``cs``: classifier score, IS-style (torchmetrics ``InceptionScore`` on the logits);
- ``kid``: kernel distance (torchmetrics ``KernelInceptionDistance``);
- ``pr``: improved precision and recall (Kynkäänniemi et al. 2019, ``diffexp.quality.stats``);
- ``classes``: class coverage, balance and confidence of the samples, the distance of their class
  mix from the real one (``classmix``, total variation), and, for class-conditional runs, the
  accuracy of the class asked for.

Names carry the network, so no number is mistaken for a paper's FID: Inception gives
``eval/fid_2k``, ``eval/is_2k``, ``eval/kid_2k``; the digits network ``eval/fd_digits_500``,
``eval/fd_digits_balanced_500``, ``eval/cs_digits_500``, ``eval/precision_digits_500``, ...

``nll: true`` (or ``metric=nll``, with no feature network) adds the negative log-likelihood in
bits/dim of training images, ``eval/nll_bpd_<n>`` (``diffexp.quality.likelihood``).

Under several processes, each generates whole chunks of the samples (``diffexp.sampling.generate``: chunk
``c`` has its own seed), the features are gathered in chunk order and the main process computes the
metrics once: the numbers do not depend on the number of processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm.auto import tqdm

from diffexp import DiffexpError
from diffexp.data.datasets import cache_key
from diffexp.quality.features.inception import WeightsMissing, how_to_get_weights, weights_available
from diffexp.quality.likelihood import check_nll_config, likelihood_scores, network_calls_per_image, nll_names
from diffexp.quality.stats import class_accuracy, class_balanced_fd, class_mix_distance, class_stats, precision_recall
from diffexp.records.rundir import atomic_path
from diffexp.sampling.generate import chunk_seed, chunk_sizes, generate_chunk, make_pipeline

log = logging.getLogger(__name__)

NETWORKS = ("digits", "inception")
METRICS = ("fd", "fd_balanced", "cs", "kid", "pr", "classes")
ALIASES = {"fid": "fd", "is": "cs"}  # the Inception names, as metric configs may list them
DEFAULTS = {  # per network, what ``metric=auto`` (and null keys) use
    # digits: 500 samples fit the default CPU run's 10% budget at two points (measured, BENCHMARKS.md)
    "digits": {"metrics": ["fd", "fd_balanced", "cs", "kid", "pr", "classes"], "num_samples": 500},
    "inception": {"metrics": ["fd", "cs"], "num_samples": 2000},
}
DIGIT_DATASETS = ("digits", "mnist")  # what the digits classifier was made for


def short_count(n: int) -> str:
    """A sample count as metric names carry it: 2000 -> '2k', 50000 -> '50k', 1500 -> '1.5k', 16 -> '16'."""
    if n >= 1000 and n % 100 == 0:
        return f"{n / 1000:g}k"
    return str(n)


def metric_name(kind: str, network: str, n: int) -> str:
    """``eval/<name>_<n>``: Inception keeps the papers' names (fid, is, kid); any other network's
    name is part of the metric's (``fd_digits``; ``fd_digits_balanced`` for ``fd_balanced``, so the
    name starts with the Fréchet distance's and sorts after the plain one)."""
    if kind == "fd_balanced":
        return f"eval/fd_{network}_balanced_{short_count(n)}"
    base = {"fd": "fid", "cs": "is"}.get(kind, kind) if network == "inception" else f"{kind}_{network}"
    return f"eval/{base}_{short_count(n)}"


def resolve_metric(metric_cfg: DictConfig, dataset_cfg: DictConfig) -> DictConfig:
    """A copy of ``metric_cfg`` with ``network: auto`` and null ``metrics``/``num_samples`` decided for
    the dataset (the digits network on digit datasets, Inception on the others); DiffexpError when
    the network does not fit the dataset or a setting is invalid. ``network: none`` (``metric=nll``):
    no sample metrics, only the likelihood."""
    cfg = OmegaConf.create(OmegaConf.to_container(metric_cfg, resolve=True))
    if cfg.name == "none":
        return cfg
    if cfg.get("nll", False) or cfg.get("network") == "none":
        check_nll_config(cfg)
    if cfg.get("network") == "none":
        if cfg.get("metrics") or not cfg.nll:
            raise DiffexpError(f"metric.network=none: no feature network for metric.metrics={list(cfg.metrics or [])}; "
                               "it measures only the likelihood (metric.nll=true)")
        return cfg
    with open_dict(cfg):
        if cfg.get("network", "inception") == "auto":
            digits = dataset_cfg.name in DIGIT_DATASETS and dataset_cfg.channels == 1
            cfg.network = "digits" if digits else "inception"
        cfg.network = cfg.get("network", "inception")  # configs saved before digits: Inception
        if cfg.network not in NETWORKS:
            raise DiffexpError(f"metric.network={cfg.network}: expected one of auto, {', '.join(NETWORKS)}")
        for key, value in DEFAULTS[cfg.network].items():
            if cfg.get(key) is None:
                cfg[key] = value
        cfg.metrics = [ALIASES.get(m, m) for m in cfg.metrics]
    unknown = [m for m in cfg.metrics if m not in METRICS]
    if unknown:
        raise DiffexpError(f"metric.metrics={list(cfg.metrics)}: unknown {unknown}; expected some of {METRICS} "
                           "(fid and is name fd and cs on Inception)")
    if cfg.network == "digits" and (dataset_cfg.name not in DIGIT_DATASETS or dataset_cfg.channels != 1):
        raise DiffexpError(f"metric={cfg.name}: its feature network is a digit classifier, which does not fit "
                           f"dataset={dataset_cfg.name} ({dataset_cfg.channels} channel(s)); use metric=fid_is "
                           "(Inception) or metric=auto")
    for kind in ("classes", "fd_balanced"):
        if kind in cfg.metrics and cfg.network != "digits":
            raise DiffexpError(f"metric.metrics: {kind} needs a classifier of the dataset's classes (network: digits), "
                               f"not {cfg.network}")
    if not isinstance(cfg.num_samples, int) or cfg.num_samples < 2:
        raise DiffexpError(f"metric.num_samples={cfg.num_samples}: need an integer of at least 2 generated images")
    if cfg.get("num_real") is not None and (not isinstance(cfg.num_real, int) or cfg.num_real < 2):
        raise DiffexpError(f"metric.num_real={cfg.num_real}: need an integer of at least 2 real images (or null: all)")
    k = cfg.get("pr_k", 3)
    if "pr" in cfg.metrics and not (isinstance(k, int) and 1 <= k < min(cfg.num_samples, cfg.get("num_real") or k + 1)):
        raise DiffexpError(f"metric.pr_k={k}: precision/recall needs 1 <= pr_k < metric.num_samples "
                           f"({cfg.num_samples}) and metric.num_real")
    return cfg


def load_feature_net(metric_cfg: DictConfig, accelerator: Accelerator) -> torch.nn.Module:
    """The (frozen, eval-mode) feature network of a resolved metric config on the accelerator's device.

    Inception weights are found (or downloaded) once by the main process; every process gets its
    answer, so all raise the same WeightsMissing together and none waits on the others.
    """
    if metric_cfg.network == "digits":
        from diffexp.quality.features.digits import WEIGHTS, load_digits_net
        from diffexp.records.rundir import file_sha256

        net = load_digits_net(accelerator.device)
        net.name, net.digest = "digits", file_sha256(WEIGHTS)
        return net
    from diffexp.quality.features.inception import InceptionNet, inception_weights

    answer: list = [None]
    if accelerator.is_main_process:
        try:
            answer = [("found", str(inception_weights(metric_cfg)))]
        except WeightsMissing as e:
            answer = [("missing", str(e))]
    found, value = broadcast_object_list(answer)[0]
    if found == "missing":
        raise WeightsMissing(value)
    return InceptionNet(Path(value)).to(accelerator.device).eval().requires_grad_(False)


@torch.inference_mode()
def features_of(net: torch.nn.Module, images_u8: torch.Tensor, batch_size: int, progress: bool = False,
                desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, logits)`` (float32, CPU) of uint8 N x C x H x W images, in batches on the network's device."""
    device = next(net.parameters()).device
    feats, logits = [], []
    with tqdm(total=len(images_u8), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, len(images_u8), batch_size):
            f, lg = net(images_u8[start:start + batch_size].to(device))
            feats.append(f.float().cpu())
            logits.append(lg.float().cpu())
            bar.update(min(batch_size, len(images_u8) - start))
    return torch.cat(feats), torch.cat(logits)


class Features(torch.nn.Module):
    """The feature extractor torchmetrics sees: features are computed once, by ``features_of``."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def training_rng_untouched():
    """A block whose use of torch's global random generators (``torch.manual_seed`` seeds the CPU's
    and every GPU's) is undone when it ends, on every device present: evaluation must leave the
    training's random streams exactly as they were."""
    gpus = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=gpus)


def sampling_precision(device: torch.device | str):
    """The numerics evaluation samples with on ``device``, as a context: bf16 autocast on a GPU,
    float32 elsewhere (CPU autocast would be slower). Only the sampling: the feature network stays float32."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda")


def score(metric_cfg: DictConfig, real: torch.Tensor, fake: torch.Tensor, fake_logits: torch.Tensor,
          labels: torch.Tensor | None = None, real_logits: torch.Tensor | None = None) -> dict[str, float]:
    """Every metric of ``metric_cfg.metrics`` of the generated set (features ``fake``, logits) against the
    real features (and, for ``fd_balanced`` and the class mix, the real logits ``real_logits``), named
    ``eval/<name>_<n>``. Random subsets (IS splits, KID subsets) are drawn from torch's global generator
    seeded with ``metric.seed`` inside ``training_rng_untouched``, which restores the training's state
    afterwards."""
    # Imported here, not at the top: torchmetrics brings scipy.signal (seconds of start-up) into
    # every command that imports the evaluator, most of which never score.
    from torchmetrics import Metric
    from torchmetrics.image import FrechetInceptionDistance, InceptionScore, KernelInceptionDistance

    n, net = len(fake), metric_cfg.network
    out: dict[str, float] = {}
    torchmetric: dict[str, Metric] = {}
    if "fd" in metric_cfg.metrics:
        torchmetric["fd"] = FrechetInceptionDistance(feature=Features(real.shape[1]), sync_on_compute=False)
    if "kid" in metric_cfg.metrics:
        subset = max(1, min(int(metric_cfg.get("kid_subset_size", 1000)), n, len(real)))
        torchmetric["kid"] = KernelInceptionDistance(feature=Features(real.shape[1]), subset_size=subset,
                                                     subsets=int(metric_cfg.get("kid_subsets", 100)),
                                                     sync_on_compute=False)
    for kind, metric in torchmetric.items():
        metric.update(real.double() if kind == "fd" else real, real=True)
        metric.update(fake.double() if kind == "fd" else fake, real=False)
    if "cs" in metric_cfg.metrics:
        splits = max(1, min(int(metric_cfg.get("is_splits", 10)), n))
        torchmetric["cs"] = InceptionScore(feature=Features(fake_logits.shape[1]), splits=splits, sync_on_compute=False)
        torchmetric["cs"].update(fake_logits)
    with training_rng_untouched():
        torch.manual_seed(int(metric_cfg.seed))
        for kind, metric in torchmetric.items():
            value = metric.compute()
            if isinstance(value, tuple):  # IS and KID: (mean, std over splits or subsets)
                out[metric_name(kind, net, n)] = float(value[0])
                out[metric_name(kind, net, n).replace(f"_{short_count(n)}", f"_std_{short_count(n)}")] = float(value[1])
            else:
                out[metric_name(kind, net, n)] = float(value)
    if "fd_balanced" in metric_cfg.metrics:
        if real_logits is None:
            raise ValueError("fd_balanced needs the real samples' logits (real_logits)")
        out[metric_name("fd_balanced", net, n)] = class_balanced_fd(real, fake, real_logits, fake_logits)
    if "pr" in metric_cfg.metrics:
        precision, recall = precision_recall(real, fake, k=int(metric_cfg.get("pr_k", 3)))
        out[metric_name("precision", net, n)], out[metric_name("recall", net, n)] = precision, recall
    if "classes" in metric_cfg.metrics:
        for key, value in class_stats(fake_logits).items():
            out[metric_name(key, net, n)] = value
        if real_logits is not None:
            out[metric_name("classmix", net, n)] = class_mix_distance(fake_logits, real_logits)
        if labels is not None:
            out[metric_name("class_acc", net, n)] = class_accuracy(fake_logits, labels)
    return out


def reference_features(net: torch.nn.Module, real_images_u8: torch.Tensor, *, metric_cfg: DictConfig,
                       dataset_cfg: DictConfig, cache_dir: str | Path, progress: bool = False) -> torch.Tensor:
    """Features (float32, CPU) of the real images, computed once and cached on disk under a key of
    everything they depend on (dataset config, the pixels' cache key: a local folder's file names, sizes
    and times and the preprocessing version; image count, network weights).

    ``metric.num_real`` images are a fixed random subset (all when null or larger than the dataset).
    """
    num_real = metric_cfg.get("num_real")
    n = len(real_images_u8) if not num_real else min(int(num_real), len(real_images_u8))
    key = {"dataset": OmegaConf.to_container(dataset_cfg, resolve=True), "num_images": n, "network": net.name,
           "weights_sha256": net.digest, "pixels": cache_key(dataset_cfg)}  # the images' content, preprocessing version
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / "metrics" / f"reference-{net.name}-{dataset_cfg.name}-{dataset_cfg.resolution}px-{n}-{digest}.pt"
    if path.is_file():
        log.info("reference statistics: cache hit %s", path)
        return torch.load(path, weights_only=True)["features"]
    t0 = time.perf_counter()
    order = torch.randperm(len(real_images_u8), generator=torch.Generator().manual_seed(0))[:n]
    features, _ = features_of(net, real_images_u8[order], int(metric_cfg.batch_size), progress, "reference images")
    with atomic_path(path) as tmp:
        torch.save({"features": features, "key": key}, tmp)
    log.info("reference statistics: %d real images in %.1fs, cached in %s", n, time.perf_counter() - t0, path)
    return features


class Evaluator:
    """Scores a denoiser's samples: ``metric.num_samples`` images from the given sampler, against the
    dataset's reference features. Call it on every process; every process gets the result."""

    def __init__(self, metric_cfg: DictConfig, accelerator: Accelerator, real_images_u8: torch.Tensor,
                 dataset_cfg: DictConfig, cache_dir: str | Path):
        self.cfg = metric_cfg
        self.accelerator = accelerator
        self.nll = bool(metric_cfg.get("nll", False))
        self.real = real_images_u8 if self.nll else None  # the likelihood's images
        self.num_samples = int(metric_cfg.num_samples) if metric_cfg.metrics else 0
        self.net = self.reference = self.reference_logits = self.num_real = None
        if not metric_cfg.metrics:  # metric=nll: no feature network, nothing sampled
            return
        self.net = load_feature_net(metric_cfg, accelerator)
        if accelerator.is_main_process:  # the metrics are computed there, once
            self.reference = reference_features(self.net, real_images_u8, metric_cfg=metric_cfg,
                                                dataset_cfg=dataset_cfg, cache_dir=cache_dir, progress=True)
            if len(self.reference) < 2:
                raise DiffexpError(f"metric.num_real={metric_cfg.get('num_real')}: need at least 2 real images")
            if metric_cfg.network == "digits":  # its logits are a linear map of its features
                with torch.inference_mode():
                    self.reference_logits = self.net.head(self.reference.to(accelerator.device)).float().cpu()
        self.num_real = broadcast_object_list([None if self.reference is None else len(self.reference)])[0]

    def names(self) -> list[str]:
        """The metric names this evaluator logs (for W&B's summaries and the default comparison)."""
        names = [metric_name(k, self.cfg.network, self.num_samples) for k in ("fd", "cs", "kid") if k in self.cfg.metrics]
        if self.nll:
            names += list(nll_names(self.cfg, short_count(min(int(self.cfg.nll_images), len(self.real)))).values())
        return names

    def score_images(self, images_u8: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
        """Scores of given uint8 images (N x H x W x C; ``labels``: the classes asked for, if any),
        computed on the main process and handed to every process, with ``eval/seconds``. The likelihood
        is a model's, not images': ``metric.nll`` is ignored here."""
        if not self.cfg.metrics:
            raise DiffexpError(f"metric={self.cfg.name}: scores a run's model; images=FILE needs sample metrics "
                               "(e.g. metric=auto)")
        t0 = time.perf_counter()
        results = None
        if self.accelerator.is_main_process:
            fake, logits = features_of(self.net, torch.from_numpy(images_u8).permute(0, 3, 1, 2),
                                       int(self.cfg.batch_size), progress=True)
            results = score(self.cfg, self.reference, fake, logits,
                            None if labels is None else torch.as_tensor(labels).long(), self.reference_logits)
        results = broadcast_object_list([results])[0]
        results["eval/seconds"] = time.perf_counter() - t0
        if self.accelerator.is_main_process:
            log.info("evaluation of %d given images: %s", len(images_u8),
                     ", ".join(f"{k}={v:.4g}" for k, v in results.items() if k != "eval/seconds"))
        return results

    def __call__(self, denoiser, sampler, steps: int, *, vae=None, num_classes: int | None = None,
                 guidance_scale: float = 1.0, objective=None, guide=None, guidance_interval=None) -> dict[str, float]:
        """Scores of ``denoiser`` sampled with ``sampler`` in ``steps`` steps (autoguided by ``guide``,
        guided only within ``guidance_interval``), with ``eval/seconds``; with ``metric.nll``, also its
        likelihood of training images under ``objective`` (what it was trained with).

        A class-conditional denoiser (``num_classes``) is asked for every class in turn (sample i
        is of class i mod num_classes), with ``guidance_scale``: classifier-free, or autoguidance by
        the ``guide`` denoiser when one is given, within ``guidance_interval`` (``generate.generate``).
        """
        results = {}
        t0 = time.perf_counter()
        if self.cfg.metrics:
            results.update(self.sample_scores(denoiser, sampler, steps, vae=vae, num_classes=num_classes,
                                              guidance_scale=guidance_scale, guide=guide,
                                              guidance_interval=guidance_interval))
        if self.nll:
            if vae is not None:
                raise DiffexpError("metric.nll=true: bits/dim are of pixels; this run diffuses latents (autoencoder)")
            if objective is None:
                raise ValueError("metric.nll needs the objective the denoiser was trained with")
            results.update(likelihood_scores(self.cfg, objective, denoiser, self.real, self.accelerator, num_classes))
            if self.accelerator.is_main_process:
                log.info("likelihood of %d training images took %.1fs: %s", min(int(self.cfg.nll_images), len(self.real)),
                         results["eval/nll_seconds"],
                         ", ".join(f"{k}={v:.4g}" for k, v in results.items() if k.startswith("eval/nll_bpd")))
        results["eval/seconds"] = time.perf_counter() - t0
        return results

    def sample_scores(self, denoiser, sampler, steps: int, *, vae=None, num_classes: int | None = None,
                      guidance_scale: float = 1.0, guide=None, guidance_interval=None) -> dict[str, float]:
        """The sample metrics of ``__call__``."""
        acc = self.accelerator
        t0 = time.perf_counter()
        pipe = make_pipeline(denoiser, sampler, vae, num_classes, guide)
        sizes = chunk_sizes(self.num_samples, int(self.cfg.batch_size))
        starts = [sum(sizes[:c]) for c in range(len(sizes))]
        mine = []
        was_training = denoiser.training
        denoiser.eval()
        with tqdm(total=self.num_samples, desc="evaluation samples", unit="img", leave=False,
                  disable=not acc.is_main_process) as bar:
            for c in range(acc.process_index, len(sizes), acc.num_processes):
                labels = None if not num_classes else torch.arange(starts[c], starts[c] + sizes[c]) % num_classes
                with sampling_precision(acc.device):
                    images = generate_chunk(pipe, count=sizes[c], steps=steps, seed=chunk_seed(self.cfg.seed, c),
                                            labels=labels, guidance_scale=guidance_scale,
                                            guidance_interval=guidance_interval)
                feats, logits = features_of(self.net, torch.from_numpy(images).permute(0, 3, 1, 2),
                                            int(self.cfg.batch_size))
                mine.append((c, feats, logits, labels))
                bar.update(sizes[c] * acc.num_processes)
        denoiser.train(was_training)
        t_sampled = time.perf_counter()
        gathered = sorted(gather_object(mine) if acc.num_processes > 1 else mine, key=lambda item: item[0])
        results = None
        if acc.is_main_process:
            fake = torch.cat([f for _, f, _, _ in gathered])
            logits = torch.cat([lg for _, _, lg, _ in gathered])
            labels = torch.cat([lb for _, _, _, lb in gathered]) if num_classes else None
            results = score(self.cfg, self.reference, fake, logits, labels, self.reference_logits)
        results = broadcast_object_list([results])[0]
        elapsed = time.perf_counter() - t0
        results["eval/seconds"] = elapsed
        if acc.is_main_process:
            log.info("evaluation of %d samples (%d steps) took %.1fs (sampling and features %.1fs): %s",
                     self.num_samples, steps, elapsed, t_sampled - t0,
                     ", ".join(f"{k}={v:.4g}" for k, v in results.items() if k != "eval/seconds"))
        return results


def make_evaluator(cfg: DictConfig, accelerator: Accelerator, real_images_u8: torch.Tensor, *,
                   evaluates: bool) -> Evaluator | None:
    """The in-training evaluator for ``cfg.metric`` (resolved), or None when no evaluation will run.

    None for ``metric=none``, when no settings of the session evaluate (``evaluates``: some
    ``trainer.eval_every`` in force is not 0; nothing is loaded then; without
    Inception weights one line says what evaluating would need), and, with
    ``metric.required=false``, when the Inception weights are missing: one warning line, and
    training goes on without metrics. ``metric.required=true`` raises that line instead.
    """
    metric = cfg.metric
    if metric.name == "none":
        return None
    if not evaluates:
        # Nothing is loaded; but an offline user should learn now, in one line, what evaluation will need.
        if accelerator.is_main_process and metric.network == "inception" and not weights_available(metric):
            log.warning("%s not evaluated during training (trainer.eval_every=0); to evaluate, %s, then set "
                        "trainer.eval_every=N or run python -m diffexp.evaluate", metric_label(metric),
                        how_to_get_weights())
        return None
    try:
        with training_rng_untouched():  # building a network draws its (then overwritten) initial weights
            return Evaluator(metric, accelerator, real_images_u8, cfg.dataset, cfg.cache_dir)
    except WeightsMissing as e:
        if metric.get("required", False):
            raise
        if accelerator.is_main_process:
            log.warning("%s; training continues without %s (metric.required=true makes this an error)",
                        e, metric_label(metric))
        return None


def metric_label(metric_cfg: DictConfig) -> str:
    """``FID/IS`` for the Inception metrics of a config, for messages."""
    return "/".join({"fd": "FID", "cs": "IS", "kid": "KID", "pr": "precision/recall"}.get(m, m)
                     for m in metric_cfg.metrics if m != "classes")


def count_flops(fn) -> int:
    """Floating-point operations of one call of ``fn`` (torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def auto_eval_every(*, max_steps: int, budget: float, train_flops_per_step: float, eval_flops: float,
                    multiple_of: int = 1) -> int:
    """The smallest evaluation interval (a multiple of ``multiple_of``, so evaluations land on log
    steps) whose evaluations, every interval and at the last step, cost at most ``budget`` x the
    training's floating-point operations; ``max_steps`` (only the final evaluation) when even one
    costs more."""
    affordable = math.floor(budget * max_steps * train_flops_per_step / eval_flops)
    if affordable < 2:
        return max_steps
    every = math.ceil(max_steps / affordable)  # then ceil(max_steps / every) <= affordable evaluations
    every = math.ceil(every / max(1, multiple_of)) * max(1, multiple_of)
    return min(every, max_steps)


def evaluation_interval(cfg: DictConfig, t: DictConfig, evaluator: Evaluator, net: torch.nn.Module, sampler,
                        data, objective=None) -> int:
    """``trainer.eval_every``, with ``auto`` turned into the interval at which evaluations cost
    ``metric.budget`` of the training's floating-point operations (counted on one image: the
    denoiser's forward and backward, and per evaluation ``metric.num_samples`` x the sampler's
    network evaluations (twice with guidance), the decoder of latents and the feature network; with
    ``metric.nll``, the likelihood's network calls per image x ``metric.nll_images``).
    ``t``: the trainer settings in force; ``data``: the loop's ``TrainingData``; ``objective``: the training's."""
    from diffexp.models.build import resolve_sampler
    from diffexp.sampling.pipeline import call_denoiser

    if t.eval_every != "auto":
        return int(t.eval_every)
    device = next(net.parameters()).device
    x = torch.zeros(1, data.channels, data.size, data.size, device=device)
    step_t = torch.tensor([1], device=device)
    labels = torch.zeros(1, dtype=torch.long, device=device) if data.num_classes else None
    with training_rng_untouched():  # counting (dropout) must not draw from the training's random streams
        train_flops = count_flops(lambda: call_denoiser(net, x, step_t, labels).sum().backward()) * t.batch_size
        net.zero_grad(set_to_none=True)
        with torch.no_grad():
            forward = count_flops(lambda: call_denoiser(net, x, step_t, labels)) * (2 if data.num_classes else 1)
            decode = count_flops(lambda: data.vae.decode(x)) if data.vae is not None else 0
            features = count_flops(lambda: evaluator.net(data.real[:1].to(device))) if evaluator.net is not None else 0
    sampler.set_timesteps(resolve_sampler(cfg.sampler, cfg.scheduler).steps)
    nfe = len(sampler.timesteps)
    eval_flops = evaluator.num_samples * (nfe * forward + decode + features)
    nll_images = min(int(cfg.metric.nll_images), len(data.real)) if evaluator.nll else 0
    if evaluator.nll:  # the likelihood's network calls (unconditional: one forward each)
        eval_flops += nll_images * network_calls_per_image(cfg.metric, objective) * forward / (2 if data.num_classes else 1)
    every = auto_eval_every(max_steps=t.max_steps, budget=float(cfg.metric.budget), train_flops_per_step=train_flops,
                            eval_flops=eval_flops, multiple_of=t.log_every or 1)
    evaluations = t.max_steps // every + (t.max_steps % every != 0)
    likelihood = f" and the likelihood of {nll_images} images" if evaluator.nll else ""
    (log.info if evaluator.accelerator.is_main_process else log.debug)("evaluating every %d steps (trainer.eval_every=auto): %d evaluations of %d samples x %d network "
             "evaluations%s = %.1f%% of the training's compute (metric.budget=%g)", every, evaluations,
             evaluator.num_samples, nfe, likelihood, 100 * evaluations * eval_flops / (t.max_steps * train_flops),
             cfg.metric.budget)
    return every
