"""``python -m diffexp.sample run=RUN_DIR n=64 [sampler=ddim sampler.steps=50] seed=0 out=FILE.npz``.

Images from a run's EMA weights (its exported ``model/`` pipeline): ``FILE.npz`` holds ``images``
(uint8, N x H x W x C) and a grid PNG is written beside it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from diffexp import DiffexpError
from diffexp.cli import CONFIG_PATH, report_errors
from diffexp.records import RunDir

log = logging.getLogger("diffexp.sample")


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="sample")
def main(cfg: DictConfig) -> None:
    import torch

    from diffexp.build import build_sampler
    from diffexp.sampling import generate, save_grid

    with report_errors():
        run = RunDir(cfg.run).require()
        if cfg.n < 1:
            raise DiffexpError(f"n={cfg.n}: must be at least 1")
        sampler_cfg = cfg.sampler if cfg.get("sampler") else run.config().sampler
        device = "cuda" if torch.cuda.is_available() else "cpu"
        pipe = run.pipeline().to(device)
        sampler = build_sampler(sampler_cfg, pipe.scheduler)
        images = generate(pipe.unet, sampler, n=cfg.n, steps=sampler_cfg.steps, seed=cfg.seed,
                          batch_size=cfg.batch_size, progress=True)
        name = sampler_cfg.scheduler._target_.split(".")[-2].replace("Scheduler", "").lower()
        out = Path(cfg.out) if cfg.out else run.samples_dir / f"sample_{name}_{sampler_cfg.steps}steps_s{cfg.seed}.npz"
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(out, images=images)
        grid_file = out.with_suffix(".png")
        save_grid(images, grid_file)
        log.info("%d images %s -> %s (grid %s)", len(images), images.shape[1:], out, grid_file)


if __name__ == "__main__":
    main()
