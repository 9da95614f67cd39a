"""``python -m diffexp.prepare [overrides]``: preprocess a dataset into the cache, and nothing else.

Run it once where the dataset can be downloaded; the cache file it prints (under ``cache_dir``) is
all a later run with the same dataset settings needs, on this machine or copied to one offline::

    python -m diffexp.prepare dataset=cifar10
    python -m diffexp.prepare dataset=celeba dataset.crop=random
    python -m diffexp.prepare dataset=imagefolder dataset.path=/data/my_images dataset.resolution=64
"""

from __future__ import annotations

import logging
import sys

from hydra import compose, initialize_config_dir

from diffexp.config import CONFIG_PATH, report_errors


def main(argv: list[str] | None = None) -> None:
    """Compose the training config with the overrides in ``argv`` (default: the command line),
    cache its dataset, print the cache file."""
    overrides = sys.argv[1:] if argv is None else argv
    from diffexp.data.datasets import cache_path, load_images

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with report_errors():
        with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
        images = load_images(cfg.dataset, cfg.cache_dir, crop_margin=True)
        print(f"{cfg.dataset.name}: {len(images)} images {tuple(images.shape[1:])}", file=sys.stderr)
        print(cache_path(cfg.dataset, cfg.cache_dir))


if __name__ == "__main__":
    main()
