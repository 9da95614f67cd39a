"""Stopping a run on request: a signal (SIGINT, SIGTERM, or SLURM's pre-timeout SIGUSR1 / submitit's
preemption signal) sets a flag; every process agrees on the flags after every optimizer step, so all
of them stop after the same step with one checkpoint; a requeue signal is then handed on to the
scheduler that sent it (submitit's handler, or ``scontrol requeue`` under plain SLURM).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Signals that say "the job is about to end; come back later": SLURM's `--signal=USR1@90` (a job
# near its time limit) and submitit's preemption/timeout signal (SUBMITIT_PREEMPT_SIGNAL, USR2 by default).
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
# The exit status of a run stopped by a requeue signal (as a process ended by SIGUSR1 reports in a
# shell); SIGINT, SIGTERM and trainer.stop_at exit with 130.
REQUEUE_EXIT = 128 + signal.SIGUSR1


class StopRequest:
    """SIGINT/SIGTERM/SIGUSR1/SIGUSR2 set a flag that the loop reads after each step; a second SIGINT
    aborts. ``agreed`` shares the flags of all processes (one all-reduce of one number on the CPU)."""

    def __init__(self, num_processes: int) -> None:
        # ``received`` is written only by the handler, ``signum`` (what the processes agreed on) only by
        # ``agreed``: a signal that lands while ``agreed`` waits in its all-reduce is sent at the next step
        # instead of being overwritten by the reduction's older answer.
        self.received = self.signum = 0
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM, *REQUEUE_SIGNALS)}
        self._group = None
        if num_processes > 1 and dist.is_initialized() and dist.get_backend() != "gloo":
            # NCCL's collectives would make every step wait for the GPU: the flag goes over a CPU group.
            self._group = dist.new_group(backend="gloo")
        self._several = num_processes > 1 and dist.is_initialized()

    def _handle(self, signum, frame) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.received:
            log.warning("%s received: stopping after this step, with a checkpoint", signal.Signals(signum).name)
        self.received = self.received or signum

    def agreed(self) -> int:
        """The signal any process was asked to stop by (the highest number when several were), or 0;
        every process gets the same answer."""
        if not self._several:
            self.signum = self.received
            return self.signum
        flag = torch.tensor([self.received], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        self.signum = int(flag.item())
        return self.signum

    @property
    def requeue(self) -> bool:
        """Whether the run was stopped by a signal that asks for the job to be requeued."""
        return self.signum in REQUEUE_SIGNALS

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def hand_on(self, main: bool) -> None:
        """After the checkpoint of a requeue signal's stop (every process): the signal goes to the handler
        that was there before (submitit's, which requeues the job and exits); under plain SLURM the main
        process requeues the job with ``scontrol requeue`` (as Lightning's auto-requeue does)."""
        if not self.requeue:
            return
        previous = self._previous.get(signal.Signals(self.signum))
        if callable(previous):
            previous(self.signum, None)
        elif main and os.environ.get("SLURM_JOB_ID"):
            requeue_slurm_job(os.environ["SLURM_JOB_ID"])


def requeue_slurm_job(job_id: str) -> None:
    """``scontrol requeue JOB``; a failure is a warning (the checkpoint is written either way)."""
    if shutil.which("scontrol") is None:
        log.warning("SLURM job %s: scontrol not found, the job is not requeued", job_id)
        return
    done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if done.returncode:
        log.warning("scontrol requeue %s failed: %s", job_id, (done.stderr or done.stdout).strip())
    else:
        log.warning("SLURM job %s requeued", job_id)
