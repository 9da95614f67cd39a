"""Datasets as preprocessed uint8 tensors, and deterministic batches drawn from them.

A dataset config names a loader (``loader._target_``) that returns a 🤗 ``datasets.Dataset`` with
an ``image`` column (hub datasets, image folders, ``save_to_disk`` folders) or a sequence of PIL
images. ``load_images`` resizes and crops them once, with ``Dataset.map``, to the configured
resolution and caches the result as a uint8 tensor keyed by what determines the pixels, so later
runs start in seconds. Training then draws batches from that tensor, which sits on the training
device: small-image datasets fit easily, and an index gather per step is far faster than any
per-item DataLoader pipeline. Augmentations (flips, random crops) happen on those batches.

``crop: random`` caches the images a little larger (``random_crop_scale`` x the resolution) and
each batch takes a random ``resolution``-sized window of them on the device, so the crops differ
every epoch instead of being frozen into the cache. Everything else (and the FID real set) sees
the center window.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from diffexp import DiffexpError, first_line
from diffexp.models.build import build_image_source
from diffexp.records.rundir import atomic_path, reachable

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when preprocessing changes, so stale caches are not reused
OFFLINE_HINT = "dataset=imagefolder dataset.path=DIR and dataset=digits work offline"


# --- loaders: each returns a datasets.Dataset with an "image" column (or PIL images) ------------


def load_digits():
    """scikit-learn's 1,797 8x8 handwritten digits as a grayscale image Dataset with their labels
    0-9 (no network)."""
    import datasets
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = [Image.fromarray(p, mode="L") for p in pixels]
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(d) for d in range(10)])})
    return datasets.Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)


def load_imagefolder(path: str):
    """Every image under ``path`` (subfolders included), read with the 🤗 datasets ``imagefolder``
    builder; when the images sit in one subfolder per class, the subfolders are the labels."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DiffexpError(f"dataset.path={path}: no such directory (dataset=imagefolder needs a folder of images)")
    import datasets

    try:
        ds = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
    except (FileNotFoundError, ValueError) as e:
        raise DiffexpError(f"dataset.path={path}: no images could be read there ({first_line(e)})") from e
    return ds.select_columns([c for c in ("image", "label") if c in ds.column_names])


def load_hub(repo: str, split: str = "train", image_column: str = "image", subset: str | None = None,
             label_column: str | None = None):
    """The ``image_column`` of a 🤗 hub dataset's ``split`` (renamed ``image``), and its class labels
    from ``label_column`` (renamed ``label``) when one is named.

    ``repo`` is a hub name (read from the hub cache when offline or when the hub is unreachable),
    a local dataset repository folder (parquet/image files, read like the hub's), or a folder
    written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``.
    """
    import datasets

    local = Path(repo).expanduser()
    if (local / "state.json").is_file() or (local / "dataset_dict.json").is_file():
        ds = datasets.load_from_disk(str(local))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DiffexpError(f"dataset.loader.split={split}: {repo} has splits {sorted(ds)}")
            ds = ds[split]
    else:
        try:
            with _offline_if_hub_unreachable(repo):
                ds = datasets.load_dataset(repo, subset, split=split)
        except ValueError as e:  # unknown split or subset: the dataset itself was found
            raise DiffexpError(f"dataset.loader.split={split} / subset={subset}: {repo}: {first_line(e)}") from e
        except Exception as e:  # datasets raises ConnectionError, FileNotFoundError, DatasetNotFoundError...
            raise DiffexpError(
                f"dataset {repo} (split {split}) is neither in the hub cache ({datasets.config.HF_DATASETS_CACHE}) "
                f"nor reachable ({type(e).__name__}): download it once with network access, e.g. "
                f"python -c \"import datasets; datasets.load_dataset('{repo}', split='{split}')\", "
                f"or point dataset=hf dataset.repo= at a save_to_disk folder; {OFFLINE_HINT}"
            ) from e
    for key, column in (("image_column", image_column), ("label_column", label_column)):
        if column is not None and column not in ds.column_names:
            raise DiffexpError(f"dataset.loader.{key}={column}: {repo} has columns {ds.column_names}")
    ds = ds.select_columns([image_column] + ([label_column] if label_column else []))
    ds = ds.rename_column(image_column, "image") if image_column != "image" else ds
    return ds.rename_column(label_column, "label") if label_column and label_column != "label" else ds


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint opens within ``timeout`` seconds (True behind a proxy)."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    if urllib.request.getproxies().get(url.scheme) and not urllib.request.proxy_bypass(url.hostname):
        return True  # only the proxy can tell; leave the answer to datasets
    return reachable(constants.ENDPOINT, timeout) is None


