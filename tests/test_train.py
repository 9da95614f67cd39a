"""The training runner end to end: what a run writes, determinism, resume, export, bad input."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, TINY, cli_env, crashed_copy, run_main, run_train
from diffusers import DDPMPipeline, UNet2DModel
from diffusers.training_utils import EMAModel
from omegaconf import OmegaConf
from safetensors.torch import load_file

from diffexp.records.rundir import step_of


def losses(run_dir):
    return [(r["step"], r["train/loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in r]


def weights(run_dir):
    return load_file(run_dir / "model" / "unet" / "diffusion_pytorch_model.safetensors")


def same_weights(a, b) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(v, wb[k]) for k, v in wa.items())


def test_tiny_run_writes_the_whole_run_directory(train):
    run, _ = train("trainer.max_steps=5", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=2")
    for f in ("config.yaml", "run.json", "metrics.jsonl", "model/model_index.json"):
        assert (run / f).is_file(), f
    config = (run / "config.yaml").read_text()
    assert "${" not in config  # resolved
    cfg = yaml.safe_load(config)
    assert cfg["trainer"]["max_steps"] == 5 and cfg["choices"]["model"] == "unet_tiny" and "hydra" not in cfg
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["num_processes"] == 1 and info["seed"] == 0
    assert {"git", "packages", "command", "host", "start", "end"} <= set(info)
    assert info["packages"]["diffusers"] and info["packages"]["torch"] and info["fused_adamw"] is True
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/fd_digits_50" in r] == [5]  # the default metric, at the end
    rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for r in rows:
        assert {"train/loss", "train/lr", "train/grad_norm", "train/img_per_s", "train/step"} <= set(r)
        assert np.isfinite(r["train/loss"]) and r["train/img_per_s"] > 0
    assert sorted(p.name for p in (run / "samples").glob("step_*.png")) == ["step_0000002.png", "step_0000004.png",
                                                                            "step_0000005.png"]
    # checkpoints at 2, 4 and the last step, newest 2 kept, no partial folders left behind
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000004", "step_0000005"]


@pytest.mark.gpu
def test_exported_model_loads_in_an_unmodified_ddpm_pipeline(finished_run):
    run = finished_run
    pipe = DDPMPipeline.from_pretrained(run / "model")
    assert isinstance(pipe.unet, UNet2DModel)
    out = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (2, 8, 8, 1) and np.isfinite(out).all()
    # the exported weights are the EMA weights saved in the last checkpoint, not the raw ones
    ema_state = torch.load(run / "checkpoints" / "step_0000004" / "custom_checkpoint_1.pkl", weights_only=True)
    assert all(torch.equal(v, ema_state["weights"][k]) for k, v in pipe.unet.state_dict().items())
    raw = load_file(run / "checkpoints" / "step_0000004" / "model.safetensors")
    assert not all(torch.equal(raw[k], v) for k, v in pipe.unet.state_dict().items())


@pytest.mark.gpu
def test_sample_cli_writes_npz_and_grid_and_matches_the_exported_pipeline(finished_run, tmp_path):
    run = finished_run
    out = tmp_path / "s" / "samples.npz"
    run_main("sample", f"run={run}", "n=5", "seed=1", f"out={out}", check=True)
    images = np.load(out)["images"]
    assert images.dtype == np.uint8 and images.shape == (5, 8, 8, 1)
    assert out.with_suffix(".png").is_file()
    # The run's own sampler, as exported: plain diffusers gives the same images for the same seed.
    pipe = DDPMPipeline.from_pretrained(run / "model")
    cfg = OmegaConf.load(run / "config.yaml")
    theirs = pipe(batch_size=5, num_inference_steps=cfg.sampler.steps, generator=torch.Generator().manual_seed(1),
                  output_type="np").images
    assert np.array_equal(np.round(theirs * 255).astype(np.uint8), images)
    # Another sampler, its step count alone, and a bad file name.
    proc = run_main("sample", f"run={run}", "n=5", "sampler=dpmpp", "sampler.steps=3", "seed=1", f"out={tmp_path / 'd.npz'}", check=True)
    assert "5 images" in proc.stdout and not np.array_equal(np.load(tmp_path / "d.npz")["images"], images)
    run_main("sample", f"run={run}", "n=2", "sampler.steps=1", f"out={tmp_path / 'one.npz'}", check=True)
    bad = run_main("sample", f"run={run}", "out=x.png", check=False)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: out=x.png: expected a file name ending in .npz")


def test_same_seed_same_losses_and_other_seed_not(train):
    a, _ = train("trainer.max_steps=6", "trainer.sample_every=0", name="a")
    b, _ = train("trainer.max_steps=6", "trainer.sample_every=0", name="b")
    c, _ = train("trainer.max_steps=6", "trainer.sample_every=0", "seed=1", name="c")
    assert losses(a) == losses(b)
    assert losses(a) != losses(c)
    assert same_weights(a, b)


def test_resume_after_a_crash_equals_the_uninterrupted_run(train, tmp_path):
    # log_every=3 and checkpoints every 2: the crash leaves a checkpoint inside a log interval, so the
    # first row after the resume averages steps from both sides of it.
    common = ["trainer.max_steps=9", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=10",
              "trainer.log_every=3", "trainer.sample_every=0", "dataset.random_flip=true",
              "trainer.loss_weighting=min_snr", "trainer.grad_accum=2"]
    full, _ = train(*common, name="full")
    # A crash right after step 5: the checkpoint of step 4 is the newest, rows up to step 3 were logged,
    # and the last row was cut short by the kill.
    crashed = crashed_copy(full, tmp_path / "crashed", checkpoint=4, logged=1)
    with open(crashed / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "train/lo')
    run_train(f"resume={crashed}")
    assert losses(crashed) == losses(full) and [s for s, _ in losses(full)] == [3, 6, 9]
    assert same_weights(crashed, full)
    info = json.loads((crashed / "run.json").read_text())
    assert info["status"] == "finished" and len(info["resumes"]) == 1


def test_the_command_line_records_its_run_and_ctrl_c_checkpoints_and_resumes_identically(train, tmp_path, cache_dir):
    """The end-to-end run of the real command line (the rest run in-process; W&B offline, the default
    logger): Hydra's record and the run's, then Ctrl-C: a checkpoint, the run and its W&B run marked
    interrupted, and the resume finishes as the uninterrupted run did."""
    from test_tracking import leet_summary, only_run

    common = ["trainer.max_steps=120", "trainer.checkpoint_every=0", "trainer.sample_every=0", "trainer.log_every=7"]
    full, _ = train(*common, name="full")
    run = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, "-m", "diffexp.train", *TINY, f"hydra.run.dir={run}", f"cache_dir={cache_dir}",
                             "logger=wandb", *common], cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
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
    for f in (".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "train.log", "config.yaml"):
        assert (run / f).is_file(), f
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "interrupted" and "diffexp.train" in " ".join(info["command"])
    (checkpoint,) = (run / "checkpoints").iterdir()
    stopped_at = step_of(checkpoint)
    assert 21 <= stopped_at < 120 and not (run / "model").exists()
    wb = only_run(run)  # W&B's record says so too: preempted (to be resumed), not finished
    assert wb.preempting and wb.exit_code != 0 and wb.summary["status"] == "interrupted"
    assert leet_summary(wb)["state"] != "finished"
    run_train(f"resume={run}")
    assert losses(run) == losses(full)  # stopped inside a log interval (most likely), resumed exactly
    assert same_weights(run, full)
    assert json.loads((run / "run.json").read_text())["status"] == "finished"


def lrs(run_dir):
    return [r["train/lr"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "train/lr" in r]


def test_resume_can_extend_max_steps(finished_run):
    """A longer max_steps: the LR schedule is rebuilt for the new horizon and goes on from its position."""
    from diffexp.models.build import build_lr_scheduler

    run = finished_run
    run_train(f"resume={run}", "trainer.max_steps=6")
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4, 5, 6]
    cfg = OmegaConf.load(run / "config.yaml")  # the saved config with the accepted override
    assert cfg.trainer.max_steps == 6 and "changes" not in cfg
    (resumed,) = json.loads((run / "run.json").read_text())["resumes"]
    assert resumed["step"] == 4 and resumed["max_steps"] == [4, 6]
    schedule = build_lr_scheduler(cfg.trainer, torch.optim.SGD([torch.zeros(1)], lr=cfg.trainer.lr))
    expected = []
    for _ in range(6):
        expected.append(schedule.get_last_lr()[0])
        schedule.step()
    assert lrs(run)[4:] == pytest.approx(expected[4:], rel=1e-12) and lrs(run)[4:] != lrs(run)[2:4]


def test_a_resume_can_turn_evaluation_on(train):
    run, _ = train("trainer.eval_every=0", "metric=digits", name="quiet")
    assert not any("eval/fd_digits_50" in r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()))
    run_train(f"resume={run}", "trainer.max_steps=6", "trainer.eval_every=2")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/fd_digits_50" in r] == [6]  # its interval counts from the start


def test_stop_at_stops_with_a_checkpoint_and_resume_finishes_identically(train):
    common = ["trainer.max_steps=6", "trainer.checkpoint_every=0", "trainer.sample_every=0"]
    full, _ = train(*common, name="full")
    run, result = train(*common, "trainer.stop_at=3", name="stopped", check=False)
    assert result.returncode == 130 and "Continue with: python -m diffexp.train resume=" in result.stderr
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000003"] and not (run / "model").exists()
    run_train(f"resume={run}")
    assert losses(run) == losses(full) and same_weights(run, full)
    assert OmegaConf.load(run / "config.yaml").trainer.stop_at is None  # the stopping point was that command's


def child_setup(parent, tmp_path, cache_dir, *overrides):
    """The child run's parts as ``setup`` builds them (before its first step; nothing is written)."""
    from conftest import compose_config, end_process

    from diffexp.train import plan
    from diffexp.training.loop import setup

    cfg, run_dir, resume = plan(compose_config([*TINY, f"cache_dir={cache_dir}", "logger=none",
                                                f"init_from={parent}", *overrides]), str(tmp_path / "child"))
    try:
        return cfg, setup(cfg, run_dir, resume)
    finally:
        end_process()


