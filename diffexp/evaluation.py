"""Sample-quality metrics (FID / IS / KID) during training and for finished runs.

One InceptionV3 pass per image serves every metric: torch-fidelity's ``FeatureExtractorInceptionV3``
(the reference network and resizing, ``pt_inception-2015-12-05`` weights, as pytorch-fid and the
papers use) gives the 2048-d pool features (FID, KID) and the unbiased logits (IS), and torchmetrics'
``FrechetInceptionDistance`` / ``InceptionScore`` / ``KernelInceptionDistance`` take those features
through an identity extractor, keep the statistics and synchronize them over processes. Doing the
Inception pass ourselves also lets the real-data features be cached on disk, and lets IS and KID use
a local weights file (torchmetrics builds their extractors without one).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from omegaconf import DictConfig, OmegaConf
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torchmetrics import Metric
from torchmetrics.image import FrechetInceptionDistance, InceptionScore, KernelInceptionDistance
from tqdm.auto import tqdm

from diffexp import DiffexpError, first_line
from diffexp.records import atomic_path
from diffexp.sampling import generate

log = logging.getLogger(__name__)

# evaluate(ema_unet, sampler, sampler_steps) -> {"eval/fid_2k": ..., ...}; called on every process.
Evaluator = Callable[..., dict]

EXTRACTOR = "torch-fidelity/inception-v3-compat"
POOL, LOGITS = "2048", "logits_unbiased"
METRICS = ("fid", "is", "kid")


class WeightsMissing(DiffexpError):
    """No InceptionV3 weights file could be found or downloaded."""


def short_count(n: int) -> str:
    """A sample count as metric names carry it: 2000 -> '2k', 50000 -> '50k', 1500 -> '1.5k', 16 -> '16'."""
    if n >= 1000 and n % 100 == 0:
        return f"{n / 1000:g}k"
    return str(n)


def hub_weights_file() -> Path:
    """Where torch hub caches the Inception weights (the file torch-fidelity downloads)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(URL_INCEPTION_V3)


def inception_weights(metric_cfg: DictConfig) -> Path:
    """The Inception weights file: ``metric.weights``, else the torch hub cache, else downloaded there.

    Raises WeightsMissing with one line that says how to provide the file.
    """
    how = (f"download {URL_INCEPTION_V3} once to {hub_weights_file()} (or to any file and pass "
           f"metric.weights=FILE)")
    if metric_cfg.get("weights"):
        path = Path(str(metric_cfg.weights)).expanduser()
        if not path.is_file():
            raise WeightsMissing(f"metric.weights={metric_cfg.weights}: no such file; {how}")
        return path
    cached = hub_weights_file()
    if cached.is_file():
        return cached
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(URL_INCEPTION_V3, str(cached), progress=False)
    except Exception as e:  # offline: urllib raises URLError, OSError, timeouts...
        raise WeightsMissing(f"Inception weights not in {cached} and the download failed "
                             f"({type(e).__name__}); {how}") from e
    return cached


def shared_weights(metric_cfg: DictConfig, accelerator: Accelerator) -> Path:
    """``inception_weights`` found (or downloaded) once by the main process; every process gets its answer.

    All processes raise the same WeightsMissing together, so none waits on the others.
    """
    answer: list = [None]
    if accelerator.is_main_process:
        try:
            answer = [("found", str(inception_weights(metric_cfg)))]
        except WeightsMissing as e:
            answer = [("missing", str(e))]
    found, value = broadcast_object_list(answer)[0]
    if found == "missing":
        raise WeightsMissing(value)
    return Path(value)


def load_inception(weights: Path, device: torch.device) -> FeatureExtractorInceptionV3:
    """torch-fidelity's InceptionV3 (its TF1-compatible resize to 299 px) giving pool features and logits."""
    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", [POOL, LOGITS], feature_extractor_weights_path=str(weights))
    except Exception as e:  # a truncated download or a file of the wrong network
        raise DiffexpError(f"metric.weights={weights}: not an InceptionV3 weights file ({type(e).__name__}: "
                           f"{first_line(e)[:200]})") from e
    return net.to(device)


def weights_digest(weights: Path) -> str:
    """sha256 of the weights file (part of the reference-statistics cache key)."""
    h = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@torch.inference_mode()
def inception_features(net: FeatureExtractorInceptionV3, images_u8: torch.Tensor, *, batch_size: int,
                       progress: bool = False, desc: str = "inception") -> tuple[torch.Tensor, torch.Tensor]:
    """(pool N x 2048, logits N x 1008) float32 features of uint8 N x C x H x W images.

    Grayscale is repeated to 3 channels; the extractor resizes to 299 px as the reference does.
    """
    device = next(net.parameters()).device
    pools, logits = [], []
    with tqdm(total=len(images_u8), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, len(images_u8), batch_size):
            batch = images_u8[start:start + batch_size].to(device)
            if batch.shape[1] == 1:
                batch = batch.expand(-1, 3, -1, -1)
            pool, logit = net(batch.contiguous())
            pools.append(pool.float())
            logits.append(logit.float())
            bar.update(len(batch))
    return torch.cat(pools), torch.cat(logits)