@contextlib.contextmanager
def _offline_if_hub_unreachable(repo: str):
    # Without HF_DATASETS_OFFLINE, an unreachable hub costs ~30 s of retries before datasets falls
    # back to its cache; one quick probe lets both cached and uncached datasets answer at once.
    import datasets
    from huggingface_hub import constants

    if datasets.config.HF_HUB_OFFLINE or Path(repo).expanduser().exists() or hub_reachable():
        yield
        return
    log.warning("the hub (%s) is unreachable: reading datasets from the local cache only", constants.ENDPOINT)
    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


# --- preprocessing and cache ------------------------------------------------------------------


def preprocess(image: Image.Image, size: int, channels: int, precrop: int | None = None) -> np.ndarray:
    """Square uint8 ``size`` x ``size`` x ``channels`` array of ``image``.

    Optionally first cuts the central ``precrop`` square (CelebA's face box), then resizes the
    shorter side to ``size`` with Pillow's antialiased bicubic filter and takes the center square.
    """
    image = image.convert("L" if channels == 1 else "RGB")
    w, h = image.size
    if precrop:
        side = min(precrop, w, h)
        left, top = (w - side) // 2, (h - side) // 2
        image, (w, h) = image.crop((left, top, left + side, top + side)), (side, side)
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    image = image.resize(new, Image.BICUBIC)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    array = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def stored_size(dataset_cfg: DictConfig) -> int:
    """Side of the cached images: the resolution, or a margin larger for ``crop: random``."""
    if dataset_cfg.crop == "center":
        return int(dataset_cfg.resolution)
    if dataset_cfg.crop == "random":
        scale = float(dataset_cfg.get("random_crop_scale", 1.125))
        if scale < 1:
            raise DiffexpError(f"dataset.random_crop_scale={scale}: must be >= 1")
        return max(int(dataset_cfg.resolution) + 1, round(dataset_cfg.resolution * scale))
    raise DiffexpError(f"dataset.crop={dataset_cfg.crop}: expected center or random")