def test_init_from_starts_a_new_run_from_a_checkpoint_with_a_changed_recipe(train, tmp_path, cache_dir):
    from diffexp.records.catalog import summarize
    from diffexp.records.rundir import RunDir
    from diffexp.training.checkpoints import EMA_FILE

    parent, _ = train("trainer.checkpoint_every=1", "trainer.keep_checkpoints=5", "logger=wandb", name="parent")
    saved = parent / "checkpoints" / "step_0000003"  # its EMA is not the model (updated at 2)
    cfg, p = child_setup(parent, tmp_path, cache_dir, "checkpoint=3", "trainer.lr=5e-4", "init_optimizer=true")
    raw, ema = load_file(saved / "model.safetensors"), torch.load(saved / EMA_FILE, weights_only=True)["weights"]
    assert all(torch.equal(v, raw[k]) for k, v in p.net.state_dict().items())  # the child's weights at step 0
    assert all(torch.equal(v, ema[k]) for k, v in p.ema.model.state_dict().items())
    assert not all(torch.equal(raw[k], v) for k, v in ema.items())  # (model and EMA are two things)
    moments = torch.load(saved / "optimizer.bin", weights_only=True)["state"]
    assert torch.equal(p.optimizer.state_dict()["state"][0]["exp_avg"], moments[0]["exp_avg"])
    assert p.state.step == 0 and p.ema.step == 0 and p.optimizer.param_groups[0]["initial_lr"] == 5e-4
    # The average goes on from the parent's 3 steps: the child's first update keeps part of it.
    assert p.ema.age == 3 and p.ema.decay_at(1) > 0
    assert (cfg.init_from, cfg.checkpoint, cfg.name) == (str(parent), 3, "unet_tiny-cosine-s0-from3")
    assert not (tmp_path / "child").exists()

    child, _ = train(f"init_from={parent}", "checkpoint=3", "trainer.lr=5e-4", "logger=wandb", name="child")
    info = json.loads((child / "run.json").read_text())  # (offline W&B: no fork, the parent in its config)
    assert info["status"] == "finished" and info["parent"] == {
        "run": str(parent), "step": 3, "wandb_run_id": json.loads((parent / "run.json").read_text())["wandb_run_id"]}
    assert info["wandb_run_id"] and info["wandb_run_id"] != info["parent"]["wandb_run_id"]
    assert [s for s, _ in losses(child)] == [1, 2, 3, 4] and max(lrs(child)) == pytest.approx(5e-4)
    assert OmegaConf.load(child / "config.yaml").trainer.lr == 5e-4
    assert summarize(RunDir(child))["parent"] == "parent@3" and summarize(RunDir(parent))["parent"] is None
    listed = run_main("runs", str(tmp_path), check=True).stdout
    assert "parent" in listed.splitlines()[0] and "parent@3" in listed
    run_main("compare", str(parent), str(child), "status=all", f"out={tmp_path / 'cmp'}", check=True)
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "parent@3" in report and "differ in init_from" in report  # a child differs from a fresh run there


