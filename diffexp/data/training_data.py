"""What the training loop trains on: the dataset's images (or an autoencoder's latents of them) as
deterministic batches, the real images evaluation compares with, and the classes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from diffexp.data import latents
from diffexp.data.datasets import Batches, center_window, load_data


@dataclass
class TrainingData:
    """What the loop trains on: the batches (of images or latents), the real images evaluation
    compares with, the shape the denoiser sees, the classes (None: unconditional) and the autoencoder
    (None: pixel space)."""

    batches: Batches
    real: torch.Tensor
    channels: int
    size: int
    num_classes: int | None
    class_names: list[str] | None
    vae: torch.nn.Module | None


def prepare_data(cfg: DictConfig, t: DictConfig, accelerator) -> TrainingData:
    """The dataset (with labels for ``conditioning=class``), encoded to latents with ``autoencoder``,
    as deterministic batches for trainer settings ``t`` on ``accelerator``'s processes; the main
    process fills the caches first."""
    conditional = (cfg.get("conditioning") or {}).get("kind", "none") == "class"
    resolution = int(cfg.dataset.resolution)
    ae_cfg = cfg.get("autoencoder")
    latents.check_config(ae_cfg)
    common = dict(batch_size=t.batch_size, grad_accum=t.grad_accum, num_processes=accelerator.num_processes,
                  process_index=accelerator.process_index, seed=cfg.seed, random_flip=cfg.dataset.random_flip,
                  device=accelerator.device)
    vae = encoded = None
    if latents.wanted(ae_cfg):  # an autoencoder that does not fit is refused before the data is read
        vae = latents.load_autoencoder(ae_cfg, cfg.dataset, accelerator.device)
    with accelerator.main_process_first():
        data = load_data(cfg.dataset, cfg.cache_dir, crop_margin=True, labels=conditional)
        real = center_window(data.images, resolution)  # what the model learns, whatever the crop margin
        if vae is not None:
            encoded = latents.encoded_dataset(vae, real, ae_cfg, cfg.dataset, cfg.cache_dir,
                                              progress=accelerator.is_main_process)
    if vae is None:
        batches = Batches(data.images, crop_to=resolution, labels=data.labels, **common)
        channels, size = int(cfg.dataset.channels), resolution
    else:
        scale = latents.scaling_factor(ae_cfg, vae, encoded["mean"])
        vae.register_to_config(scaling_factor=scale)  # what decoding divides by, and what the export records
        batches = latents.LatentBatches(encoded["mean"], encoded["std"], scale, labels=data.labels, **common)
        channels, size = int(encoded["mean"].shape[1]), int(encoded["mean"].shape[-1])
    num_classes = len(data.class_names) if conditional else None
    return TrainingData(batches, real.contiguous(), channels, size, num_classes, data.class_names, vae)


def grid_labels(grid_size: int, num_classes: int | None) -> tuple[torch.Tensor | None, int | None]:
    """The class of each image of a sample grid (one row per class, ``grid_size // num_classes`` a row)
    and the images per row; (None, None) for an unconditional run (a near-square grid)."""
    if not num_classes:
        return None, None
    per_class = max(1, grid_size // num_classes)
    return torch.arange(num_classes).repeat_interleave(per_class), per_class
