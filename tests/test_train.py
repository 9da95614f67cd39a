"""The training runner end to end: what a run writes, determinism, resume, export, bad input."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDPMPipeline, UNet2DModel
from safetensors.torch import load_file

from conftest import REPO, TINY, cli_env, crashed_copy, run_cli


def losses(run_dir):
    return [(r["step"], r["train/loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in r]


def weights(run_dir):
    return load_file(run_dir / "model" / "unet" / "diffusion_pytorch_model.safetensors")


def test_tiny_run_writes_the_whole_run_directory(train, tmp_path):
    run, _ = train("trainer.max_steps=5", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=2")
    for f in (".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "config.yaml", "run.json",
              "metrics.jsonl", "model/model_index.json"):
        assert (run / f).is_file(), f
    config = (run / "config.yaml").read_text()
    assert "${" not in config  # resolved
    cfg = yaml.safe_load(config)
    assert cfg["trainer"]["max_steps"] == 5 and cfg["choices"]["model"] == "unet_tiny"
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["num_processes"] == 1 and info["seed"] == 0
    assert {"git", "packages", "command", "host", "start", "end"} <= set(info)
    assert info["packages"]["diffusers"] and info["packages"]["torch"] and "diffexp.train" in " ".join(info["command"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for r in rows:
        assert {"train/loss", "train/lr", "train/grad_norm", "train/img_per_s", "train/step"} <= set(r)
        assert np.isfinite(r["train/loss"]) and r["train/img_per_s"] > 0
    assert sorted(p.name for p in (run / "samples").glob("step_*.png")) == ["step_0000002.png", "step_0000004.png",
                                                                            "step_0000005.png"]
    # checkpoints at 2, 4 and the last step, newest 2 kept, no partial folders left behind
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000004", "step_0000005"]


def test_exported_model_loads_in_an_unmodified_ddpm_pipeline(train):
    run, _ = train()
    pipe = DDPMPipeline.from_pretrained(run / "model")
    assert isinstance(pipe.unet, UNet2DModel)
    out = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (2, 8, 8, 1) and np.isfinite(out).all()
    # the exported weights are the EMA weights saved in the last checkpoint, not the raw ones
    ema_state = torch.load(run / "checkpoints" / "step_0000004" / "custom_checkpoint_1.pkl", weights_only=True)
    exported = list(pipe.unet.parameters())
    assert all(torch.equal(e, s) for e, s in zip(exported, ema_state["shadow_params"]))
    raw = load_file(run / "checkpoints" / "step_0000004" / "model.safetensors")
    assert not all(torch.equal(raw[k], v) for k, v in pipe.unet.state_dict().items())


def test_sample_cli_writes_npz_and_grid(train, tmp_path):
    run, _ = train()
    out = tmp_path / "s" / "samples.npz"
    run_cli("sample", f"run={run}", "n=5", "sampler=dpmpp", "sampler.steps=3", "seed=1", f"out={out}")
    images = np.load(out)["images"]
    assert images.dtype == np.uint8 and images.shape == (5, 8, 8, 1)
    assert out.with_suffix(".png").is_file()
    again = tmp_path / "again.npz"
    run_cli("sample", f"run={run}", "n=5", "sampler=dpmpp", "sampler.steps=3", "seed=1", f"out={again}")
    assert np.array_equal(np.load(again)["images"], images)  # same seed, same images


def test_same_seed_same_losses_and_other_seed_not(train):
    a, _ = train("trainer.max_steps=6", "trainer.sample_every=0", name="a")
    b, _ = train("trainer.max_steps=6", "trainer.sample_every=0", name="b")
    c, _ = train("trainer.max_steps=6", "trainer.sample_every=0", "seed=1", name="c")
    assert losses(a) == losses(b)
    assert losses(a) != losses(c)
    assert all(torch.equal(v, weights(b)[k]) for k, v in weights(a).items())


def test_resume_after_a_crash_equals_the_uninterrupted_run(train, tmp_path):
    common = ["trainer.max_steps=8", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=10",
              "trainer.sample_every=0", "dataset.random_flip=true", "trainer.loss_weighting=min_snr"]
    full, _ = train(*common, name="full")
    # A crash right after step 5: the checkpoint of step 4 is the newest, rows up to 5 were logged.
    crashed = crashed_copy(full, tmp_path / "crashed", checkpoint=4, logged=5)
    run_cli("train", f"resume={crashed}")
    assert losses(crashed) == losses(full)
    assert all(torch.equal(v, weights(full)[k]) for k, v in weights(crashed).items())
    info = json.loads((crashed / "run.json").read_text())
    assert info["status"] == "finished" and len(info["resumes"]) == 1
    assert (crashed / ".hydra" / "overrides.yaml").read_text() == (full / ".hydra" / "overrides.yaml").read_text()


def test_sigint_checkpoints_marks_interrupted_and_resume_finishes_identically(train, tmp_path, cache_dir):
    common = ["trainer.max_steps=400", "trainer.checkpoint_every=0", "trainer.sample_every=0", "trainer.log_every=1"]
    full, _ = train(*common, name="full")
    run = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, "-m", "diffexp.train", *TINY, f"hydra.run.dir={run}", f"cache_dir={cache_dir}",
                             "logger=none", *common], cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert "Traceback" not in stderr
    assert f"Continue with: python -m diffexp.train resume={run}" in stdout + stderr
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "interrupted"
    (checkpoint,) = (run / "checkpoints").iterdir()
    stopped_at = int(checkpoint.name.split("_")[1])
    assert 3 <= stopped_at < 400 and not (run / "model").exists()
    run_cli("train", f"resume={run}")
    assert losses(run) == losses(full)
    assert all(torch.equal(v, weights(full)[k]) for k, v in weights(run).items())
    assert json.loads((run / "run.json").read_text())["status"] == "finished"


def test_resume_can_extend_max_steps(train):
    run, _ = train()
    run_cli("train", f"resume={run}", "trainer.max_steps=6")
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4, 5, 6]
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_steps"] == 6


def test_resume_takes_a_new_learning_rate_from_the_command_line(train):
    """Optimizer settings given on resume apply from the next step; the schedule keeps its position."""
    def lrs(run):
        return [r["train/lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if "train/lr" in r]

    common = ["trainer.max_steps=6", "trainer.sample_every=0", "trainer.lr_schedule=cosine"]
    run, _ = train(*common, "trainer.checkpoint_every=4", name="resumed")
    shutil.rmtree(run / "checkpoints" / "step_0000006")  # continue from step 4 with a lower rate
    proc = run_cli("train", f"resume={run}", "trainer.lr=2e-4", "trainer.betas=[0.9,0.99]")
    assert "trainer.lr 0.001 -> 0.0002" in proc.stderr + proc.stdout
    reference, _ = train(*common, "trainer.lr=2e-4", "trainer.betas=[0.9,0.99]", name="reference")
    assert lrs(run)[4:] == lrs(reference)[4:] and lrs(run)[4] < lrs(run)[3]
    state = torch.load(run / "checkpoints" / "step_0000006" / "optimizer.bin", weights_only=True)
    assert [tuple(g["betas"]) for g in state["param_groups"]] == [(0.9, 0.99)]


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_other_prediction_targets_and_grad_accumulation_train(train, prediction_type):
    run, _ = train(f"scheduler.prediction_type={prediction_type}", "scheduler=cosine", "trainer.grad_accum=2",
                   "trainer.loss_weighting=min_snr", "sampler=dpmpp")
    assert len(losses(run)) == 4 and all(np.isfinite(l) for _, l in losses(run))


def test_strided_ema_is_diffusers_ema_at_every_step_and_folds_skipped_decays():
    from diffusers.training_utils import EMAModel

    from diffexp.loop import StridedEMA

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(7)), torch.nn.Parameter(torch.randn(3, 2))]
    kw = dict(decay=0.999, use_ema_warmup=True, inv_gamma=1.0, power=0.75, update_after_step=1, foreach=True)
    reference, every_step, every_3 = EMAModel(params, **kw), StridedEMA(params, **kw), StridedEMA(params, **kw)
    for step in range(1, 13):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p), alpha=0.01)  # optimizer-sized moves
        reference.step(params)
        every_step.catch_up(params, step)
        assert all(torch.equal(a, b) for a, b in zip(every_step.shadow_params, reference.shadow_params))
        if step % 3 == 0:
            before = [s.clone() for s in every_3.shadow_params]
            kept = math.prod(reference.get_decay(s) for s in range(step - 2, step + 1))
            every_3.catch_up(params, step)
            for new, old, p in zip(every_3.shadow_params, before, params):
                torch.testing.assert_close(new, kept * old + (1 - kept) * p.detach())
        assert every_3.optimization_step == step - step % 3  # the checkpointed counter: the last update
    every_3.catch_up(params, 12)  # already there: nothing changes
    assert every_3.optimization_step == 12
    # the folded average stays close to the per-step one while update_every << 1 / (1 - decay):
    # within about one step's move of the weights
    assert all(torch.allclose(a, b, atol=0.02, rtol=0) for a, b in zip(every_3.shadow_params, reference.shadow_params))


# --- bad input: a non-zero exit and one line naming the problem -------------------------------------------


def error_line(proc) -> str:
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    return lines[-1] if lines[-1].startswith("error:") else lines[0]


def test_unknown_config_option_is_named(train):
    _, proc = train("trainer.no_such_option=1", check=False)
    assert proc.returncode != 0 and "trainer.no_such_option" in proc.stderr.splitlines()[0]


def test_missing_imagefolder_path_is_named(train, tmp_path):
    _, proc = train("dataset=imagefolder", f"dataset.path={tmp_path}/nowhere", check=False)
    line = error_line(proc)
    assert line.startswith("error: dataset.path=") and "nowhere" in line and "no such directory" in line


def test_resume_of_a_folder_without_checkpoint_is_named(tmp_path):
    folder = tmp_path / "not_a_run"
    folder.mkdir()
    proc = run_cli("train", f"resume={folder}", check=False)
    assert error_line(proc) == f"error: run={folder}: not a diffexp run directory (no config.yaml)"
    assert list(folder.iterdir()) == []  # nothing was written into it


def test_resume_of_a_run_whose_checkpoints_are_gone_is_named(train):
    run, _ = train()
    shutil.rmtree(run / "checkpoints")
    proc = run_cli("train", f"resume={run}", check=False)
    assert error_line(proc) == f"error: resume={run}: no checkpoint in {run / 'checkpoints'}"


def test_resume_refuses_to_change_config_groups(train):
    run, _ = train()
    proc = run_cli("train", f"resume={run}", "model=unet_small", check=False)
    assert error_line(proc).startswith("error: model=unet_small: a resumed run keeps its config groups")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(train):
    # Warm-up from lr 0 to 1e30: step 1 changes nothing, step 2 blows the weights up, step 3's loss is not finite.
    run, proc = train("trainer.max_steps=40", "trainer.checkpoint_every=1", "trainer.log_every=1",
                      "trainer.lr=1e30", "trainer.max_grad_norm=0", "trainer.warmup_steps=1000000000000",
                      "trainer.lr_schedule=constant_with_warmup", "trainer.sample_every=0",
                      "trainer.keep_checkpoints=5", check=False)
    line = error_line(proc)
    assert line.startswith("error: non-finite loss at or before step") and "last good checkpoint" in line
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept and kept[-1] in line and len(kept) < 40
    state = load_file(run / "checkpoints" / kept[-1] / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in state.values())
    assert all(np.isfinite(loss) for _, loss in losses(run))  # nothing non-finite was recorded
    assert not (run / "model").exists()


def test_bad_ema_update_interval_is_named(train):
    _, proc = train("trainer.ema.update_every=0", check=False)
    assert error_line(proc) == "error: trainer.ema.update_every=0: expected a positive integer"


def test_batch_that_does_not_split_is_named(train):
    _, proc = train("trainer.batch_size=6", "trainer.grad_accum=4", check=False)
    assert error_line(proc).startswith("error: trainer.batch_size=6 does not split evenly")