def test_compare_flags_neither_a_stopping_point_nor_the_keys_older_configs_lack():
    from diffexp.report.stats import mismatches

    older = OmegaConf.create({"trainer": {"lr": 1e-3}})
    newer = OmegaConf.create({"trainer": {"lr": 1e-3, "stop_at": 5}, "init_from": None, "checkpoint": None,
                              "init_optimizer": False})
    assert mismatches([older, newer], ["group"], [{"steps": 4}, {"steps": 4}]) == []
    child = OmegaConf.merge(newer, {"init_from": "/runs/parent", "checkpoint": 3})
    assert [line.split(" besides")[0] for line in mismatches([older, child], ["group"], [{"steps": 4}] * 2)] == [
        "runs differ in checkpoint", "runs differ in init_from"]


def test_checkpoint_without_init_from_and_a_reproduction_into_another_run_are_one_line(finished_run, train, tmp_path):
    _, proc = train(f"resume={finished_run}", "checkpoint=2", "trainer.max_steps=6", name="x", check=False)
    assert error_line(proc).startswith("error: checkpoint=2: goes with init_from=RUN_DIR")
    other, _ = train(name="other")
    before = (other / "run.json").read_bytes()
    result = run_main("reproduce", f"run={finished_run}", f"hydra.run.dir={other}")
    assert result.returncode == 2 and f"error: hydra.run.dir={other}: holds a run" in result.stderr
    assert (other / "run.json").read_bytes() == before


