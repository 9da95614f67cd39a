"""``python tests/main_process_fails.py [train overrides]``: ``python -m diffexp.train`` in which the main
process (only) fails while it writes the first sample grid, as a bug or a full disk would; for the
test that one process's failure ends every process promptly, with the error shown once."""

import os
import runpy
import sys
import time

from diffexp.training import loop


def failing_grid(p, step):
    raise OSError(f"injected failure on the main process at {time.time():.3f} (the grid of step {step})")


if os.environ.get("RANK", "0") == "0":
    loop.sample_grid = failing_grid
sys.argv[0] = "diffexp.train"
runpy.run_module("diffexp.train", run_name="__main__")
