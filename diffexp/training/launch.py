"""The launch check, before anything heavy is imported: a refused launch's processes stop after
importing torch and accelerate only."""

from __future__ import annotations

import os

from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from diffexp import DiffexpError


def check_launch() -> None:
    """The launcher's processes are accelerate's: a launcher (accelerate launch, torchrun: WORLD_SIZE;
    srun: its task count) that started several processes which accelerate sees as one each would
    make independent runs writing one folder, and is refused in one line."""
    # the process group the Accelerator built later uses (on the CPU as AcceleratorState decides it)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    launched = os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_STEP_NUM_TASKS") or "1"
    key = "WORLD_SIZE" if os.environ.get("WORLD_SIZE") else "SLURM_STEP_NUM_TASKS"
    if int(launched) != state.num_processes:
        hint = (" (no GPU here: ACCELERATE_USE_CPU=true runs the processes on CPUs)" if int(launched) > 1
                and state.device.type == "cpu" else "")
        raise DiffexpError(f"{key}={launched}: the launcher started {launched} processes but accelerate runs "
                           f"{state.num_processes}{hint}; each would train a separate run into one folder",
                           everywhere=True)