def test_init_from_refuses_a_missing_checkpoint_and_a_model_that_does_not_fit(finished_run, train, tmp_path):
    def error(*overrides):
        run, proc = train(f"init_from={finished_run}", *overrides, name="child", check=False)
        assert not run.exists() or not any(run.iterdir())
        return error_line(proc)

    assert error("checkpoint=3") == f"error: checkpoint=3: {finished_run} has no such complete checkpoint (steps: 2, 4)"
    assert error("model.block_out_channels=[8,16]").startswith(
        f"error: init_from={finished_run} checkpoint=4: its weights do not fit this model (size mismatch for ")
    assert error(f"init_from={tmp_path / 'nowhere'}") == (
        f"error: init_from={tmp_path / 'nowhere'}: not a diffexp run directory (no config.yaml)")


def test_init_from_on_the_command_line_names_its_folder_after_the_parent(finished_run, tmp_path, cache_dir):
    outputs = tmp_path / "outputs"
    run_main("train", *TINY, f"init_from={finished_run}", "checkpoint=last", f"output_root={outputs}",
             f"cache_dir={cache_dir}", "logger=none", "trainer.max_steps=2", check=True)
    (child,) = [p.parent for p in outputs.rglob("run.json")]
    assert child.name.endswith("_unet_tiny-cosine-s0-from4") and (child / ".hydra" / "overrides.yaml").is_file()
    assert json.loads((child / "run.json").read_text())["parent"]["step"] == 4


