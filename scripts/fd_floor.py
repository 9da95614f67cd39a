"""The real-data floor of the digits metrics: real digits drawn with replacement, scored by the
project's own evaluator (``Evaluator.score_images``, as ``python -m diffexp.evaluate images=FILE``
scores a file) against all of them, at N samples, over several draws.

    python scripts/fd_floor.py 2000 0,1,2,3,4,5,6,7,8,9

Prints one JSON line per draw and a summary (mean, sd, min, max per metric). A model's FD at N
samples cannot be expected below this floor: it is what a perfect sampler of the training set scores.
"""

from __future__ import annotations

import json
import statistics
import sys

import torch
from accelerate import Accelerator
from hydra import compose, initialize_config_dir

from diffexp.config import CONFIG_PATH
from diffexp.data.datasets import load_images
from diffexp.quality.evaluator import Evaluator, resolve_metric


def main(n: int, draws: list[int]) -> None:
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        cfg = compose("train", overrides=[f"metric.num_samples={n}"])
    real = load_images(cfg.dataset, cfg.cache_dir)  # N x C x H x W uint8, the training set
    evaluator = Evaluator(resolve_metric(cfg.metric, cfg.dataset), Accelerator(), real, cfg.dataset, cfg.cache_dir)
    rows = []
    for draw in draws:
        pick = torch.randint(0, len(real), (n,), generator=torch.Generator().manual_seed(draw))
        images = real[pick].permute(0, 2, 3, 1).numpy()  # N x H x W x C, as samples are
        scores = {k: v for k, v in evaluator.score_images(images).items() if k != "eval/seconds"}
        rows.append(scores)
        print(json.dumps({"draw": draw, "n": n, **scores}), flush=True)
    summary = {k: {"mean": statistics.mean(r[k] for r in rows), "sd": statistics.stdev(r[k] for r in rows) if len(rows) > 1 else 0.0,
                   "min": min(r[k] for r in rows), "max": max(r[k] for r in rows)} for k in rows[0]}
    print(json.dumps({"summary": summary, "n": n, "draws": len(rows)}))


if __name__ == "__main__":
    main(int(sys.argv[1]), [int(s) for s in sys.argv[2].split(",")])