def cache_key(dataset_cfg: DictConfig) -> str:
    """Hash of exactly what determines the cached pixels (not augmentations, not the dataset's name)."""
    loader = OmegaConf.to_container(dataset_cfg.loader, resolve=True)
    loader.pop("label_column", None)  # labels are cached beside the pixels, not in them
    spec = {
        "loader": loader,
        "size": stored_size(dataset_cfg),
        "channels": int(dataset_cfg.channels),
        "precrop": dataset_cfg.get("precrop"),
        "cache_version": CACHE_VERSION,
    }
    if dataset_cfg.get("path") is not None:  # a local folder: adding or editing images invalidates
        spec["files"] = folder_signature(dataset_cfg.path)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def folder_signature(path: str | os.PathLike) -> str:
    """Hash of the names, sizes and modification times of every file under ``path`` ("" if none)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return ""
    entries = sorted((str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns)
                     for f in folder.rglob("*") if f.is_file())
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def cache_path(dataset_cfg: DictConfig, cache_dir: str | os.PathLike) -> Path:
    """Where ``load_images`` keeps the preprocessed tensor of ``dataset_cfg`` under ``cache_dir``."""
    return Path(cache_dir) / "datasets" / f"{dataset_cfg.name}-{stored_size(dataset_cfg)}px-{cache_key(dataset_cfg)}.pt"


def decode(item) -> Image.Image:
    """A datasets image cell (decoded, or ``{"path", "bytes"}``) as a PIL image; a file that cannot
    be read is a one-line DiffexpError naming it."""
    if isinstance(item, Image.Image):
        return item
    try:
        image = Image.open(io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"])
        image.load()
        return image
    except Exception as e:  # noqa: BLE001 - PIL raises its own and OSError alike
        raise DiffexpError(f"{item.get('path') or 'an image of the dataset'}: cannot be read as an image "
                           f"({type(e).__name__})") from None


def _preprocess_batch(batch: dict, size: int, channels: int, precrop: int | None) -> dict:
    return {"pixels": np.stack([preprocess(decode(im), size, channels, precrop) for im in batch["image"]])}


def preprocess_dataset(raw, size: int, channels: int, precrop: int | None = None,
                       num_proc: int | None = None) -> torch.Tensor:
    """uint8 N x C x size x size tensor of a loader's images, through ``Dataset.map``.

    ``num_proc`` defaults to the CPU count (up to 8) for datasets of 20k images or more on machines
    with 4 or more cores; on 2 busy cores one process was faster (3,025 vs 2,153 images/s).
    """
    import datasets

    if not isinstance(raw, datasets.Dataset):
        raw = datasets.Dataset.from_dict({"image": list(raw)}, features=datasets.Features({"image": datasets.Image()}))
    if len(raw) == 0:
        raise DiffexpError("the dataset has no images")
    raw = raw.cast_column("image", datasets.Image(decode=False))  # decoded in _preprocess_batch, naming bad files
    if num_proc is None and len(raw) >= 20_000 and (os.cpu_count() or 1) >= 4:
        num_proc = min(os.cpu_count(), 8)
    features = datasets.Features({"pixels": datasets.Array3D((size, size, channels), "uint8")})
    pixels = raw.map(_preprocess_batch, batched=True, batch_size=256, num_proc=num_proc if num_proc and num_proc > 1 else None,
                     fn_kwargs={"size": size, "channels": channels, "precrop": precrop},
                     remove_columns=raw.column_names, features=features, keep_in_memory=True,
                     desc=f"preprocessing to {size}x{size}")
    array = pixels.with_format("numpy", dtype=np.uint8)[:]["pixels"]
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def center_window(images_u8: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``size`` x ``size`` window of N x C x S x S images."""
    top = (images_u8.shape[-1] - size) // 2
    return images_u8[..., top : top + size, top : top + size]


