"""Latent diffusion (Rombach et al. 2022): the images encoded once by a diffusers ``AutoencoderKL``
and cached, training on the latents, and the autoencoder decoding what is sampled.

``autoencoder=kl autoencoder.path=...`` names the autoencoder: a hub id (e.g. the Stable Diffusion VAE
``stabilityai/sd-vae-ft-mse``, read from the hub cache offline) or a local folder written by
``AutoencoderKL.save_pretrained``. The cache holds each image's posterior mean and standard deviation;
every batch draws ``z = mean + std * n`` (the global RNG, saved in checkpoints) and scales it by the
scaling factor, the autoencoder's own or, with ``scaling_factor: auto``, one over the latents'
standard deviation (measured once, recorded in the exported autoencoder's config).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from diffexp import DiffexpError
from diffexp.data.datasets import Batches, cache_path, center_window, hub_reachable, load_data
from diffexp.records.rundir import atomic_path

log = logging.getLogger(__name__)


def wanted(ae_cfg: DictConfig | None) -> bool:
    """Whether the config asks for latent diffusion (``autoencoder`` other than ``none``)."""
    return ae_cfg is not None and ae_cfg.get("kind", "none") != "none"


def load_autoencoder(ae_cfg: DictConfig, dataset_cfg: DictConfig, device: torch.device):
    """The frozen ``AutoencoderKL`` of ``autoencoder.path`` on ``device``; one-line DiffexpErrors when it
    cannot be found (offline, not cached), is not an autoencoder, or does not fit the images."""
    from diffusers import AutoencoderKL

    path = str(ae_cfg.path)
    local = Path(path).expanduser()
    kwargs = {"subfolder": ae_cfg.subfolder} if ae_cfg.get("subfolder") else {}
    try:
        if local.exists():
            vae = AutoencoderKL.from_pretrained(str(local), **kwargs)
        else:
            vae = AutoencoderKL.from_pretrained(path, local_files_only=not hub_reachable(), **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        where = "no such folder, and " if not local.exists() else ""
        raise DiffexpError(f"autoencoder.path={path}: {where}no AutoencoderKL could be loaded there "
                           f"({type(e).__name__}); with network access, download it once (python -c \"from "
                           f"diffusers import AutoencoderKL; AutoencoderKL.from_pretrained('{path}')\"), or save "
                           "one with AutoencoderKL.save_pretrained(FOLDER) and pass autoencoder.path=FOLDER") from None
    if vae.config.in_channels != dataset_cfg.channels:
        raise DiffexpError(f"autoencoder.path={path}: it encodes {vae.config.in_channels}-channel images, "
                           f"dataset={dataset_cfg.name} has {dataset_cfg.channels} (dataset.channels)")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if dataset_cfg.resolution % factor:
        raise DiffexpError(f"dataset.resolution={dataset_cfg.resolution}: not divisible by the autoencoder's "
                           f"downsampling factor {factor}")
    return vae.to(device).eval().requires_grad_(False)


def trained_autoencoder(cfg: DictConfig, device: torch.device | str = "cpu"):
    """The autoencoder run config ``cfg`` trained with, its scaling factor set as training set it (with
    ``auto``: from the dataset's cached latents, encoded again if the cache is gone); None in pixel space.
    For a run without an exported ``model/``, whose autoencoder is recorded there."""
    ae_cfg = cfg.get("autoencoder")
    if not wanted(ae_cfg):
        return None
    vae = load_autoencoder(ae_cfg, cfg.dataset, device)
    mean = None
    if ae_cfg.get("scaling_factor") == "auto":
        real = center_window(load_data(cfg.dataset, cfg.cache_dir, crop_margin=True).images, int(cfg.dataset.resolution))
        mean = encoded_dataset(vae, real, ae_cfg, cfg.dataset, cfg.cache_dir)["mean"]
    vae.register_to_config(scaling_factor=scaling_factor(ae_cfg, vae, mean))
    return vae


def latent_cache_file(vae, ae_cfg: DictConfig, dataset_cfg: DictConfig, cache_dir: str | os.PathLike) -> Path:
    """Where the encoded dataset goes: keyed by the images' cache key and the autoencoder's weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes()[:4096])  # a fingerprint, not the whole file
    digest.update(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    images = cache_path(dataset_cfg, cache_dir)
    return images.with_name(f"{images.stem}-latents-{digest.hexdigest()[:12]}.pt")


@torch.inference_mode()
def encode(vae, images_u8: torch.Tensor, batch_size: int, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and standard deviation (float32, CPU) of uint8 N x C x H x W images."""
    device = next(vae.parameters()).device
    means, stds = [], []
    for start in tqdm(range(0, len(images_u8), batch_size), desc="encoding latents", disable=not progress, leave=False):
        x = images_u8[start:start + batch_size].to(device).float() / 127.5 - 1
        posterior = vae.encode(x).latent_dist
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def encoded_dataset(vae, images_u8: torch.Tensor, ae_cfg: DictConfig, dataset_cfg: DictConfig,
                    cache_dir: str | os.PathLike | None, progress: bool = False) -> dict:
    """``{"mean", "std", "scaling_factor"}`` of the dataset's images, encoded once and cached."""
    path = latent_cache_file(vae, ae_cfg, dataset_cfg, cache_dir) if cache_dir is not None else None
    if path is not None and path.is_file():
        log.info("latents: cached at %s", path)
        return torch.load(path, weights_only=True)
    mean, std = encode(vae, images_u8, int(ae_cfg.get("batch_size", 64)), progress)
    encoded = {"mean": mean, "std": std}
    if path is not None:
        with atomic_path(path) as tmp:
            torch.save(encoded, tmp)
    log.info("latents: %d images encoded to %s", len(mean), tuple(mean.shape[1:]))
    return encoded


def scaling_factor(ae_cfg: DictConfig, vae, mean: torch.Tensor) -> float:
    """The factor latents are multiplied by: ``autoencoder.scaling_factor``, the autoencoder's own when
    null, or one over the standard deviation of the dataset's latent means with ``auto``."""
    value = ae_cfg.get("scaling_factor")
    if value is None:
        return float(vae.config.scaling_factor)
    if value == "auto":
        return float(1.0 / mean.float().std())
    return float(value)


class LatentBatches(Batches):
    """``Batches`` over cached posteriors: each batch draws its latents ``(mean + std * n) * scale``
    (the global RNG) and flips them with the images' flips. Random crops do not apply to latents."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, scale: float, **kwargs):
        kwargs["crop_to"] = None
        super().__init__(mean, **kwargs)
        self.std = std.to(self.device)
        self.scale = float(scale)

    def materialize(self, idx: torch.Tensor) -> torch.Tensor:
        mean, std = self.images[idx], self.std[idx]
        return (mean + std * torch.randn_like(std)) * self.scale


def check_config(ae_cfg: DictConfig) -> None:
    """One-line DiffexpError for an autoencoder config that cannot work (before anything is loaded)."""
    if not wanted(ae_cfg):
        return
    if ae_cfg.get("kind") != "kl":
        raise DiffexpError(f"autoencoder.kind={ae_cfg.kind}: expected kl (diffusers' AutoencoderKL) or none")
    if not ae_cfg.get("path") or OmegaConf.is_missing(ae_cfg, "path"):
        raise DiffexpError("autoencoder.path: name an AutoencoderKL (a hub id such as stabilityai/sd-vae-ft-mse, "
                           "or a local folder)")
    value = ae_cfg.get("scaling_factor")
    if value not in (None, "auto") and not (isinstance(value, (int, float)) and value > 0):
        raise DiffexpError(f"autoencoder.scaling_factor={value}: expected a positive number, auto or null")

