"""Experiment tracking with real wandb (offline) and TensorBoard: train, then read the run back from its files."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from accelerate import Accelerator
from conftest import TINY, run_main
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from wandb_files import find_runs, iter_records

from diffexp.config import CONFIG_PATH
from diffexp.records.rundir import RunDir
from diffexp.records.tracking import make_tracker, wandb_mode

WARNING = "tracking off"


def only_run(run_dir: Path):
    runs = find_runs(run_dir / "wandb")
    assert len(runs) == 1, f"expected one W&B run under {run_dir / 'wandb'}, found {[r.path for r in runs]}"
    return runs[0]


def leet_summary(wandb_run) -> dict:
    """wandb's own reading of a .wandb file (`wandb leet inspect --summary --json`)."""
    out = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", str(wandb_run.path),
                          "--summary", "--json"], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout)


def test_wandb_is_the_default_logger():
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["seed=3", "group=sweepA"])
    logger = OmegaConf.to_container(cfg.logger)  # unresolved: the run name needs a running Hydra app
    assert logger["kind"] == "wandb" and logger["name"] == "${name}" and cfg.logger.group == "sweepA"


def test_offline_run_is_in_its_wandb_files(train):
    run_dir, _ = train("logger=wandb", "logger.tags=[tiny,test]")
    run = RunDir(run_dir)
    info, rows = run.info(), [r for r in run.metrics() if "train/loss" in r]
    wb = only_run(run_dir)

    assert wb.run_id == info["wandb_run_id"] and wb.name == "unet_tiny-cosine-s0", \
        f"{wb.path} ({wb.path.stat().st_size} bytes) holds {dict(Counter(r.WhichOneof('record_type') for r in iter_records(wb.path)))}"
    assert wb.project == "diffexp" and wb.job_type == "train" and wb.tags == ["tiny", "test"]
    # The dashboard groups and filters by these directly.
    c = wb.config
    assert (c["model"], c["scheduler"], c["dataset"], c["sampler"], c["seed"]) == ("unet_tiny", "cosine", "digits",
                                                                                  "auto", 0)
    assert c["num_parameters"] == info["num_parameters"] > 0
    assert c["git_commit"] == info["git"]["commit"] and c["git_dirty"] == info["git"]["dirty"]
    assert c["packages"]["wandb"] == info["packages"]["wandb"]
    assert c["cfg"]["trainer"]["max_steps"] == 4 and c["cfg"]["model"]["_target_"] == "diffusers.UNet2DModel"

    # train/* plotted against train/step, and every logged row is there with its values.
    assert {"glob_name": "train/*", "name": "", "step_metric": "train/step"} in wb.metrics
    history = [h for h in wb.history if "train/loss" in h]
    assert [h["train/step"] for h in history] == [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [h["train/loss"] for h in history] == pytest.approx([r["train/loss"] for r in rows])
    assert all(h.keys() >= {"train/lr", "train/grad_norm", "train/img_per_s", "train/epoch"} for h in history)

    grids = [h for h in wb.history if "samples/grid" in h]
    assert [g["train/step"] for g in grids] == [2, 4]  # sample_every=2 in debug=tiny
    assert grids[0]["samples/grid"]["_type"] == "image-file"
    assert (wb.path.parent / "files" / grids[-1]["samples/grid"]["path"]).is_file()

    assert wb.summary["train/loss"] == pytest.approx(rows[-1]["train/loss"]) and wb.summary["status"] == "finished"
    assert {"config.yaml", "run.json"} <= set(wb.files) and wb.exit_code == 0
    [artifact] = wb.artifacts
    assert artifact["type"] == "model" and "unet/diffusion_pytorch_model.safetensors" in artifact["files"]

    # wandb's own reader agrees.
    leet = leet_summary(wb)
    assert leet["state"] == "finished" and leet["run_id"] == wb.run_id
    assert leet["config"]["model"] == "unet_tiny" and leet["summary"]["train/step"] == 4


def test_resumed_run_continues_the_same_wandb_run(train, cache_dir):
    run_dir, _ = train("logger=wandb", "trainer.max_steps=2")
    first = only_run(run_dir)
    run_main("train", f"resume={run_dir}", f"cache_dir={cache_dir}", "trainer.max_steps=4", check=True)

    segments = find_runs(run_dir / "wandb")
    assert len(segments) == 2, "the resume writes its own offline segment of the same run"
    assert {s.run_id for s in segments} == {first.run_id} == {RunDir(run_dir).info()["wandb_run_id"]}
    assert [h["train/step"] for h in segments[1].history if "train/loss" in h] == [3, 4]
    assert [s.exit_code for s in segments] == [0, 0]


def test_multirun_gives_one_finished_wandb_run_per_job(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    # Hydra's multirun in this process, as the command line runs it (the basic launcher runs the jobs one
    # after the other in the command's own process): W&B is started and finished once per job.
    run_main("train", "-m", *TINY, "logger=wandb", "seed=0,1", "trainer.max_steps=2", f"hydra.sweep.dir={sweep}",
             f"cache_dir={cache_dir}", check=True)
    jobs = sorted(p for p in sweep.iterdir() if (p / "run.json").is_file())
    assert [j.name for j in jobs] == ["0_unet_tiny-cosine-s0", "1_unet_tiny-cosine-s1"]
    runs = [only_run(j) for j in jobs]
    assert len({r.run_id for r in runs}) == 2
    assert [r.config["seed"] for r in runs] == [0, 1] and [r.name for r in runs] == [j.name[2:] for j in jobs]
    assert [r.exit_code for r in runs] == [0, 0] and [r.summary["status"] for r in runs] == ["finished"] * 2
    assert [RunDir(j).info()["wandb_run_id"] for j in jobs] == [r.run_id for r in runs]


def test_failed_run_is_recorded_as_failed(train):
    run_dir, proc = train("logger=wandb", "trainer.lr=1e30", check=False)  # the loss blows up
    assert proc.returncode == 2 and "non-finite loss" in proc.stderr
    wb = only_run(run_dir)
    assert wb.exit_code != 0 and wb.summary["status"] == "failed" and not wb.artifacts
    assert leet_summary(wb)["state"] == "failed"


# An interrupted run's W&B record (preempting, not finished): test_train's Ctrl-C test, which also resumes it.


def test_wandb_that_cannot_start_costs_one_warning(train):
    run_dir, proc = train("logger=wandb", "logger.project=bad/name")
    output = proc.stdout + proc.stderr
    assert output.count(WARNING) == 1, output[-3000:]
    [line] = [ln for ln in output.splitlines() if WARNING in ln]
    assert "W&B" in line and "Invalid project name" in line
    run = RunDir(run_dir)
    assert run.info()["status"] == "finished" and len([r for r in run.metrics() if "train/loss" in r]) == 4 and run.model_dir.is_dir()
    assert not find_runs(run_dir / "wandb")


def test_unreachable_wandb_server_means_offline_with_one_warning(train, monkeypatch):
    # Credentials present and no WANDB_MODE: `auto` would go online, and the server is not there:
    # the run logs offline at once (no wait for wandb's retries) and says so once.
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("WANDB_MODE")
    start = time.monotonic()
    run_dir, result = train("logger=wandb")
    assert time.monotonic() - start < 60
    output = result.stdout + result.stderr
    assert WARNING not in output, output[-3000:]
    [line] = [ln for ln in output.splitlines() if "W&B server" in ln]
    assert "http://127.0.0.1:9" in line and "logging offline" in line
    assert line.endswith(f"`wandb sync {run_dir}/wandb/offline-run-*`")
    assert RunDir(run_dir).info()["status"] == "finished"
    wb = only_run(run_dir)
    assert wb.path.parent.name.startswith("offline-run-")
    assert [h["train/step"] for h in wb.history if "train/loss" in h] == [1, 2, 3, 4]


def test_bad_logger_mode_is_one_error_line(train):
    _, proc = train("logger=wandb", "logger.mode=onlin", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: logger.mode=onlin: expected one of auto, online")


def test_auto_mode_follows_credentials(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc here
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    assert wandb_mode("auto") == "offline"
    (tmp_path / ".netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {'k' * 40}\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert wandb_mode("auto") == "online"
    assert wandb_mode("disabled") == "disabled" and wandb_mode("dryrun") == "offline"


def test_eval_metrics_keep_their_best_values_in_the_summary(train):
    # The metrics issue computes FID/IS/KID; here the tracker gets the rows the loop would log.
    run_dir, _ = train("logger=wandb", "logger.mode=disabled")
    assert not (run_dir / "wandb").exists(), "logger.mode=disabled writes no W&B files"
    run = RunDir(run_dir)
    cfg = run.config()
    cfg.logger.mode = "offline"
    tracker = make_tracker(cfg.logger, cfg, Accelerator(cpu=True), run, None)
    for step, fid, inception in [(2, 9.0, 1.5), (4, 7.0, 1.2), (6, 8.0, 1.1)]:
        tracker.log({"eval/fid_2k": fid, "eval/kid_2k": fid / 100, "eval/is_2k": inception}, step)
    tracker.finish("finished")

    # In-process, wandb's service may still be writing the file's tail when finish() returns.
    deadline = time.monotonic() + 60
    while (wb := only_run(run_dir)).exit_code is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [h["train/step"] for h in wb.history if "eval/fid_2k" in h] == [2, 4, 6]
    assert wb.summary["eval/fid_2k"] == {"min": 7.0, "last": 8.0}
    assert wb.summary["eval/kid_2k"] == pytest.approx({"min": 0.07, "last": 0.08})
    assert wb.summary["eval/is_2k"] == {"max": 1.5, "last": 1.1}


def test_tensorboard_writes_event_files(train):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = train("logger=tensorboard")
    events = list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0}).Reload()
    losses = [e.value for e in acc.Scalars("train/loss")]
    rows = [r for r in RunDir(run_dir).metrics() if "train/loss" in r]
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert losses == pytest.approx([r["train/loss"] for r in rows], rel=1e-6)
    assert [e.step for e in acc.Images("samples/grid")] == [2, 4]