@dataclass
class ImageData:
    """A dataset as tensors: uint8 images N x C x H x W and, when asked for, int64 class labels and
    the class names (label i is ``class_names[i]``)."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    class_names: list[str] | None = None


def labels_of(raw, name: str) -> tuple[torch.Tensor, list[str]]:
    """The ``label`` column of a loader's Dataset as ids and names (a ClassLabel's names, else the
    sorted distinct values); a one-line DiffexpError when the dataset has none."""
    import datasets

    if not isinstance(raw, datasets.Dataset) or "label" not in raw.column_names:
        raise DiffexpError(f"dataset {name} has no class labels (conditioning=class needs them): name the column "
                           "with dataset.label_column=..., or use an imagefolder with one subfolder per class")
    feature, values = raw.features["label"], raw["label"]
    if isinstance(feature, datasets.ClassLabel):
        return torch.tensor(list(values), dtype=torch.int64), [str(n) for n in feature.names]
    names = sorted({str(v) for v in values})
    index = {n: i for i, n in enumerate(names)}
    return torch.tensor([index[str(v)] for v in values], dtype=torch.int64), names


def load_data(dataset_cfg: DictConfig, cache_dir: str | os.PathLike | None = None, *, crop_margin: bool = False,
              labels: bool = False, num_proc: int | None = None) -> ImageData:
    """The dataset as tensors, preprocessed once and cached on disk (the labels beside the pixels).

    H = W = ``dataset.resolution``: the images the model learns and the real set for FID. With
    ``crop_margin`` and ``crop: random``, the larger cached images that ``Batches(crop_to=...)``
    crops at random instead. A second call with the same settings only reads the cache files.
    """
    size = stored_size(dataset_cfg)
    cache_file = cache_path(dataset_cfg, cache_dir) if cache_dir is not None else None
    labels_file = cache_file.with_suffix(".labels.pt") if cache_file is not None else None
    raw = images = classes = None
    if cache_file is not None and cache_file.exists():
        log.info("dataset %s: cached at %s", dataset_cfg.name, cache_file)
        images = torch.load(cache_file, mmap=True, weights_only=True)
    else:
        raw = build_image_source(dataset_cfg.loader)
        try:
            images = preprocess_dataset(raw, size, int(dataset_cfg.channels), dataset_cfg.get("precrop"), num_proc)
        except DiffexpError as e:
            raise DiffexpError(f"dataset {dataset_cfg.name}: {e}") from e
        if cache_file is not None:
            with atomic_path(cache_file) as tmp:  # concurrent runs never read half a file
                torch.save(images, tmp)
        log.info("dataset %s: %d images %s", dataset_cfg.name, len(images), tuple(images.shape[1:]))
    if labels:
        if labels_file is not None and labels_file.exists():
            classes = torch.load(labels_file, weights_only=True)
        else:
            ids, names = labels_of(raw if raw is not None else build_image_source(dataset_cfg.loader), dataset_cfg.name)
            classes = {"labels": ids, "class_names": names}
            if labels_file is not None:
                with atomic_path(labels_file) as tmp:
                    torch.save(classes, tmp)
    if not crop_margin and size != dataset_cfg.resolution:
        images = center_window(images, int(dataset_cfg.resolution)).contiguous()
    return ImageData(images, classes["labels"] if classes else None, classes["class_names"] if classes else None)


def load_images(dataset_cfg: DictConfig, cache_dir: str | os.PathLike | None = None, *,
                crop_margin: bool = False, num_proc: int | None = None) -> torch.Tensor:
    """``load_data(...).images``: the dataset's images alone."""
    return load_data(dataset_cfg, cache_dir, crop_margin=crop_margin, num_proc=num_proc).images


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images_u8.float().div_(127.5).sub_(1.0)


def crop_windows(images_u8: torch.Tensor, offsets: torch.Tensor, size: int) -> torch.Tensor:
    """Per-image ``size`` x ``size`` windows of N x C x S x S images at (top, left) ``offsets`` (N x 2)."""
    span = torch.arange(size, device=images_u8.device)
    rows = (offsets[:, 0, None] + span)[:, :, None]
    cols = (offsets[:, 1, None] + span)[:, None, :]
    n = torch.arange(len(images_u8), device=images_u8.device)[:, None, None]
    return images_u8.permute(0, 2, 3, 1)[n, rows, cols].permute(0, 3, 1, 2)


# --- batches -----------------------------------------------------------------------------------


