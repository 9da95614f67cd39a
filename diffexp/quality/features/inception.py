"""InceptionV3 as FID/IS/KID use it: torch-fidelity's ``FeatureExtractorInceptionV3`` (the
``pt_inception-2015-12-05`` weights of pytorch-fid and the papers, with the reference TF1 resize
to 299 px), giving 2048-d pool features and the 1008 unbiased logits.

The weights are not shipped: ``metric.weights=FILE``, else the torch hub cache, else a download.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

from diffexp import DiffexpError, first_line
from diffexp.records.rundir import file_sha256

NAME = "inception"
POOL, LOGITS = "2048", "logits_unbiased"


class WeightsMissing(DiffexpError):
    """No InceptionV3 weights file could be found or downloaded."""


def hub_weights_file() -> Path:
    """Where torch hub caches the Inception weights (the file torch-fidelity downloads)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(URL_INCEPTION_V3)


def how_to_get_weights() -> str:
    return (f"download {URL_INCEPTION_V3} once to {hub_weights_file()} (or to any file and pass "
            f"metric.weights=FILE)")


def inception_weights(metric_cfg: DictConfig) -> Path:
    """The Inception weights file: ``metric.weights``, else the torch hub cache, else downloaded there.

    Raises WeightsMissing with one line that says how to provide the file.
    """
    if metric_cfg.get("weights"):
        path = Path(str(metric_cfg.weights)).expanduser()
        if not path.is_file():
            raise WeightsMissing(f"metric.weights={metric_cfg.weights}: no such file; {how_to_get_weights()}")
        return path
    cached = hub_weights_file()
    if cached.is_file():
        return cached
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(URL_INCEPTION_V3, str(cached), progress=False)
    except Exception as e:  # offline: urllib raises URLError, OSError, timeouts...
        raise WeightsMissing(f"Inception weights not in {cached} and the download failed "
                             f"({type(e).__name__}); {how_to_get_weights()}") from e
    return cached


def weights_available(metric_cfg: DictConfig) -> bool:
    """Whether the weights are on this machine already (no download is tried)."""
    if metric_cfg.get("weights"):
        return Path(str(metric_cfg.weights)).expanduser().is_file()
    return hub_weights_file().is_file()


class InceptionNet(torch.nn.Module):
    """``(pool features N x 2048, logits N x 1008)`` of uint8 N x C x H x W images (gray repeated to RGB)."""

    name = NAME
    num_features, num_logits = 2048, 1008

    def __init__(self, weights: Path):
        super().__init__()
        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", [POOL, LOGITS],
                                                   feature_extractor_weights_path=str(weights))
        except Exception as e:  # a truncated download or a file of the wrong network
            raise DiffexpError(f"metric.weights={weights}: not an InceptionV3 weights file ({type(e).__name__}: "
                               f"{first_line(e)[:200]})") from e
        self.digest = file_sha256(weights)

    def forward(self, images_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images_u8.shape[1] == 1:
            images_u8 = images_u8.expand(-1, 3, -1, -1)
        pool, logits = self.net(images_u8.contiguous())
        return pool.float(), logits.float()
