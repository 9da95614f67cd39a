"""Image generation with diffusers pipelines, and sample grids."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMPipeline, SchedulerMixin, UNet2DModel
from PIL import Image
from torchvision.utils import make_grid
from tqdm.auto import tqdm


@torch.inference_mode()
def generate(unet: UNet2DModel, scheduler: SchedulerMixin, *, n: int, steps: int, seed: int,
             batch_size: int = 256, progress: bool = False, generator_device: str = "cpu") -> np.ndarray:
    """``n`` images as uint8 N x H x W x C from ``unet`` with ``scheduler``; same seed, same images.

    Noise is drawn from one generator seeded with ``seed`` on ``generator_device`` (CPU by
    default, so the same seed gives the same starting noise on every device).
    """
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(generator_device).manual_seed(seed)
    was_training = unet.training
    unet.eval()
    chunks = []
    with tqdm(total=n, desc="sampling", unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            images = pipe(batch_size=count, generator=generator, num_inference_steps=steps, output_type="np").images
            chunks.append(np.round(images * 255).astype(np.uint8))
            bar.update(count)
    unet.train(was_training)
    return np.concatenate(chunks)


def grid(images: np.ndarray, upscale_to: int = 64, padding: int = 2) -> Image.Image:
    """A near-square grid of uint8 N x H x W x C images, tiles upscaled (nearest) to at least
    ``upscale_to`` px and separated by gray lines, for looking at."""
    tiles = torch.from_numpy(images).permute(0, 3, 1, 2)
    factor = max(1, upscale_to // images.shape[1])
    tiles = tiles.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
    nrow = math.ceil(math.sqrt(len(tiles)))
    canvas = make_grid(tiles, nrow=nrow, padding=padding, pad_value=128)
    array = canvas.permute(1, 2, 0).numpy()
    return Image.fromarray(array[:, :, 0] if images.shape[-1] == 1 else array)


def save_grid(images: np.ndarray, path: Path) -> Image.Image:
    """Write ``grid(images)`` as a PNG at ``path``; returns the image."""
    image = grid(images)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return image
