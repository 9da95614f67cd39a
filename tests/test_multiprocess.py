"""Two CPU processes under `accelerate launch` work as one run."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, TINY, cli_env


def test_two_cpu_processes_make_one_run(tmp_path, cache_dir):
    out = tmp_path / "outputs"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "diffexp.train", *TINY, f"output_root={out}", f"cache_dir={cache_dir}", "logger=none",
           "trainer.max_steps=3", "trainer.checkpoint_every=2"]
    scratch = tmp_path / "tmp"  # the processes' temporary folder
    scratch.mkdir()
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(ACCELERATE_USE_CPU="true", TMPDIR=str(scratch)),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = [p for p in out.rglob("run.json")]
    assert len(runs) == 1, runs  # one run directory, not one per process
    run = runs[0].parent
    info = json.loads((run / "run.json").read_text())
    assert info["num_processes"] == 2 and info["status"] == "finished"
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r]
    assert steps == [1, 2, 3]  # one set of records, written once
    assert "batch 8 (4 per micro-batch)" in proc.stdout + proc.stderr  # global batch split over two processes
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002", "step_0000003"]
    # both processes' RNG states are in the checkpoint: each process really was one of two
    assert sorted(p.name for p in (run / "checkpoints" / "step_0000003").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
    assert (run / "model" / "model_index.json").is_file() and len(list((run / ".hydra").iterdir())) == 3
    # rank 1 had no run directory of its own: Hydra's throwaway output for it is gone again
    assert not list(scratch.glob("diffexp-rank*")), list(scratch.iterdir())
