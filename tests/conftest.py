"""Shared fixtures: run diffexp's CLIs as a user would, in subprocesses, with no network."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = ["debug=tiny"]


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for CLI subprocesses: this checkout first on the path, offline, quiet."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE=env.get("WANDB_MODE", "offline"),
        WANDB_SILENT="true",
        HYDRA_FULL_ERROR="0",
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
    )
    env.update(extra)
    return env


def run_cli(module: str, *args: str, cwd: Path | None = None, check: bool = True, env: dict | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m diffexp.<module> args...``; fails the test with its output if ``check`` and it fails."""
    proc = subprocess.run([sys.executable, "-m", f"diffexp.{module}", *args], cwd=cwd or REPO, env=env or cli_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"diffexp.{module} {' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                    f"--- stderr\n{proc.stderr[-4000:]}")
    return proc


def crashed_copy(full: Path, dest: Path, *, checkpoint: int, logged: int) -> Path:
    """A copy of the finished run ``full`` as if it had died after logging step ``logged``: only
    checkpoints up to step ``checkpoint`` remain, no exported model, metrics up to ``logged``."""
    shutil.copytree(full, dest)
    shutil.rmtree(dest / "model")
    for folder in (dest / "checkpoints").iterdir():
        if int(folder.name.split("_")[1]) > checkpoint:
            shutil.rmtree(folder)
    rows = (dest / "metrics.jsonl").read_text().splitlines()
    (dest / "metrics.jsonl").write_text("\n".join(rows[:logged]) + "\n")
    return dest


@pytest.fixture
def cache_dir(tmp_path_factory) -> Path:
    """A dataset/statistics cache shared by the tests of one session."""
    return tmp_path_factory.getbasetemp() / "cache"


@pytest.fixture
def train(tmp_path, cache_dir):
    """Run a tiny training job into tmp_path/NAME; returns its run directory."""

    def _train(*overrides: str, name: str = "run", check: bool = True, env: dict | None = None):
        run_dir = tmp_path / name
        proc = run_cli("train", *TINY, f"hydra.run.dir={run_dir}", f"cache_dir={cache_dir}", "logger=none",
                       *overrides, check=check, env=env)
        return run_dir, proc

    return _train


@pytest.fixture(scope="session")
def inception_file(tmp_path_factory) -> Path:
    """An InceptionV3 weights file in torch-fidelity's format, with random (He-initialized) weights:
    the real torch-fidelity code path where the real weights cannot be downloaded."""
    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class RandomInception(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None  # keep the random initialization

    folder = tmp_path_factory.mktemp("inception")
    empty = folder / "empty.pth"
    torch.save({}, empty)
    torch.manual_seed(0)
    net = RandomInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    for module in net.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            # He init keeps activations alive through the ~40 layers (PyTorch's default lets them vanish).
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = folder / "weights-inception-random.pth"
    torch.save(net.state_dict(), path)
    return path
