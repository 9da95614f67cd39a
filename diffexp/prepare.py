"""``python -m diffexp.prepare [overrides]``: preprocess a dataset into the cache, and nothing else.

Run it once where the dataset can be downloaded; the cache file it prints (under ``cache_dir``) is
all a later run with the same dataset settings needs, on this machine or copied to one offline::

    python -m diffexp.prepare dataset=cifar10
    python -m diffexp.prepare dataset=celeba dataset.crop=random
    python -m diffexp.prepare dataset=imagefolder dataset.path=/data/my_images dataset.resolution=64

A Hydra app over the training config (``conf/prepare.yaml``): ``--cfg job`` shows what it would cache.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from diffexp.config import CONFIG_PATH, report_errors

log = logging.getLogger("diffexp.prepare")


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="prepare")
def main(cfg: DictConfig) -> None:
    """Cache the composed config's dataset; print the cache file (the last line on stdout)."""
    from diffexp.data.datasets import cache_path, load_images

    with report_errors():
        images = load_images(cfg.dataset, cfg.cache_dir, crop_margin=True)
        log.info("%s: %d images %s", cfg.dataset.name, len(images), tuple(images.shape[1:]))
        print(cache_path(cfg.dataset, cfg.cache_dir), flush=True)


if __name__ == "__main__":
    main()
