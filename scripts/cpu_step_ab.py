"""Speed options of a bare training step on the CPU, measured side by side in one process.

Each arm is the default U-Net (``conf/model/unet_small.yaml`` at 16 x 16 x 1, batch 64) with its own
copy of the weights and a fused AdamW: forward, MSE, backward, clipping, optimizer step, no data,
EMA or logging. The arms run in alternating order (reversed every repeat), so drift of the machine's
speed hits them alike; a compiled arm's compile time is reported apart (its warm-up).

    python scripts/cpu_step_ab.py eager,channels_last,compile,compile+channels_last [repeats] [steps]

Prints each arm's median img/s, its ratio to the first arm (median and range over repeats) and the
warm-up seconds. ``python -m diffexp.bench trainer.compile=true`` measures the same in the real loop.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from diffexp.config import CONFIG_PATH
from diffexp.models.build import build_model

BATCH = 64


def arm(base: torch.nn.Module, name: str):
    """A step function for arm ``name`` (``eager``, ``channels_last``, ``compile``, joined with ``+``)."""
    options = set(name.split("+"))
    model = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(0)
    x, target = torch.randn(BATCH, 1, 16, 16, generator=gen), torch.randn(BATCH, 1, 16, 16, generator=gen)
    t = torch.randint(0, 1000, (BATCH,), generator=gen)
    if "channels_last" in options:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    forward = torch.compile(model) if "compile" in options else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

    def step():
        loss = F.mse_loss(forward(x, t).sample, target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main(names: list[str], repeats: int, steps: int) -> None:
    cfg = OmegaConf.load(f"{CONFIG_PATH}/model/unet_small.yaml")
    torch.manual_seed(0)
    base = build_model(cfg, channels=1, size=16).train()
    steps_of, warm = {}, {}
    for name in names:
        steps_of[name] = arm(base, name)
        start = time.perf_counter()
        for _ in range(3):
            steps_of[name]()
        warm[name] = time.perf_counter() - start
    rates = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            for _ in range(steps):
                steps_of[name]()
            rates[name].append(steps * BATCH / (time.perf_counter() - start))
    first = names[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {repeats} repeats of {steps} steps, batch {BATCH}")
    for name in names:
        ratios = [a / b for a, b in zip(rates[name], rates[first])]
        print(f"{name:28s} {statistics.median(rates[name]):7.1f} img/s   ratio to {first}: median "
              f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})   warm-up {warm[name]:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1].split(","), int(sys.argv[2]) if len(sys.argv) > 2 else 8, int(sys.argv[3]) if len(sys.argv) > 3 else 10)