class Features(torch.nn.Module):
    """The feature extractor torchmetrics sees: features are computed once, by ``inception_features``."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def build_metrics(metric_cfg: DictConfig, num_fake: int, num_real: int) -> dict[str, Metric]:
    """torchmetrics objects for ``metric.metrics`` (fid, is, kid), taking precomputed features.

    Real features are kept across ``reset()`` (they are added once per run).
    """
    unknown = [m for m in metric_cfg.metrics if m not in METRICS]
    if unknown:
        raise DiffexpError(f"metric.metrics={list(metric_cfg.metrics)}: unknown {unknown}; expected some of {METRICS}")
    built: dict[str, Metric] = {}
    if "fid" in metric_cfg.metrics:
        built["fid"] = FrechetInceptionDistance(feature=Features(2048), reset_real_features=False)
    if "is" in metric_cfg.metrics:
        built["is"] = InceptionScore(feature=Features(1008), splits=max(1, min(metric_cfg.is_splits, num_fake)))
    if "kid" in metric_cfg.metrics:
        subset = min(metric_cfg.kid_subset_size, num_fake, num_real)
        built["kid"] = KernelInceptionDistance(feature=Features(2048), subsets=metric_cfg.kid_subsets,
                                               subset_size=max(1, subset), reset_real_features=False)
    return built


def add_features(metrics: dict[str, Metric], pool: torch.Tensor, logits: torch.Tensor | None, *, real: bool) -> None:
    """Feed features of real (reference) or generated images to every metric that uses them."""
    for name, metric in metrics.items():
        if name == "is":
            if not real:
                metric.update(logits)
        else:
            metric.update(pool, real=real)


def compute_metrics(metrics: dict[str, Metric], num_samples: int, seed: int = 0) -> dict[str, float]:
    """Synchronized values over all processes, named ``eval/<metric>_<n>``; resets the generated-image state.

    IS and KID draw random splits and subsets: they use their own seeded RNG, so an evaluation
    neither changes the training's random stream nor varies from call to call.
    """
    n = short_count(num_samples)
    out = {}
    for name, metric in metrics.items():
        with training_rng_untouched():
            torch.manual_seed(seed)
            value = metric.compute()
        if isinstance(value, tuple):  # IS and KID: (mean, std over subsets)
            out[f"eval/{name}_{n}"] = float(value[0])
            out[f"eval/{name}_std_{n}"] = float(value[1])
        else:
            out[f"eval/{name}_{n}"] = float(value)
        metric.reset()
    return out


def training_rng_untouched():
    """A block whose use of torch's global random generators (``torch.manual_seed`` seeds the CPU's
    and every GPU's) is undone when it ends, on every device present: evaluation must leave the
    training's random streams exactly as they were."""
    gpus = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=gpus)


def reference_key(dataset_cfg: DictConfig, num_images: int, weights: Path) -> dict:
    """What the reference statistics depend on: dataset config, resolution, image count, feature extractor."""
    return {"dataset": OmegaConf.to_container(dataset_cfg, resolve=True), "resolution": dataset_cfg.resolution,
            "num_images": num_images, "extractor": EXTRACTOR, "feature": POOL, "weights_sha256": weights_digest(weights)}


def reference_features(net: FeatureExtractorInceptionV3, real_images_u8: torch.Tensor, *, dataset_cfg: DictConfig,
                       num_real: int | None, weights: Path, cache_dir: str | os.PathLike, batch_size: int,
                       progress: bool = False) -> torch.Tensor:
    """Pool features (N x 2048, float32, CPU) of the real images, computed once and cached on disk.

    ``num_real`` images are a fixed random subset (all when None or larger than the dataset).
    """
    n = len(real_images_u8) if not num_real else min(int(num_real), len(real_images_u8))
    key = reference_key(dataset_cfg, n, weights)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / "metrics" / f"reference-{dataset_cfg.name}-{dataset_cfg.resolution}px-{n}-{digest}.pt"
    if path.is_file():
        log.info("reference statistics: cache hit %s", path)
        return torch.load(path)["features"]
    t0 = time.perf_counter()
    order = torch.randperm(len(real_images_u8), generator=torch.Generator().manual_seed(0))[:n]
    pool, _ = inception_features(net, real_images_u8[order], batch_size=batch_size, progress=progress,
                                 desc="reference images")
    pool = pool.cpu()
    with atomic_path(path) as tmp:
        torch.save({"features": pool, "key": key}, tmp)
    log.info("reference statistics: %d real images in %.1fs, cached in %s", n, time.perf_counter() - t0, path)
    return pool


