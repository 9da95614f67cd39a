"""``python tests/train_timing_load_hub.py [train overrides]``: ``python -m diffexp.train`` that also
prints on stdout how long the dataset's ``load_hub`` took (``load_hub seconds: S``), for the test that an
unreachable hub fails at once: the time of the loading alone, apart from the command's imports, in the
command's own process (one interpreter instead of a second one started only to time it)."""

import runpy
import sys
import time

from diffexp.data import datasets

untimed = datasets.load_hub


def load_hub(*args, **kwargs):
    start = time.monotonic()
    try:
        return untimed(*args, **kwargs)
    finally:
        print(f"load_hub seconds: {time.monotonic() - start:.3f}", flush=True)


datasets.load_hub = load_hub  # the dataset config's _target_ is looked up in the module when it is built
sys.argv[0] = "diffexp.train"
runpy.run_module("diffexp.train", run_name="__main__")
