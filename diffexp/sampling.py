"""Image generation with diffusers pipelines, and sample grids."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMPipeline, SchedulerMixin, UNet2DModel
from diffusers.utils import make_image_grid
from PIL import Image
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


def grid(images: np.ndarray) -> Image.Image:
    """A near-square grid of uint8 N x H x W x C images."""
    pil = [Image.fromarray(im[:, :, 0] if im.shape[-1] == 1 else im) for im in images]
    cols = math.ceil(math.sqrt(len(pil)))
    rows = math.ceil(len(pil) / cols)
    pil += [Image.new(pil[0].mode, pil[0].size)] * (rows * cols - len(pil))
    return make_image_grid(pil, rows=rows, cols=cols)


def save_grid(images: np.ndarray, path: Path, upscale_to: int = 64) -> Image.Image:
    """Write the grid as PNG, tiles upscaled (nearest) to at least ``upscale_to`` px for viewing."""
    image = grid(images)
    factor = max(1, upscale_to // images.shape[1])
    if factor > 1:
        image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return image