class SampleEvaluator:
    """Generates ``metric.num_samples`` images (each process its share) and scores them against the reference."""

    def __init__(self, metric_cfg: DictConfig, accelerator: Accelerator, net: FeatureExtractorInceptionV3,
                 reference: torch.Tensor):
        self.cfg = metric_cfg
        self.accelerator = accelerator
        self.net = net
        self.num_samples = int(metric_cfg.num_samples)
        self.num_real = len(reference)
        rank, world = accelerator.process_index, accelerator.num_processes
        self.local_samples = self.num_samples // world + (rank < self.num_samples % world)
        self.metrics = {k: m.to(accelerator.device)
                        for k, m in build_metrics(metric_cfg, self.num_samples, len(reference)).items()}
        # Each process holds a disjoint share of the reference; the synced states cover it exactly once.
        add_features(self.metrics, reference[rank::world].to(accelerator.device), None, real=True)

    def __call__(self, unet, sampler, steps: int) -> dict[str, float]:
        """Scores of ``unet`` sampled with ``sampler`` in ``steps`` steps: ``{"eval/fid_2k": ..., "eval/seconds": ...}``."""
        acc = self.accelerator
        t0 = time.perf_counter()
        # bf16 autocast on GPU only: CPU autocast would be slower, and Inception stays in float32.
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=acc.device.type == "cuda"):
            images = generate(unet, sampler, n=self.local_samples, steps=steps,
                              seed=int(self.cfg.seed) + acc.process_index, batch_size=int(self.cfg.batch_size),
                              progress=acc.is_main_process)
        t_sampled = time.perf_counter()
        pool, logits = inception_features(self.net, torch.from_numpy(images).permute(0, 3, 1, 2),
                                          batch_size=int(self.cfg.batch_size), progress=acc.is_main_process,
                                          desc="inception")
        add_features(self.metrics, pool, logits, real=False)
        results = compute_metrics(self.metrics, self.num_samples, int(self.cfg.seed))
        elapsed = time.perf_counter() - t0
        results["eval/seconds"] = elapsed
        if acc.is_main_process:
            log.info("evaluation of %d samples (%d steps) took %.1fs (sampling %.1fs, inception + metrics %.1fs): %s",
                     self.num_samples, steps, elapsed, t_sampled - t0, elapsed - (t_sampled - t0),
                     ", ".join(f"{k}={v:.4g}" for k, v in results.items() if k != "eval/seconds"))
        return results


def build_evaluator(cfg: DictConfig, accelerator: Accelerator, real_images_u8: torch.Tensor,
                    dataset_cfg: DictConfig) -> SampleEvaluator:
    """The evaluator for ``cfg.metric`` against ``real_images_u8`` (raises WeightsMissing without weights)."""
    metric_cfg = cfg.metric
    if int(metric_cfg.num_samples) < 2:
        raise DiffexpError(f"metric.num_samples={metric_cfg.num_samples}: need at least 2 generated images")
    weights = shared_weights(metric_cfg, accelerator)
    net = load_inception(weights, accelerator.device)
    with accelerator.main_process_first():  # one reference computation; the others read the cache
        reference = reference_features(net, real_images_u8, dataset_cfg=dataset_cfg, num_real=metric_cfg.num_real,
                                       weights=weights, cache_dir=cfg.cache_dir, batch_size=int(metric_cfg.batch_size),
                                       progress=accelerator.is_main_process)
    if len(reference) < 2:
        raise DiffexpError(f"metric.num_real={metric_cfg.num_real}: need at least 2 real images")
    return SampleEvaluator(metric_cfg, accelerator, net, reference)


def make_evaluator(cfg: DictConfig, accelerator: Accelerator, real_images_u8: torch.Tensor) -> Evaluator | None:
    """The in-training evaluator for ``cfg.metric``, or None when no evaluation will run.

    None for ``metric=none``, for ``trainer.eval_every=0`` (nothing is loaded then; without weights one
    line says what evaluating would need), and, with
    ``metric.required=false``, when the Inception weights are missing: one warning line, and
    training goes on without metrics. ``metric.required=true`` raises that line instead.
    """
    if cfg.metric.name == "none":
        return None
    if not cfg.trainer.eval_every:
        # Nothing is loaded; but an offline user should learn now, in one line, what evaluation will need.
        if accelerator.is_main_process and not cfg.metric.get("weights") and not hub_weights_file().is_file():
            log.warning("%s not evaluated during training (trainer.eval_every=0); to evaluate, download %s once "
                        "to %s (or pass metric.weights=FILE), then set trainer.eval_every=N or run "
                        "python -m diffexp.evaluate", "/".join(m.upper() for m in cfg.metric.metrics),
                        URL_INCEPTION_V3, hub_weights_file())
        return None
    try:
        return build_evaluator(cfg, accelerator, real_images_u8, cfg.dataset)
    except WeightsMissing as e:
        if cfg.metric.required:
            raise
        if accelerator.is_main_process:
            log.warning("%s; training continues without %s (metric.required=true makes this an error)",
                        e, "/".join(m.upper() for m in cfg.metric.metrics))
        return None

