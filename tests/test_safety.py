"""Nothing lost and nothing stale: results added to a run never change its recorded state, and caches
follow the data they were computed from."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
from accelerate import Accelerator
from conftest import compose_config, run_main
from PIL import Image
from wandb_files import find_runs

from diffexp.data.datasets import load_images
from diffexp.quality.evaluator import load_feature_net, reference_features, resolve_metric
from diffexp.records.rundir import RunDir
from diffexp.records.tracking import EXIT_CODES
from diffexp.report.render import REPORT_FILES


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
    assert added.exit_code == EXIT_CODES["interrupted"] == 130 and added.preempting  # as training closed it
    assert json.loads(info_file.read_text())["status"] == "interrupted"


def test_reference_statistics_follow_an_image_folder_changed_in_place(tmp_path, caplog, inception_file):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
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
        for i in range(4):  # the same names and count, other pixels
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(folder / f"{i}.png")
        after = features()
    assert "cache hit" not in caplog.text and not after.equal(before)
    assert len(list((tmp_path / "cache" / "metrics").glob("reference-*.pt"))) == 2


def test_a_damaged_newest_checkpoint_is_skipped_and_the_resume_matches_the_uninterrupted_run(train, tmp_path):
    from conftest import crashed_copy, run_train
    from test_train import losses, same_weights

    from diffexp.records.rundir import MANIFEST, RunDir

    common = ["trainer.max_steps=8", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=10",
              "trainer.log_every=2", "trainer.sample_every=0"]
    full, _ = train(*common, name="full")
    assert all((c / MANIFEST).is_file() for c in RunDir(full).checkpoints())
    crashed = crashed_copy(full, tmp_path / "crashed", checkpoint=6, logged=3)
    newest = crashed / "checkpoints" / "step_0000006"
    weights = next(newest.glob("model*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a disk filled up mid-copy
    result = run_train(f"resume={crashed}")
    log_text = result.stdout + result.stderr + "".join(p.read_text() for p in crashed.glob("*.log"))
    assert f"checkpoint {newest} is damaged ({weights.name} is" in log_text
    assert "resumed from" in log_text and "step_0000004" in log_text
    assert losses(crashed) == losses(full) and same_weights(crashed, full)


def test_checksums_catch_a_changed_byte_and_pruning_keeps_the_newest_complete_checkpoint(finished_run):
    from diffexp.records.rundir import RunDir

    run = RunDir(finished_run)
    older, newest = run.checkpoints()[-2:]
    weights = next(newest.glob("model*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size: only the checksum tells
    weights.write_bytes(bytes(data))
    assert run.checkpoints()[-1] == newest and run.latest_checkpoint() == older
    (newest / "optimizer.bin").unlink()  # now damaged by size too: not counted, not removed
    run.prune_checkpoints(1)
    assert run.checkpoints() == [older] and newest.is_dir()
    (older / "optimizer.bin").unlink()  # no complete checkpoint left: a resume is one error line
    result = run_main("train", f"resume={finished_run}", "trainer.max_steps=9")
    assert result.returncode == 2 and "no checkpoint" in result.stderr.splitlines()[-1]


def tree(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_compare_writes_only_into_a_folder_of_its_own(finished_run, tmp_path):
    outputs = tmp_path / "outputs"  # a folder of runs, as outputs/ is
    outputs.mkdir()
    shutil.move(finished_run, outputs / "run")
    run = outputs / "run"
    before = tree(outputs)
    for out, says in ((outputs, "holds runs"), (run, "holds runs"), (tmp_path, "holds runs")):
        result = run_main("compare", str(run), f"out={out}")
        assert result.returncode == 2 and f"error: out={out}: {says}" in result.stderr.strip().splitlines()[-1]
    thesis = tmp_path / "thesis"  # a user's folder that happens to hold a summary.json
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("\\chapter{Results}")
    (thesis / "summary.json").write_text("{}")
    result = run_main("compare", str(run), f"out={thesis}")
    assert result.returncode == 2 and "holds files compare did not write (thesis.tex)" in result.stderr
    assert tree(thesis) == {"summary.json": b"{}", "thesis.tex": b"\\chapter{Results}"}
    assert tree(outputs) == before

    report = tmp_path / "report"  # compare's own earlier report: replaced, and only it
    run_main("compare", str(run), f"out={report}", check=True)
    (report / "report.md").write_text("stale")
    result = run_main("compare", str(run), "rank=eval/bogus", f"out={report}")  # refused: the report stays
    assert result.returncode == 2 and (report / "report.md").read_text() == "stale"
    run_main("compare", str(run), f"out={report}", check=True)
    assert (report / "report.md").read_text() != "stale" and set(tree(report)) <= set(REPORT_FILES)
    assert tree(outputs) == before and sorted(p.name for p in tmp_path.iterdir()) == ["outputs", "report", "thesis"]


def test_a_resumed_wandb_run_holds_each_step_once(train):
    # A crash while the step-4 checkpoint was written: W&B holds steps 1-4 and grids 2 and 4, the newest
    # complete checkpoint is step 2; the resume replays 3 and 4, which must not reach W&B twice.
    run, _ = train("logger=wandb", "trainer.checkpoint_every=2", "trainer.log_every=1", name="crashed")
    shutil.rmtree(run / "checkpoints" / "step_0000004")
    shutil.rmtree(run / "model")
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "status": "running"}))  # what a killed process leaves
    from conftest import run_train

    result = run_train(f"resume={run}")
    first, resumed = find_runs(run / "wandb")
    assert first.run_id == resumed.run_id == info["wandb_run_id"]
    steps = [h["train/step"] for w in (first, resumed) for h in w.history if "train/loss" in h]
    grids = [h["train/step"] for w in (first, resumed) for h in w.history if "samples/grid" in h]
    assert steps == [1, 2, 3, 4] and grids == [2, 4]
    assert "steps 3 to 4 are in the run from before the interruption" in result.stdout + result.stderr + \
        "".join(p.read_text() for p in run.glob("*.log"))
    assert [r["step"] for r in RunDir(run).metrics() if "train/loss" in r] == [1, 2, 3, 4]


def test_a_new_run_never_writes_into_a_folder_holding_other_files_or_a_run(finished_run, tmp_path):
    from conftest import TINY

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: own\n")
    (mine / "notes.txt").write_text("keep")
    # A folder holding a diffexp run (run.json too) is that run: the same command continues it (here:
    # finished, nothing to do), a changed recipe is refused; neither writes a file of the run.
    for folder, extra, code, says in (
            (mine, (), 2, f"error: hydra.run.dir={mine}: holds a run (config.yaml, notes.txt); resume="),
            (finished_run, (), 0, f"{finished_run} is finished (4 of 4 steps): nothing to do"),
            (finished_run, ("trainer.lr=0.5",), 2, "error: trainer.lr=0.5: a resume continues the same recipe")):
        before = tree(folder)
        result = run_main("train", *TINY, "logger=none", f"hydra.run.dir={folder}", *extra)
        assert result.returncode == code and says in result.stdout + result.stderr, result.stderr
        assert {k: v for k, v in tree(folder).items() if not k.startswith(".hydra") and not k.endswith(".log")} == \
            {k: v for k, v in before.items() if not k.startswith(".hydra") and not k.endswith(".log")}
    (mine / "config.yaml").unlink()
    result = run_main("train", *TINY, "logger=none", f"hydra.run.dir={mine}")
    assert result.returncode == 2 and "holds files a run did not write (notes.txt)" in result.stderr