def test_reproduce_of_a_child_run_uses_or_reproduces_its_parents_checkpoint(train, tmp_path):
    parent, _ = train("trainer.checkpoint_every=1", "trainer.keep_checkpoints=5", name="parent")
    child, _ = train(f"init_from={parent}", "checkpoint=2", "trainer.lr=5e-4", name="child")
    again = tmp_path / "again"
    result = run_main("reproduce", f"run={child}", "check=true", f"hydra.run.dir={again}")
    assert "check: 4 logged losses compared; largest difference 0 (identical)" in result.stdout, result.stderr[-2000:]
    assert json.loads((again / "run.json").read_text())["parent"]["run"] == str(parent)
    shutil.rmtree(parent / "checkpoints" / "step_0000002")  # the parent's checkpoint is gone: reproduce it first
    once_more = tmp_path / "once_more"
    result = run_main("reproduce", f"run={child}", "check=true", f"hydra.run.dir={once_more}")
    assert "check: 4 logged losses compared; largest difference 0 (identical)" in result.stdout, result.stderr[-2000:]
    rebuilt = tmp_path / "once_more_parent"
    assert json.loads((rebuilt / "run.json").read_text())["status"] == "interrupted"  # stopped at the step
    assert sorted(p.name for p in (rebuilt / "checkpoints").iterdir()) == ["step_0000001", "step_0000002"]
    assert json.loads((once_more / "run.json").read_text())["parent"]["run"] == str(rebuilt)
    assert same_weights(child, once_more)


def test_reproduce_of_an_extended_run_warns_that_it_trains_the_final_recipe(finished_run, tmp_path):
    run_train(f"resume={finished_run}", "trainer.max_steps=5")
    result = run_main("reproduce", f"run={finished_run}", "logger=none", f"hydra.run.dir={tmp_path / 'again'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("warning: the run was extended on resume (trainer.max_steps 4 -> 5 at step 4): this trains its final "
            "recipe from the start") in result.stderr
    assert [s for s, _ in losses(tmp_path / "again")] == [1, 2, 3, 4, 5]


def test_a_run_with_recorded_changes_still_reads_and_reproduces_its_original_recipe(finished_run, tmp_path):
    """Runs of an older diffexp recorded a resume's changed settings as `changes`: they still load and
    sample; a resume is refused in one line; reproduce reruns the original recipe with a warning."""
    cfg = OmegaConf.load(finished_run / "config.yaml")
    cfg.changes = [{"step": 2, "set": {"trainer.lr": 2e-4}}]
    OmegaConf.save(cfg, finished_run / "config.yaml")
    run_main("sample", f"run={finished_run}", "n=2", f"out={tmp_path / 's.npz'}", check=True)
    line = error_line(run_train(f"resume={finished_run}", "trainer.max_steps=6", check=False))
    assert line.startswith(f"error: resume={finished_run}: its config.yaml records `changes`") and "init_from=" in line
    result = run_main("reproduce", f"run={finished_run}", "logger=none", f"hydra.run.dir={tmp_path / 'again'}")
    assert result.returncode == 0 and "which are not replayed: this reproduces its original recipe" in result.stderr
    assert "changes" not in OmegaConf.load(tmp_path / "again" / "config.yaml")


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_other_prediction_targets_and_grad_accumulation_train(train, prediction_type):
    run, _ = train(f"scheduler.prediction_type={prediction_type}", "scheduler=cosine", "trainer.grad_accum=2",
                   "trainer.loss_weighting=min_snr", "sampler=dpmpp")
    assert len(losses(run)) == 4 and all(np.isfinite(l) for _, l in losses(run))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weighting_works_with_zero_terminal_snr(train, prediction_type):
    """min(SNR, gamma) / SNR at SNR = 0 is 0/0 unless written with its limit (1)."""
    from conftest import compose_config

    from diffexp.models.build import build_objective

    cfg = compose_config(["scheduler.rescale_betas_zero_snr=true", f"scheduler.prediction_type={prediction_type}",
                          "trainer.loss_weighting=min_snr"])
    objective = build_objective(cfg.scheduler, cfg.trainer)
    t = torch.tensor([0, 500, 999])
    w = objective.weights(t)
    assert torch.isfinite(w).all()
    assert w[-1].item() == {"epsilon": 1.0, "v_prediction": 0.0, "sample": 0.0}[prediction_type]
    run, _ = train("scheduler.rescale_betas_zero_snr=true", f"scheduler.prediction_type={prediction_type}",
                   "trainer.loss_weighting=min_snr", "trainer.max_steps=6", "trainer.batch_size=64",
                   "trainer.sample_every=0")
    assert json.loads((run / "run.json").read_text())["status"] == "finished"


