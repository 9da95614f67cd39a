"""Every mistake one line, before anything is created; refused resumes leave the run as it was.

The commands run through their real Hydra ``main`` in this process (``run_main``): Hydra parses the
command line and makes its output folder, so "nothing under outputs/" is what a user would see.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY, cli_env, run_cli, run_main


def one_error_line(result) -> str:
    """The one ``error:`` line of a refused command (and no traceback)."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in (result.stderr + result.stdout).splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (links as their targets' names), for byte-for-byte comparison."""
    return {str(p.relative_to(folder)): (os.readlink(p).encode() if p.is_symlink() else p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file() or p.is_symlink()}


TRAIN_MISTAKES = [
    (["trainer.batch_size=0"], "error: trainer.batch_size=0: expected an integer >= 1"),
    (["trainer.batch_size=-8"], "error: trainer.batch_size=-8: expected an integer >= 1"),
    (["trainer.lr=-1"], "error: trainer.lr=-1: expected a number > 0"),
    (["trainer.lr=abc"], "error: trainer.lr=abc: expected a number > 0"),
    (["trainer.max_steps=0"], "error: trainer.max_steps=0: expected an integer >= 1"),
    (["trainer.ema.decay=1.5"], "error: trainer.ema.decay=1.5: expected a number >= 0 and < 1"),
    (["trainer.keep_checkpoints=0"], "error: trainer.keep_checkpoints=0: expected an integer >= 1"),
    (["trainer.log_every=0"], "error: trainer.log_every=0: expected an integer >= 1"),
    (["trainer.eval_every=-1"], "error: trainer.eval_every=-1: expected an integer >= 0 or auto"),
    (["trainer.betas=[0.9]"], "error: trainer.betas=[0.9]: expected two numbers in [0, 1), e.g. [0.9,0.999]"),
    (["trainer.mixed_precision=fp16"], "error: trainer.mixed_precision=fp16: needs a CUDA GPU"),
    (["trainer.mixed_precision=fp8"], "error: trainer.mixed_precision=fp8: expected one of no, fp16, bf16"),
    (["sampler.steps=0"], "error: sampler.steps=0: expected an integer >= 1"),
    (["dataset.resolution=0"], "error: dataset.resolution=0: expected an integer >= 1"),
    (["dataset.channels=2"], "error: dataset.channels=2: expected 1 (grayscale) or 3 (RGB)"),
    (["dataset.resolution=10", "model=unet_small"], "error: dataset.resolution=10 is not divisible by 4"),
    (["trainer.batch_size=6", "trainer.grad_accum=4"], "error: trainer.batch_size=6 does not split evenly"),
    (["trainer.loss_weighting=snr"], "error: trainer.loss_weighting=snr: expected one of uniform, min_snr"),
    (["trainer.lr_schedule=sawtooth"], "error: trainer.lr_schedule=sawtooth"),
    (["trainer.compile=true", "trainer.compile_mode=fastest"], "error: trainer.compile_mode=fastest: expected one of"),
    (["trainer.compile=true", "trainer.compile_backend=turbo"], "error: trainer.compile_backend=turbo: expected one of"),
    (["trainer.compile=true", "trainer.compile_backend=eager", "trainer.compile_mode=max-autotune"],
     "error: trainer.compile_mode=max-autotune: a mode of the inductor backend"),
    (["logger=wandb", "logger.mode=onlin"], "error: logger.mode=onlin: expected one of auto, online"),
    (["metric=digits", "dataset=flowers102"], "error: metric=digits: its feature network is a digit classifier"),
    (["metric.num_samples=1"], "error: metric.num_samples=1: need an integer of at least 2"),
    (["metric=fid_is", "metric.metrics=[fd,fd_balanced]"],
     "error: metric.metrics: fd_balanced needs a classifier of the dataset's classes (network: digits), not inception"),
    (["metric=digits", "metric.num_samples=3"], "error: metric.pr_k=3: precision/recall needs 1 <= pr_k < metric.num_samples (3)"),
    (["trainer.ema.inv_gamma=0"], "error: trainer.ema.inv_gamma=0: expected a number > 0"),
    (["+sampler.scheduler.no_such=1"], "error: sampler.scheduler.no_such: not an option of DPMSolverMultistepScheduler"),
    (["scheduler=cosine", "sampler=dpmpp", "+sampler.scheduler.use_karras_sigmas=true", "sampler.steps=20"],
     "error: sampler=DPMSolverMultistepScheduler: its options give repeated timesteps on this noise schedule (998, 998"),
    (["dataset=imagefolder", "dataset.path=/nowhere/at/all"], "error: dataset.path=/nowhere/at/all: no such directory"),
    (["output_root=/etc/hostname/outputs"], "error: output_root=/etc/hostname/outputs: not a folder this user can write in"),
    (["resume=/nowhere/at/all"], "error: run=/nowhere/at/all: not a diffexp run directory (no config.yaml)"),
    (["init_from=/nowhere/at/all"], "error: init_from=/nowhere/at/all: not a diffexp run directory (no config.yaml)"),
    (["trainer.stop_at=0"], "error: trainer.stop_at=0: expected an integer >= 1 or null"),
]


@pytest.mark.parametrize("overrides,expected", TRAIN_MISTAKES, ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_a_wrong_training_input_is_one_line_and_creates_nothing(overrides, expected, tmp_path, cache_dir):
    outputs = tmp_path / "outputs"
    result = run_main("train", *TINY, "logger=none", f"output_root={outputs}", f"cache_dir={cache_dir}", *overrides)
    assert one_error_line(result).startswith(expected)
    assert not outputs.exists() or not any(outputs.iterdir())


def test_the_default_config_passes_its_checks_and_trains(tmp_path, cache_dir):
    """The main command's config as it is (only shortened): every automatic choice resolves."""
    result = run_main("train", "logger=none", f"output_root={tmp_path / 'outputs'}", f"cache_dir={cache_dir}",
                      "trainer.max_steps=2", "metric.num_samples=10", "trainer.grid_size=4")
    assert result.returncode == 0, result.stderr[-2000:]
    [config] = [p for p in (tmp_path / "outputs").rglob("config.yaml") if p.parent.name != ".hydra"]
    import yaml

    cfg = yaml.safe_load(config.read_text())
    assert (cfg["sampler"]["name"], cfg["sampler"]["steps"], cfg["metric"]["network"]) == ("dpmpp_sde", 20, "digits")


def test_surprising_but_valid_values_get_one_warning_each(tmp_path, cache_dir):
    result = run_main("train", *TINY, "logger=none", f"output_root={tmp_path}", f"cache_dir={cache_dir}",
                      "trainer.warmup_steps=10", "trainer.max_steps=2", "trainer.ema.use_warmup=false")
    assert result.returncode == 0
    warnings = [line for line in (result.stdout + result.stderr).splitlines() if "WARNING" in line and "trainer." in line]
    assert len(warnings) == 2 and "never reaches trainer.lr" in warnings[0] and "averages over" in warnings[1]


def test_the_real_command_line_exits_2_with_one_line(tmp_path):
    proc = run_cli("train", *TINY, f"output_root={tmp_path / 'outputs'}", "trainer.batch_size=0", check=False)
    assert one_error_line(proc) == "error: trainer.batch_size=0: expected an integer >= 1"
    assert not (tmp_path / "outputs").exists()


SAMPLE_MISTAKES = [
    (["n=0"], "error: n=0: expected an integer >= 1"),
    (["sampler.steps=0"], "error: sampler.steps=0: expected an integer >= 1 or null"),
    (["sampler=ddpm", "sampler.steps=5000"], "error: sampler.steps=5000: `num_inference_steps`: 5000 cannot be larger"),
    (["out=x.png"], "error: out=x.png: expected a file name ending in .npz"),
    (["class_label=3"], "is an unconditional run"),
]


@pytest.mark.parametrize("args,expected", SAMPLE_MISTAKES, ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_a_wrong_sampling_input_is_one_line(args, expected, finished_run):
    result = run_main("sample", f"run={finished_run}", *args)
    assert expected in one_error_line(result)


def test_a_missing_run_for_sample_and_evaluate_is_one_line(tmp_path):
    for command in ("sample", "evaluate"):
        result = run_main(command, f"run={tmp_path / 'nowhere'}")
        assert one_error_line(result) == f"error: run={tmp_path / 'nowhere'}: not a diffexp run directory (no config.yaml)"


# --- resume: what it may change, what it refuses, and that a refusal changes nothing ---------------------

RECIPE = "a resume continues the same recipe; for a changed recipe start a new run from a checkpoint: " \
         "python -m diffexp.train init_from={run} checkpoint=4 "
REFUSED_RESUMES = [
    (["trainer.lr=5e-5"], "error: trainer.lr=5e-05: " + RECIPE + "trainer.lr=5e-05"),
    (["trainer.betas=[0.9,0.99]"], "error: trainer.betas=[0.9, 0.99]: " + RECIPE + "trainer.betas=[0.9,0.99]"),
    (["trainer.ema.decay=0.5"], "error: trainer.ema.decay=0.5: " + RECIPE + "trainer.ema.decay=0.5"),
    (["trainer.lr_schedule=constant"], "error: trainer.lr_schedule=constant: " + RECIPE + "trainer.lr_schedule=constant"),
    (["seed=3"], "error: seed=3: " + RECIPE + "seed=3"),
    (["seed=3", "dataset.resolution=32"], "error: seed=3: a resume continues the same recipe"),
    (["dataset.channels=3"], "error: dataset.channels=3: a resume continues the same recipe"),
    (["trainer.batch_size=16"], "error: trainer.batch_size=16: a resume continues the same recipe"),
    (["model.block_out_channels=[8,16]"], "error: model.block_out_channels=[8, 16]: " + RECIPE
     + "model.block_out_channels=[8,16]"),
    (["scheduler.prediction_type=v_prediction"], "error: scheduler.prediction_type=v_prediction: a resume continues"),
    (["trainer.mixed_precision=bf16"], "error: trainer.mixed_precision=bf16: a resume continues the same recipe"),
    (["model=unet_small"], "error: model=unet_small: " + RECIPE + "model=unet_small"),
    (["trainer.max_steps=3"], "error: trainer.max_steps=3: a resume may only extend the run's 4 steps; for a shorter "
                              "run: python -m diffexp.train init_from={run} checkpoint=STEP trainer.max_steps=3"),
    (["trainer.max_steps=abc"], "error: trainer.max_steps=abc: expected an integer >= 1"),
    (["trainer.stop_at=2"], "error: trainer.stop_at=2: not after the checkpoint's step (4)"),
    (["trainer.stop_at=0", "trainer.max_steps=6"], "error: trainer.stop_at=0: not after the checkpoint's step (4)"),
    (["init_from={run}"], "error: init_from={run}: a new run; resume= continues one (give one of them)"),
]


@pytest.mark.parametrize("overrides,expected", REFUSED_RESUMES, ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_a_refused_resume_leaves_the_run_byte_identical(overrides, expected, finished_run):
    before = snapshot(finished_run)
    result = run_main("train", f"resume={finished_run}", *(o.format(run=finished_run) for o in overrides))
    assert one_error_line(result).startswith(expected.format(run=finished_run))
    assert snapshot(finished_run) == before


def test_a_corrupt_record_is_refused_in_one_line_and_left_alone(finished_run):
    for name, text in (("config.yaml", "trainer: [unclosed"), ("run.json", "{not json")):
        original = (finished_run / name).read_bytes()
        (finished_run / name).write_text(text)
        before = snapshot(finished_run)
        for command, args in (("train", [f"resume={finished_run}", "trainer.max_steps=6"]),
                              ("reproduce", [f"run={finished_run}", f"hydra.run.dir={finished_run}_again"])):
            line = one_error_line(run_main(command, *args))
            assert str(finished_run / name) in line and "cannot be read" in line, line
        assert snapshot(finished_run) == before
        (finished_run / name).write_bytes(original)


def test_resuming_a_finished_run_says_so_and_does_nothing(finished_run):
    before = snapshot(finished_run)
    for unchanged in ([], ["trainer.log_every=2", "trainer.lr=0.001"]):  # what does not alter the steps, or repeats
        result = run_main("train", f"resume={finished_run}", *unchanged)
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"{finished_run} is finished (4 of 4 steps): nothing to do" in result.stdout
        assert snapshot(finished_run) == before  # no new W&B segment, no record touched


def test_ctrl_c_during_start_up_is_one_line_and_records_nothing(tmp_path, cache_dir):
    outputs, scratch = tmp_path / "outputs", tmp_path / "tmp"
    scratch.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "diffexp.train", *TINY, f"output_root={outputs}",
                             f"cache_dir={cache_dir}", "logger=none"], cwd=REPO, env=cli_env(TMPDIR=str(scratch)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(scratch.glob("diffexp-session-*")):  # Hydra has composed the config: start-up is under way
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == [
        "error: interrupted (Ctrl-C) during start-up; nothing was recorded"] or \
        [line for line in stderr.splitlines() if line.startswith("error:")][0].startswith("error: interrupted (Ctrl-C)")
    assert not list(outputs.rglob("run.json")) or json.loads(next(outputs.rglob("run.json")).read_text())["status"] \
        == "interrupted"
