"""Datasets as preprocessed uint8 tensors, and deterministic batches drawn from them.

A dataset config names a loader (``loader._target_``) that returns raw images; ``load_images``
resizes and crops them once to the configured resolution and caches the result as a uint8
tensor keyed by the dataset config. Training then draws batches from that tensor, which sits on
the training device: small-image datasets fit easily, and an index gather per step is far faster
than any per-item DataLoader pipeline (see BENCHMARKS.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from diffexp import DiffexpError

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when preprocessing changes, so stale caches are not reused


# --- loaders: each returns a sequence of PIL images ------------------------------------------


def load_digits() -> list[Image.Image]:
    """scikit-learn's 1,797 8x8 handwritten digits, as grayscale PIL images (no network)."""
    from sklearn.datasets import load_digits as sklearn_digits

    pixels = np.round(sklearn_digits().images * (255.0 / 16.0)).astype(np.uint8)
    return [Image.fromarray(p, mode="L") for p in pixels]


def load_imagefolder(path: str) -> Sequence[Image.Image]:
    """Every image under ``path``, read with the 🤗 datasets ``imagefolder`` builder."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DiffexpError(f"dataset.path={path}: no such directory (dataset=imagefolder needs a folder of images)")
    import datasets

    try:
        ds = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
    except (FileNotFoundError, ValueError) as e:
        raise DiffexpError(f"dataset.path={path}: no images could be read there ({e})") from e
    return ds["image"]


def load_hub(repo: str, split: str = "train", image_column: str = "image", subset: str | None = None) -> Sequence[Image.Image]:
    """Images of a 🤗 hub dataset, from the local hub cache when offline."""
    import datasets

    try:
        ds = datasets.load_dataset(repo, subset, split=split)
    except Exception as e:  # datasets raises many types for "not cached and not reachable"
        raise DiffexpError(
            f"dataset {repo} (split {split}) is neither cached nor reachable ({type(e).__name__}); "
            f"download it once with network access, or use dataset=imagefolder dataset.path=DIR or dataset=digits"
        ) from e
    if image_column not in ds.column_names:
        raise DiffexpError(f"dataset.loader.image_column={image_column}: {repo} has columns {ds.column_names}")
    return ds[image_column]


# --- preprocessing and cache ------------------------------------------------------------------


def preprocess(image: Image.Image, resolution: int, channels: int) -> np.ndarray:
    """Resize (antialiased) the shorter side to ``resolution``, center-crop, return uint8 HxWxC."""
    image = image.convert("L" if channels == 1 else "RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    image = image.resize(size, Image.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def cache_key(dataset_cfg: DictConfig) -> str:
    """Hash of everything that changes the preprocessed pixels (not augmentation settings)."""
    spec = OmegaConf.to_container(dataset_cfg, resolve=True)
    spec = {k: v for k, v in spec.items() if k not in ("random_flip",)}
    spec["cache_version"] = CACHE_VERSION
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def load_images(dataset_cfg: DictConfig, cache_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """The dataset as a uint8 tensor N x C x H x W at the configured resolution (cached on disk)."""
    if dataset_cfg.crop != "center":
        raise DiffexpError(f"dataset.crop={dataset_cfg.crop}: only 'center' is supported")
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / "datasets" / f"{dataset_cfg.name}-{dataset_cfg.resolution}px-{cache_key(dataset_cfg)}.pt"
        if cache_file.exists():
            log.info("dataset %s: cached at %s", dataset_cfg.name, cache_file)
            return torch.load(cache_file)
    raw = instantiate(dataset_cfg.loader)
    arrays = [preprocess(im, dataset_cfg.resolution, dataset_cfg.channels) for im in raw]
    if not arrays:
        raise DiffexpError(f"dataset {dataset_cfg.name}: no images")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        torch.save(images, tmp)
        os.replace(tmp, cache_file)
    log.info("dataset %s: %d images %s", dataset_cfg.name, len(images), tuple(images.shape[1:]))
    return images


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images_u8.float().div_(127.5).sub_(1.0)


# --- batches -----------------------------------------------------------------------------------


class Batches:
    """Batches whose contents depend only on (seed, step): resumed runs see exactly the same data.

    Each epoch is a seeded permutation of the dataset (drop-last); the global batch of a step is
    split into ``grad_accum`` micro-batches, each split across processes. Flips are decided per
    image per epoch, also from the seed.
    """

    def __init__(self, images_u8: torch.Tensor, *, batch_size: int, grad_accum: int, num_processes: int,
                 process_index: int, seed: int, random_flip: bool, device: torch.device):
        per_micro = batch_size // (grad_accum * num_processes)
        if per_micro * grad_accum * num_processes != batch_size:
            raise DiffexpError(
                f"trainer.batch_size={batch_size} does not split evenly over {num_processes} process(es) x "
                f"trainer.grad_accum={grad_accum}"
            )
        if batch_size > len(images_u8):
            raise DiffexpError(f"trainer.batch_size={batch_size} is larger than the dataset ({len(images_u8)} images)")
        self.images = images_u8.to(device)
        self.batch_size, self.per_micro = batch_size, per_micro
        self.num_processes, self.process_index = num_processes, process_index
        self.seed, self.random_flip, self.device = seed, random_flip, device
        self.steps_per_epoch = len(images_u8) // batch_size
        self._epoch, self._perm, self._flip = None, None, None

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def _load_epoch(self, epoch: int) -> None:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        self._perm = torch.randperm(len(self.images), generator=g).to(self.device)
        self._flip = torch.rand(len(self.images), generator=g).lt(0.5).to(self.device)
        self._epoch = epoch

    def get(self, step: int, micro: int = 0) -> torch.Tensor:
        """This process's micro-batch ``micro`` of optimizer step ``step``, float in [-1, 1]."""
        epoch = self.epoch_of(step)
        if epoch != self._epoch:
            self._load_epoch(epoch)
        start = (step % self.steps_per_epoch) * self.batch_size
        start += (micro * self.num_processes + self.process_index) * self.per_micro
        idx = self._perm[start : start + self.per_micro]
        x = to_float(self.images[idx])
        if self.random_flip:
            x = torch.where(self._flip[idx, None, None, None], x.flip(-1), x)
        return x
