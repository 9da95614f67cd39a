"""Nothing lost and nothing stale: results added to a run never change its recorded state, and caches
follow the data they were computed from."""

from __future__ import annotations

import json
import logging

import numpy as np
from accelerate import Accelerator
from conftest import run_main
from PIL import Image
from wandb_files import find_runs

from diffexp.config import compose_config
from diffexp.data.datasets import load_images
from diffexp.quality.evaluator import load_feature_net, reference_features, resolve_metric
from diffexp.records.tracking import EXIT_CODES


def test_evaluate_wandb_keeps_the_runs_wandb_state(finished_run, cache_dir):
    # A run whose training was interrupted (after an earlier part finished and exported model/): adding
    # an evaluation to its W&B run must close that run as it was left, not as finished.
    info_file = finished_run / "run.json"
    info = json.loads(info_file.read_text())
    info_file.write_text(json.dumps({**info, "status": "interrupted"}))
    result = run_main("evaluate", f"run={finished_run}", "wandb=true", "metric.num_samples=4", "metric.num_real=8",
                      "metric.batch_size=4", f"cache_dir={cache_dir}", check=True)
    value = json.loads(result.stdout.strip().splitlines()[-1])["eval/fd_digits_4"]
    *_, added = find_runs(finished_run / "wandb")
    assert added.run_id == info["wandb_run_id"] and added.summary["eval/fd_digits_4"] == value
    assert added.exit_code == EXIT_CODES["interrupted"] == 130
    assert json.loads(info_file.read_text())["status"] == "interrupted"


def test_reference_statistics_follow_an_image_folder_changed_in_place(tmp_path, caplog, inception_file):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(folder / f"{i}.png")
    cfg = compose_config(["dataset=imagefolder", f"dataset.path={folder}", "dataset.channels=1",
                          "dataset.resolution=8", "metric=fid_is", f"metric.weights={inception_file}"])
    net = load_feature_net(resolve_metric(cfg.metric, cfg.dataset), Accelerator(cpu=True))

    def features():
        images = load_images(cfg.dataset, tmp_path / "cache")
        return reference_features(net, images, metric_cfg=resolve_metric(cfg.metric, cfg.dataset), dataset_cfg=cfg.dataset,
                                  cache_dir=tmp_path / "cache")

    with caplog.at_level(logging.INFO, logger="diffexp"):
        before = features()
        assert features().equal(before) and "cache hit" in caplog.text  # unchanged: read back
        caplog.clear()
        for i in range(12):  # the same names and count, other pixels
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(folder / f"{i}.png")
        after = features()
    assert "cache hit" not in caplog.text and not after.equal(before)
    assert len(list((tmp_path / "cache" / "metrics").glob("reference-*.pt"))) == 2
