"""A run on several processes (two CPU processes under `accelerate launch`, gloo) is stopped, failed and
continued the way a cluster does it: a signal to one process between log steps, the same command
again, one process failing, a launch that is not what it seems. Every launch is bounded in time."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY, cli_env, run_main

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
          "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
HANG = 240  # seconds: far above a launch's start-up under load (two interpreters importing torch), far below a hang


def launch(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([*LAUNCH, *args], cwd=REPO, env=env or cli_env(ACCELERATE_USE_CPU="true"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def workers(launcher: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of the launcher's worker processes (their RANK in the environment)."""
    found = {}
    for pid in subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split():
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next((int(e.split(b"=", 1)[1]) for e in env if e.startswith(b"RANK=")), None)
        if rank is not None:
            found[rank] = int(pid)
    return found


def wait_for(predicate, proc: subprocess.Popen, what: str):
    deadline = time.monotonic() + HANG
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{what}: not reached\n{proc.communicate()[0][-4000:]}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory, dataset_cache) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    (cache / "datasets").symlink_to(dataset_cache, target_is_directory=True)
    return cache


@pytest.fixture(scope="module")
def preempted(tmp_path_factory, module_cache):
    """A 2-process run whose rank 1 alone got SLURM's pre-timeout SIGUSR1 between log steps:
    (the command's overrides, its run directory, the launcher's exit status and output, the seconds
    from the signal to the launcher's exit)."""
    run = tmp_path_factory.mktemp("preempted") / "run"
    args = (*TINY, "logger=none", f"cache_dir={module_cache}", f"hydra.run.dir={run}", "trainer.max_steps=120",
            "trainer.log_every=100", "trainer.sample_every=0", "trainer.checkpoint_every=0", "trainer.eval_every=0")
    proc = launch("-m", "diffexp.train", *args)
    wait_for(lambda: (run / "run.json").is_file() and len(workers(proc)) == 2, proc, "the run's start")
    signalled = time.monotonic()
    os.kill(workers(proc)[1], signal.SIGUSR1)
    out = proc.communicate(timeout=HANG)[0]
    return args, run, proc.returncode, out, time.monotonic() - signalled


def test_a_signal_to_one_process_stops_every_process_at_the_next_step_with_the_requeue_status(preempted):
    _, run, code, out, seconds = preempted
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "interrupted" and info["stopped_by"] == "SIGUSR1", out[-3000:]
    steps = [int(p.name.split("_")[1]) for p in (run / "checkpoints").iterdir()]
    assert len(steps) == 1 and steps[0] < 100  # before the log step, where they used to agree
    assert "random_states_1.pkl" in os.listdir(run / "checkpoints" / f"step_{steps[0]:07d}")
    assert not (run / "model").exists()
    assert code != 0 and "exitcode  : 138" in out  # REQUEUE_EXIT from the processes (the launcher itself says 1)
    assert seconds < 60, seconds


def test_resuming_on_another_number_of_processes_is_refused_in_one_line(preempted):
    args, run, *_ = preempted
    before = (run / "run.json").read_bytes()
    result = run_main("train", *args)  # the same command on one process
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("error: num_processes=1: ") and "written by 2 process(es); resume on 2" in lines[0]
    assert (run / "run.json").read_bytes() == before


def test_the_same_command_again_continues_the_run_and_then_says_it_is_finished(preempted):
    args, run, *_ = preempted
    stopped_at = json.loads((run / "run.json").read_text())["stopped_by"] and \
        int(next((run / "checkpoints").iterdir()).name.split("_")[1])
    proc = launch("-m", "diffexp.train", *args)
    out = proc.communicate(timeout=HANG)[0]
    assert proc.returncode == 0, out[-4000:]
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and [r["step"] for r in info["resumes"]] == [stopped_at]
    assert [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == [100, 120]
    assert (run / "model" / "model_index.json").is_file()
    again = run_main("train", *args)  # a third time: nothing to do (said before any process count matters)
    assert again.returncode == 0 and f"{run} is finished (120 of 120 steps): nothing to do" in again.stdout


def test_a_failure_on_the_main_process_ends_every_process_within_seconds_with_one_error(tmp_path, cache_dir):
    run = tmp_path / "run"
    proc = launch(str(REPO / "tests" / "main_process_fails.py"), *TINY, "logger=none", f"cache_dir={cache_dir}",
                  f"hydra.run.dir={run}", "trainer.max_steps=50", "trainer.sample_every=2", "trainer.eval_every=0")
    out = proc.communicate(timeout=HANG)[0]
    failed_at = float(re.search(r"OSError: injected failure on the main process at ([0-9.]+)", out)[1])
    assert proc.returncode != 0 and time.time() - failed_at < 60, out[-4000:]
    assert out.count("OSError: injected failure") == 1
    assert "Connection closed by peer" not in out  # the other process says why it stops in one line, or is stopped
    assert json.loads((run / "run.json").read_text())["status"] == "failed"


def test_a_launch_whose_processes_accelerate_does_not_see_is_refused_in_one_line(tmp_path, cache_dir):
    # The README's GPU line on a machine without a GPU (no ACCELERATE_USE_CPU): two independent runs.
    run = tmp_path / "run"
    env = {k: v for k, v in cli_env().items() if k != "ACCELERATE_USE_CPU"}
    proc = launch("-m", "diffexp.train", *TINY, "logger=none", f"cache_dir={cache_dir}", f"hydra.run.dir={run}",
                  env=env)
    out = proc.communicate(timeout=HANG)[0]
    errors = {line for line in out.splitlines() if line.startswith("error:")}
    assert proc.returncode != 0 and errors == {
        "error: WORLD_SIZE=2: the launcher started 2 processes but accelerate runs 1 (no GPU here: "
        "ACCELERATE_USE_CPU=true runs the processes on CPUs); each would train a separate run into one folder"}, out
    assert not (run / "run.json").exists()