def test_ema_is_diffusers_ema_at_every_step_and_folds_skipped_decays():
    from diffexp.training.state import EMA

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 3), torch.nn.Linear(3, 2))
    settings = OmegaConf.create(dict(decay=0.999, use_warmup=True, inv_gamma=1.0, power=0.75, update_after_step=1))
    reference = EMAModel(model.parameters(), decay=0.999, use_ema_warmup=True, inv_gamma=1.0, power=0.75,
                         update_after_step=1)
    every_step, every_3 = EMA(model, settings), EMA(model, settings)
    for step in range(1, 13):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=0.01)  # optimizer-sized moves
        reference.step(model.parameters())
        every_step.update(model, step)
        assert every_step.decay_at(step) == reference.get_decay(step)
        for mine, theirs in zip(every_step.model.parameters(), reference.shadow_params):
            torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7)
        if step % 3 == 0:
            before = [p.clone() for p in every_3.model.parameters()]
            kept = float(np.prod([reference.get_decay(s) for s in range(step - 2, step + 1)]))
            every_3.update(model, step)
            for new, old, p in zip(every_3.model.parameters(), before, model.parameters()):
                torch.testing.assert_close(new, kept * old + (1 - kept) * p.detach())
        assert every_3.step == step - step % 3  # the checkpointed counter: the last update
    every_3.update(model, 12)  # already there: nothing changes
    assert every_3.step == 12
    # the folded average stays close to the per-step one while update_every << 1 / (1 - decay)
    assert all(torch.allclose(a, b, atol=0.02, rtol=0) for a, b in zip(every_3.model.parameters(),
                                                                         reference.shadow_params))


def test_a_checkpoint_of_diffexp_0_1_still_resumes(finished_run):
    """Checkpoints written before the plain EMA hold diffusers' EMAModel state and only the step."""
    run = finished_run
    ckpt = run / "checkpoints" / "step_0000004"
    shutil.rmtree(run / "checkpoints" / "step_0000002", ignore_errors=True)
    ema = torch.load(ckpt / "custom_checkpoint_1.pkl", weights_only=True)
    old = {"decay": 0.9999, "min_decay": 0.0, "optimization_step": ema["step"], "update_after_step": 0,
           "use_ema_warmup": True, "inv_gamma": 1.0, "power": 0.75, "shadow_params": list(ema["weights"].values()),
           "collected_params": None}
    torch.save(old, ckpt / "custom_checkpoint_1.pkl")
    torch.save({"step": 4}, ckpt / "custom_checkpoint_2.pkl")
    (ckpt / "manifest.json").unlink()  # diffexp 0.1 wrote none
    exported = weights(run)
    run_train(f"resume={run}", "trainer.max_steps=5")
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4, 5]
    assert not all(torch.equal(v, weights(run)[k]) for k, v in exported.items())  # one more step moved the average


# --- bad input and failures: a non-zero exit, one line naming the problem, and nothing lost -----------------


def error_line(proc) -> str:
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    return lines[-1] if lines[-1].startswith("error:") else lines[0]


