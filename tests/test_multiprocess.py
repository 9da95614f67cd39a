"""Two CPU processes under `accelerate launch` work as one run, and evaluate during training as one
process does. One launch serves every test here (a two-process launch costs tens of seconds of start-up):
the most parts at once, a class-conditional DiT in the latent space of a local autoencoder (the U-Net
runs on two processes in test_preemption)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY, cli_env, run_main

from diffexp.sampling.generate import sample_run


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def launched(tmp_path_factory, dataset_cache, tiny_vae):
    """``accelerate launch`` of a tiny class-conditional latent DiT on two CPU processes (3 steps,
    checkpoints every 2, an evaluation of 9 samples in chunks of 4 at step 3): (its output root, its
    temporary folder, the finished process, the cache it used)."""
    base = tmp_path_factory.mktemp("two_processes")
    cache = base / "cache"
    cache.mkdir()
    (cache / "datasets").symlink_to(dataset_cache, target_is_directory=True)
    out = base / "outputs"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "diffexp.train", *TINY, f"output_root={out}", f"cache_dir={cache}", "logger=none",
           "model=dit_xs2", "conditioning=class", "autoencoder=kl", f"autoencoder.path={tiny_vae}",
           "trainer.max_steps=3", "trainer.checkpoint_every=2", "metric.num_samples=9", "metric.batch_size=4",
           "trainer.eval_every=3"]
    scratch = base / "tmp"  # the processes' temporary folder
    scratch.mkdir()
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(ACCELERATE_USE_CPU="true", TMPDIR=str(scratch)),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, scratch, proc, cache


def test_two_cpu_processes_make_one_run(launched):
    out, scratch, proc, _ = launched
    runs = [p for p in out.rglob("run.json")]
    assert len(runs) == 1, runs  # one run directory, not one per process
    run = runs[0].parent
    info = json.loads((run / "run.json").read_text())
    assert info["num_processes"] == 2 and info["status"] == "finished" and info["class_names"][3] == "3"
    steps = [r["step"] for r in rows(run) if "train/loss" in r]
    assert steps == [1, 2, 3]  # one set of records, written once
    assert "batch 8 (4 per micro-batch)" in proc.stdout + proc.stderr  # global batch split over two processes
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002", "step_0000003"]
    # both processes' RNG states are in the checkpoint: each process really was one of two
    assert sorted(p.name for p in (run / "checkpoints" / "step_0000003").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
    assert (run / "model" / "model_index.json").is_file() and len(list((run / ".hydra").iterdir())) == 3
    # rank 1 had no run directory of its own: Hydra's throwaway output for it is gone again
    assert not list(scratch.glob("diffexp-rank*")), list(scratch.iterdir())
    assert sample_run(run, n=2, seed=0, class_label=3).images.shape == (2, 8, 8, 1)  # a class, decoded


def test_two_processes_evaluate_during_training(launched, tmp_path):
    out, _, _, cache = launched
    [run_dir] = [p.parent for p in out.rglob("run.json")]
    run_dir = Path(shutil.copytree(run_dir, tmp_path / "ddp", symlinks=True))  # evaluate writes eval.json into it
    evals = [r for r in rows(run_dir) if "eval/fd_digits_9" in r]
    # one row, written once, from both processes' samples
    assert [r["step"] for r in evals] == [3] and "eval/class_acc_digits_9" in evals[0]
    # the same numbers as one process evaluating the same weights (evaluate CLI, one process)
    again = json.loads(run_main("evaluate", f"run={run_dir}", "metric.num_samples=9", "metric.batch_size=4",
                                f"cache_dir={cache}", check=True).stdout.strip().splitlines()[-1])
    for key in ("eval/fd_digits_9", "eval/class_acc_digits_9"):
        assert again[key] == pytest.approx(evals[0][key], rel=1e-9), key
