"""A run on several processes (two CPU processes under `accelerate launch`, gloo; "two nodes" on this
machine where it says so) is stopped, failed and continued the way a cluster does it: a signal to one
process between log steps, the same command again, one process failing, a launch that is not what it
seems. Every launch is bounded in time."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY, cli_env, run_main

from diffexp.records.rundir import RunDir

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
          "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
HANG = 240  # seconds: far above a launch's start-up under load (two interpreters importing torch), far below a hang


def launch(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([*LAUNCH, *args], cwd=REPO, env=env or cli_env(ACCELERATE_USE_CPU="true"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_nodes(*args: str) -> list[subprocess.Popen]:
    """``accelerate launch`` of one process on each of two "nodes" (two launchers on this machine, the
    rendezvous on 127.0.0.1), as ``srun`` starts one launcher per node."""
    port = str(free_port())
    nodes = ["--num_processes", "2", "--num_machines", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", port]
    return [subprocess.Popen([*LAUNCH[:4], *nodes, "--machine_rank", str(rank), *LAUNCH[8:], *args], cwd=REPO,
                             env=cli_env(ACCELERATE_USE_CPU="true"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for rank in (0, 1)]


def finish(procs: list[subprocess.Popen]) -> tuple[list[int], str]:
    """Every launcher's exit status and their output (all killed past the time bound)."""
    try:
        outs = [p.communicate(timeout=HANG)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [p.returncode for p in procs], "".join(outs)


def workers(launcher: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of the launcher's worker processes (their RANK in the environment)."""
    found = {}
    for pid in subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split():
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next((int(e.split(b"=", 1)[1]) for e in env if e.startswith(b"RANK=")), None)
        if rank is not None:
            found[rank] = int(pid)
    return found


def wait_for(predicate, procs: list[subprocess.Popen], what: str):
    deadline = time.monotonic() + HANG
    while not predicate():
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            pytest.fail(f"{what}: not reached\n{finish(procs)[1][-4000:]}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory, dataset_cache) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    (cache / "datasets").symlink_to(dataset_cache, target_is_directory=True)
    return cache


@pytest.fixture(scope="module")
def preempted(tmp_path_factory, module_cache):
    """A run on two "nodes" (one process each) whose rank 1 alone got SLURM's pre-timeout SIGUSR1
    between log steps: (the command's overrides, its run directory, the launchers' exit statuses and
    output, the seconds from the signal to the last launcher's exit)."""
    run = tmp_path_factory.mktemp("preempted") / "run"
    args = (*TINY, "logger=none", f"cache_dir={module_cache}", f"hydra.run.dir={run}", "trainer.max_steps=120",
            "trainer.log_every=100", "trainer.sample_every=0", "trainer.checkpoint_every=0", "trainer.eval_every=0")
    procs = launch_nodes("-m", "diffexp.train", *args)
    wait_for(lambda: (run / "run.json").is_file() and 1 in workers(procs[1]), procs, "the run's start")
    signalled = time.monotonic()
    os.kill(workers(procs[1])[1], signal.SIGUSR1)
    codes, out = finish(procs)
    return args, run, codes, out, time.monotonic() - signalled


def test_a_signal_to_one_process_stops_every_process_at_the_next_step_with_the_requeue_status(preempted):
    _, run, code, out, seconds = preempted
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "interrupted" and info["stopped_by"] == "SIGUSR1", out[-3000:]
    steps = [int(p.name.split("_")[1]) for p in (run / "checkpoints").iterdir()]
    assert len(steps) == 1 and steps[0] < 100  # before the log step, where they used to agree
    assert "random_states_1.pkl" in os.listdir(run / "checkpoints" / f"step_{steps[0]:07d}")
    assert not (run / "model").exists()
    assert 0 not in code and out.count("exitcode  : 138") == 2  # REQUEUE_EXIT from both (each launcher says 1)
    assert seconds < 60, seconds


def test_a_signal_that_lands_while_the_processes_agree_stops_the_run_at_the_next_step(monkeypatch, tmp_path):
    """A process of a loaded machine spends much of a step waiting in the stop flags' all-reduce; a
    signal handled there must not be overwritten by the reduction's older answer (a CI run of the
    test above logged "SIGUSR1 received" and trained on to the end). A real gloo group of one process,
    the signal sent while its all-reduce is under way."""
    import torch.distributed as dist

    from diffexp.training.stop import StopRequest

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    request = None
    try:
        request = StopRequest(num_processes=2)  # agrees over the group, as each of several processes does
        all_reduce = dist.all_reduce

        def signalled_meanwhile(*args, **kwargs):
            monkeypatch.setattr(dist, "all_reduce", all_reduce)  # once
            os.kill(os.getpid(), signal.SIGUSR1)  # handled now: the flag being reduced was read before it
            return all_reduce(*args, **kwargs)

        monkeypatch.setattr(dist, "all_reduce", signalled_meanwhile)
        assert request.agreed() == 0  # this step's answer, agreed before the signal
        assert request.agreed() == signal.SIGUSR1 and request.requeue  # the next step stops
    finally:
        if request is not None:
            request.restore()
        dist.destroy_process_group()


def elsewhere(args: tuple[str, ...], run: Path) -> tuple[str, ...]:
    """The same command with its run directory moved to ``run``."""
    return tuple(a for a in args if not a.startswith("hydra.run.dir=")) + (f"hydra.run.dir={run}",)


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def one_process(preempted, tmp_path_factory) -> list[tuple[int, float]]:
    """The logged losses of the preempted run's recipe trained uninterrupted on one process (in this process)."""
    run = tmp_path_factory.mktemp("one_process") / "run"
    assert run_main("train", *elsewhere(preempted[0], run)).returncode == 0
    return losses(run)


def test_resumed_on_one_process_the_two_process_run_continues_the_same_stream(preempted, one_process, tmp_path):
    # The noise and the data of each sample are functions of (seed, step, its place in the global batch):
    # the run stopped on two processes, resumed on one, logs the losses of the run on one process alone.
    args, run, *_ = preempted
    copy = Path(shutil.copytree(run, tmp_path / "copy"))
    assert run_main("train", *elsewhere(args, copy)).returncode == 0  # the same command, on one process
    assert RunDir(copy).info()["status"] == "finished" and [s for s, _ in losses(copy)] == [100, 120]
    assert [loss for _, loss in losses(copy)] == pytest.approx([loss for _, loss in one_process], rel=1e-4)


def test_the_same_command_again_continues_the_run_on_two_nodes_and_then_says_it_is_finished(preempted, one_process):
    args, run, *_ = preempted
    stopped_at = int(next((run / "checkpoints").iterdir()).name.split("_")[1])
    codes, out = finish(launch_nodes("-m", "diffexp.train", *args))  # on two "nodes" again
    assert codes == [0, 0], out[-4000:]
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and [(r["step"], r["stopped_by"]) for r in info["resumes"]] == [
        (stopped_at, "SIGUSR1")] and "stopped_by" not in info
    assert [s for s, _ in losses(run)] == [100, 120]
    assert [loss for _, loss in losses(run)] == pytest.approx([loss for _, loss in one_process], rel=1e-4)
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


def test_submitits_local_executor_requeues_an_interrupted_run_and_it_finishes(tmp_path, cache_dir, monkeypatch):
    submitit = pytest.importorskip("submitit")
    run = tmp_path / "run"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH", "")]))
    from submitit_job import Train

    executor = submitit.LocalExecutor(folder=tmp_path / "jobs")
    executor.update_parameters(timeout_min=10, signal_delay_s=1)  # its own signal comes too late: the test sends one
    job = executor.submit(Train(), *TINY, "logger=none", f"cache_dir={cache_dir}", f"hydra.run.dir={run}",
                          "trainer.max_steps=120", "trainer.log_every=100", "trainer.sample_every=0",
                          "trainer.checkpoint_every=0", "trainer.eval_every=0")
    deadline = time.monotonic() + HANG
    while not (run / "run.json").is_file():
        assert job.state in ("RUNNING", "PENDING", "UNKNOWN") and time.monotonic() < deadline, job.stderr()
        time.sleep(0.02)
    # submitit's preemption signal to the job's task, as SLURM sends it (the local controller passes on only SIGTERM)
    task = subprocess.run(["pgrep", "-P", str(job._process.pid)], capture_output=True, text=True).stdout.split()
    assert len(task) == 1, task
    os.kill(int(task[0]), signal.SIGUSR2)
    assert job.result() == "finished", job.stderr()[-3000:]
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and len(info["resumes"]) == 1 and info["resumes"][0]["step"] < 120
    assert info["resumes"][0]["stopped_by"] == "SIGUSR2"  # stopped by the signal, requeued by submitit, finished