def test_unknown_config_option_is_named(tmp_path):
    proc = run_main("train", *TINY, "trainer.no_such_option=1", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode != 0 and "trainer.no_such_option" in proc.stderr.splitlines()[0]


def test_missing_imagefolder_path_is_named(train, tmp_path):
    run, proc = train("dataset=imagefolder", f"dataset.path={tmp_path}/nowhere", check=False)
    line = error_line(proc)
    assert line.startswith("error: dataset.path=") and "nowhere" in line and "no such directory" in line
    assert not (run / "run.json").exists()  # refused before anything was recorded


def test_resume_of_a_folder_without_checkpoint_is_named(tmp_path):
    folder = tmp_path / "not_a_run"
    folder.mkdir()
    proc = run_main("train", f"resume={folder}", check=False)
    assert error_line(proc) == f"error: run={folder}: not a diffexp run directory (no config.yaml)"
    assert list(folder.iterdir()) == []  # nothing was written into it


def test_resume_of_a_run_whose_checkpoints_are_gone_is_named(finished_run):
    run = finished_run
    shutil.rmtree(run / "checkpoints")
    proc = run_train(f"resume={run}", check=False)
    assert error_line(proc) == f"error: resume={run}: no checkpoint in {run / 'checkpoints'}"


def test_resume_refuses_to_change_config_groups(finished_run):
    proc = run_train(f"resume={finished_run}", "model=unet_small", check=False)
    assert error_line(proc) == ("error: model=unet_small: a resume continues the same recipe; for a changed recipe "
                                f"start a new run from a checkpoint: python -m diffexp.train init_from={finished_run} "
                                "checkpoint=4 model=unet_small")


def test_non_finite_weights_are_never_checkpointed(train):
    # Warm-up from lr 0 to 1e39: step 1 changes nothing; step 2's loss is finite (it is computed before
    # the update) but its update overflows the weights. Its checkpoint must not be written.
    run, proc = train("trainer.max_steps=40", "trainer.checkpoint_every=1", "trainer.log_every=1",
                      "trainer.lr=1e39", "trainer.max_grad_norm=0", "trainer.warmup_steps=1",
                      "trainer.lr_schedule=constant_with_warmup", "trainer.sample_every=0",
                      "trainer.keep_checkpoints=5", check=False)
    line = error_line(proc)
    assert line.startswith("error: non-finite loss or weights at or before step 2") and "step_0000001 kept" in line
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000001"]
    state = load_file(run / "checkpoints" / "step_0000001" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in state.values())
    assert all(np.isfinite(loss) for _, loss in losses(run))  # nothing non-finite was recorded
    assert not (run / "model").exists()


def test_non_finite_loss_stops_and_keeps_the_last_checked_checkpoint(train):
    # Warm-up from lr 0 to 1e30: the weights grow huge but stay finite, and step 3's loss is not finite.
    run, proc = train("trainer.max_steps=40", "trainer.checkpoint_every=1", "trainer.log_every=1",
                      "trainer.lr=1e30", "trainer.max_grad_norm=0", "trainer.warmup_steps=1000000000000",
                      "trainer.lr_schedule=constant_with_warmup", "trainer.sample_every=0",
                      "trainer.keep_checkpoints=5", check=False)
    line = error_line(proc)
    assert line.startswith("error: non-finite loss") and "last good checkpoint" in line
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept and kept[-1] in line and len(kept) < 40


def test_a_checkpoint_swap_cut_short_by_a_crash_is_recovered_and_never_listed_twice(finished_run):
    from diffexp.records.rundir import RunDir

    run = RunDir(finished_run)
    folder = run.checkpoints_dir
    # The crash came between the two renames of a swap: the newest checkpoint is under its side name.
    (folder / "step_0000004").rename(folder / ".step_0000004.old")
    (folder / ".tmp_step_0000005").mkdir()  # a partial write
    (folder / "step_0000002.old").mkdir()  # diffexp 0.1's side name, left by a swap that finished
    assert [p.name for p in run.checkpoints()] == ["step_0000002", "step_0000004"]
    assert not (folder / ".step_0000004.old").exists() and not (folder / "step_0000002.old").exists()
    run.prune_checkpoints(1)
    assert [p.name for p in run.checkpoints()] == ["step_0000004"]


def test_bad_loss_weighting_is_refused_before_anything_is_recorded(train):
    run, proc = train("trainer.loss_weighting=snr", check=False)
    assert error_line(proc) == "error: trainer.loss_weighting=snr: expected one of uniform, min_snr"
    assert not run.exists() or not any(run.iterdir())


def test_bad_ema_update_interval_is_named(train):
    _, proc = train("trainer.ema.update_every=0", check=False)
    assert error_line(proc) == "error: trainer.ema.update_every=0: expected an integer >= 1"


def test_batch_that_does_not_split_is_named(train):
    _, proc = train("trainer.batch_size=6", "trainer.grad_accum=4", check=False)
    assert error_line(proc).startswith("error: trainer.batch_size=6 does not split evenly")