class Batches:
    """Batches whose contents depend only on (seed, step): resumed runs see exactly the same data.

    Each epoch is a seeded permutation of the dataset (drop-last); the global batch of a step is
    split into ``grad_accum`` micro-batches, each split across processes. Flips, and with
    ``crop_to`` smaller than the images the random crop windows, are decided per image per epoch,
    also from the seed, and applied to the batch on ``device``.
    """

    def __init__(self, images_u8: torch.Tensor, *, batch_size: int, grad_accum: int, num_processes: int,
                 process_index: int, seed: int, random_flip: bool, device: torch.device,
                 crop_to: int | None = None, labels: torch.Tensor | None = None):
        per_micro = batch_size // (grad_accum * num_processes)
        if per_micro * grad_accum * num_processes != batch_size:
            raise DiffexpError(
                f"trainer.batch_size={batch_size} does not split evenly over {num_processes} process(es) x "
                f"trainer.grad_accum={grad_accum}"
            )
        if batch_size > len(images_u8):
            raise DiffexpError(f"trainer.batch_size={batch_size} is larger than the dataset ({len(images_u8)} images)")
        self.images = images_u8.to(device)
        self.labels = labels.to(device) if labels is not None else None
        self.batch_size, self.per_micro = batch_size, per_micro
        self.num_processes, self.process_index = num_processes, process_index
        self.seed, self.random_flip, self.device = seed, random_flip, device
        side = images_u8.shape[-1]
        self.crop_to = crop_to if crop_to is not None and crop_to < side else None
        self.steps_per_epoch = len(images_u8) // batch_size
        self._epoch, self._perm, self._flip, self._offsets = None, None, None, None

    def epoch_of(self, step: int) -> int:
        """The epoch (pass over the dataset) that optimizer step ``step`` belongs to."""
        return step // self.steps_per_epoch

    def _load_epoch(self, epoch: int) -> None:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        self._perm = torch.randperm(len(self.images), generator=g).to(self.device)
        self._flip = torch.rand(len(self.images), generator=g).lt(0.5).to(self.device)
        if self.crop_to is not None:
            span = self.images.shape[-1] - self.crop_to + 1
            self._offsets = torch.randint(0, span, (len(self.images), 2), generator=g).to(self.device)
        self._epoch = epoch

    def indices(self, step: int, micro: int = 0) -> torch.Tensor:
        """Which images make this process's micro-batch ``micro`` of optimizer step ``step``."""
        epoch = self.epoch_of(step)
        if epoch != self._epoch:
            self._load_epoch(epoch)
        start = (step % self.steps_per_epoch) * self.batch_size
        start += (micro * self.num_processes + self.process_index) * self.per_micro
        return self._perm[start : start + self.per_micro]

    def step_indices(self, step: int) -> torch.Tensor:
        """The images of optimizer step ``step``'s whole global batch (every process's, every micro-batch)."""
        epoch = self.epoch_of(step)
        if epoch != self._epoch:
            self._load_epoch(epoch)
        start = (step % self.steps_per_epoch) * self.batch_size
        return self._perm[start : start + self.batch_size]

    def rows(self, micro: int = 0) -> slice:
        """Where this process's micro-batch ``micro`` lies in its step's whole global batch."""
        start = (micro * self.num_processes + self.process_index) * self.per_micro
        return slice(start, start + self.per_micro)

    def get_step(self, step: int) -> torch.Tensor:
        """Optimizer step ``step``'s whole global batch (images: float in [-1, 1]); ``get(step, micro)``
        is its ``rows(micro)``."""
        return self.flipped(self.step_indices(step))

    def materialize(self, idx: torch.Tensor) -> torch.Tensor:
        """The training tensors of images ``idx``: their crop windows, as floats in [-1, 1]."""
        x = self.images[idx]
        if self.crop_to is not None:
            x = crop_windows(x, self._offsets[idx], self.crop_to)
        return to_float(x)

    def get_labels(self, step: int, micro: int = 0) -> torch.Tensor:
        """The class labels of the images ``get(step, micro)`` returns."""
        return self.labels[self.indices(step, micro)]

    def get(self, step: int, micro: int = 0) -> torch.Tensor:
        """This process's micro-batch ``micro`` of optimizer step ``step`` (images: float in [-1, 1])."""
        return self.flipped(self.indices(step, micro))

    def flipped(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.materialize(idx)
        if self.random_flip:
            x = torch.where(self._flip[idx, None, None, None], x.flip(-1), x)
        return x
