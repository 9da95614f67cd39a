"""What only a CUDA device can run: fp16 with its gradient scaler, inductor-compiled training that
resumes exactly, and a check that the GPU tests really ran on the card.

The other GPU tests are the CPU suite's own tests of the speed options, compiled resume, DiT, latent
diffusion, evaluation, sampling and export, marked ``gpu``: accelerate puts them on the card where
there is one, so ``pytest -m gpu`` (``scripts/gpu_check.sh``) runs the same checks there.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import crashed_copy, run_train

pytestmark = pytest.mark.gpu
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")


def losses(run_dir) -> list[float]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r["train/loss"] for r in rows if "train/loss" in r]


def test_runs_go_to_the_machines_accelerator(train):
    """Where a CUDA device is visible, a run trains on it (the GPU tests would otherwise pass on the CPU)."""
    run_dir, _ = train("trainer.max_steps=2")
    device = json.loads((run_dir / "run.json").read_text())["device"]
    assert device.startswith("cuda") if torch.cuda.is_available() else device == "cpu"


@cuda_only
def test_fp16_trains_with_its_gradient_scaler(train):
    """fp16 autocast with accelerate's GradScaler: finite losses, a scaler state in the checkpoint,
    and an exported model."""
    run_dir, _ = train("trainer.mixed_precision=fp16")
    assert len(losses(run_dir)) == 4 and all(math.isfinite(x) and x > 0 for x in losses(run_dir))
    assert any(p.name.startswith("scaler") for p in (run_dir / "checkpoints").rglob("scaler*"))
    assert (run_dir / "model" / "unet" / "config.json").is_file()


@cuda_only
def test_inductor_compiled_training_resumes_exactly(train, tmp_path):
    """``trainer.compile`` with inductor on the card (the CPU suite uses aot_eager: inductor's code
    generation takes a minute on a 2-core CPU) resumes bit-identically from a checkpoint."""
    common = ["trainer.compile=true", "trainer.max_steps=6", "trainer.sample_every=0", "trainer.keep_checkpoints=10"]
    full, _ = train(*common, name="full")
    crashed = crashed_copy(full, tmp_path / "crashed", checkpoint=4, logged=5)
    run_train(f"resume={crashed}")
    assert len(losses(full)) == 6 and losses(crashed) == losses(full)


def test_evaluate_gives_finite_repeatable_numbers_on_the_accelerator(train, cache_dir):
    """``evaluate`` samples under bf16 autocast on a GPU (float32 on a CPU): finite metrics, and the
    same numbers when run again with the same seed."""
    from conftest import run_main

    run_dir, _ = train("trainer.max_steps=2", "trainer.sample_every=0")
    args = [f"run={run_dir}", "metric.num_samples=12", "metric.batch_size=6", f"cache_dir={cache_dir}", "sampler.steps=2"]
    first = json.loads(run_main("evaluate", *args, check=True).stdout.strip().splitlines()[-1])
    again = json.loads(run_main("evaluate", *args, check=True).stdout.strip().splitlines()[-1])
    scores = {k: v for k, v in first.items() if k.startswith("eval/") and k != "eval/seconds"}
    assert scores and all(math.isfinite(v) for v in scores.values())
    assert all(again[k] == v for k, v in scores.items())
