"""Shared fixtures: run diffexp's commands as a user would, with no network.

Training runs in-process (``train``): the config is composed with Hydra's compose API
(``compose_config`` below, what ``main`` receives) and handed to ``diffexp.train.run``,
under the same one-line error reporting as the command line. Subprocesses (``run_cli``) are kept
for what only a process shows: exit codes of the real command line, signals, Hydra's own
parsing, multirun and the multi-process runs.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import DictConfig, open_dict

REPO = Path(__file__).resolve().parent.parent
TINY = ["debug=tiny"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0",
           "GRADIO_ANALYTICS_ENABLED": "False"}
# In-process runs: offline like the subprocesses, and on one thread like them, so both give the
# same floating-point sums (before torch is first imported).
for key, value in {**OFFLINE, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), "OMP_NUM_THREADS": "1"}.items():
    os.environ.setdefault(key, value)
# diffusers copies a pipeline's own code (model/pipeline.py) into this cache when it loads one: one
# per test worker, so two workers never write the same file at once.
os.environ.setdefault("HF_MODULES_CACHE", os.path.join(
    os.environ.get("TMPDIR", "/tmp"), f"diffexp-hf-modules-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"))


def _parse_each_yaml_text_once() -> None:
    """Hydra reads and parses every YAML file of the config tree again at each composition (a new
    config repository per call: about a third of a composition's 0.16 s here), and the in-process tests
    compose hundreds of times. ``OmegaConf.load``, which Hydra's config sources call, keeps what each
    distinct text parsed to and hands out copies: keyed by the text, so a changed file is parsed anew,
    and a text that fails to parse fails as before (nothing is kept)."""
    import copy

    from omegaconf import OmegaConf

    load, parsed = OmegaConf.load, {}

    def load_once(file_):
        if isinstance(file_, (str, os.PathLike)):
            with open(file_, encoding="utf-8") as f:
                text = f.read()
        else:
            text = file_.read()
            file_.seek(0)
        if text not in parsed:
            parsed[text] = load(file_)
        return copy.deepcopy(parsed[text])

    OmegaConf.load = staticmethod(load_once)


_parse_each_yaml_text_once()


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for CLI subprocesses: this checkout first on the path, offline, quiet."""
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), **OFFLINE)
    env["WANDB_MODE"] = env.get("WANDB_MODE", "offline")
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


@dataclass
class Result:
    """What an in-process command left: its exit status and what it printed and logged."""

    returncode: int
    stdout: str
    stderr: str


def end_process() -> None:
    """What the end of a command's process does for the next command in this one: accelerate's
    process-wide state is forgotten, and W&B is torn down as its exit hook would. ``run.finish``
    can return before W&B's service has closed the run's ``.wandb`` file (a CI run read a resumed
    segment without its exit record; not reproduced here); the teardown waits for the service."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()


@contextlib.contextmanager
def captured():
    """Collect stdout, stderr and log records (INFO and up) of an in-process command."""
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("[%(name)s][%(levelname)s] - %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield out, err
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def run_train(*overrides: str, run_dir: Path | None = None, check: bool = True) -> Result:
    """``python -m diffexp.train overrides...`` in this process (``run_dir`` instead of ``hydra.run.dir``)."""
    from diffexp.config import report_errors
    from diffexp.train import run

    code = 0
    with captured() as (out, err):
        try:
            with report_errors():
                status = run(compose_config(list(overrides)), str(run_dir) if run_dir else None)
            code = 130 if status == "interrupted" else 0
        except SystemExit as e:
            code = int(e.code or 0)
        finally:
            end_process()
    result = Result(code, out.getvalue(), err.getvalue())
    if check and code != 0:
        pytest.fail(f"diffexp.train {' '.join(overrides)} exited {code}\n{result.stderr[-4000:]}")
    return result


def run_main(module: str, *args: str, check: bool = False) -> Result:
    """``python -m diffexp.<module> args...`` through the command's real ``main`` in this process
    (for the Hydra commands, Hydra parses the arguments, makes its output folder, configures
    logging), with its exit status: the command line without a new interpreter, which costs a
    test seconds of imports. Fails the test with its output if ``check`` and it fails."""
    import importlib

    command = importlib.import_module(f"diffexp.{module}")
    saved_argv, code = sys.argv, 0
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    sys.argv = [f"diffexp.{module}", *args]
    with captured() as (out, err):
        try:
            status = command.main()
            code = status if isinstance(status, int) else 0  # sweep's main returns its exit status
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            sys.argv = saved_argv
            end_process()
            for handler in root.handlers:  # Hydra's logging of that command ends with it
                if handler not in saved_handlers:
                    handler.close()
            root.handlers[:], root.level = saved_handlers, saved_level
    result = Result(code, out.getvalue(), err.getvalue())
    if check and code != 0:
        pytest.fail(f"diffexp.{module} {' '.join(args)} exited {code}\n--- stdout\n{result.stdout[-4000:]}\n"
                    f"--- stderr\n{result.stderr[-4000:]}")
    return result


def crashed_copy(full: Path, dest: Path, *, checkpoint: int, logged: int) -> Path:
    """A copy of the finished run ``full`` as if it had died after logging step ``logged``: only
    checkpoints up to step ``checkpoint`` remain, no exported model, metrics up to ``logged``."""
    shutil.copytree(full, dest, symlinks=True)
    shutil.rmtree(dest / "model")
    from diffexp.records.rundir import step_of

    for folder in (dest / "checkpoints").iterdir():
        if step_of(folder) > checkpoint:
            shutil.rmtree(folder)
    rows = (dest / "metrics.jsonl").read_text().splitlines()
    (dest / "metrics.jsonl").write_text("\n".join(rows[:logged]) + "\n")
    return dest


@pytest.fixture(autouse=True)
def _fresh_process():
    yield
    end_process()


@pytest.fixture(scope="session")
def dataset_cache(tmp_path_factory) -> Path:
    """Preprocessed datasets, shared by the whole session (the cache is keyed by what decides the pixels)."""
    return tmp_path_factory.mktemp("datasets")


@pytest.fixture
def cache_dir(tmp_path, dataset_cache) -> Path:
    """This test's own cache (metric reference statistics are never shared between tests), with the
    session's preprocessed datasets."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "datasets").symlink_to(dataset_cache, target_is_directory=True)
    return cache


@pytest.fixture
def train(tmp_path, cache_dir):
    """Train a tiny run in-process into tmp_path/NAME (``logger=none`` unless overridden); returns
    (run directory, Result). With ``main=True`` it goes through the command's Hydra ``main`` in this
    process (Hydra makes the run folder, as the command line does, before any check can refuse the
    run); with ``cli=True`` it runs the real command line in a subprocess."""

    def _train(*overrides: str, name: str = "run", check: bool = True, env: dict | None = None, cli: bool = False,
               main: bool = False):
        run_dir = tmp_path / name
        args = [*TINY, f"cache_dir={cache_dir}", "logger=none", *overrides]
        if cli or env is not None:
            return run_dir, run_cli("train", *args, f"hydra.run.dir={run_dir}", check=check, env=env)
        if main:
            return run_dir, run_main("train", *args, f"hydra.run.dir={run_dir}", check=check)
        return run_dir, run_train(*args, run_dir=run_dir, check=check)

    return _train


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, dataset_cache) -> Path:
    """One finished tiny run (``debug=tiny``, W&B offline) per test module; copy it before changing it."""
    base = tmp_path_factory.mktemp("tiny_run")
    cache = base / "cache"
    cache.mkdir()
    (cache / "datasets").symlink_to(dataset_cache, target_is_directory=True)
    run_dir = base / "run"
    run_train(*TINY, f"cache_dir={cache}", "logger=wandb", run_dir=run_dir)
    return run_dir


@pytest.fixture
def finished_run(tiny_run, tmp_path) -> Path:
    """This test's own copy of the module's finished tiny run."""
    return Path(shutil.copytree(tiny_run, tmp_path / "finished", symlinks=True))


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> Path:
    """A randomly initialised AutoencoderKL for 1-channel images (2x downsampling, 2 latent channels),
    saved as a user's local autoencoder folder."""
    import torch
    from diffusers import AutoencoderKL

    with torch.random.fork_rng():
        torch.manual_seed(0)
        vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                            latent_channels=2, norm_num_groups=4, sample_size=8)
    folder = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(folder)
    return folder


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
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = RandomInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
        for module in net.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                # He init keeps activations alive through the ~40 layers (PyTorch's default lets them vanish).
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = folder / "weights-inception-random.pth"
    torch.save(net.state_dict(), path)
    return path


# The longest test files first (the sums of their test times on a 2-core VM, 2026-12-07): the two
# workers each take a whole file as they free up (--dist loadfile), so long files started last would
# leave one worker idle. pytest-xdist would reorder the files by their number of tests (which put the
# 6 long tests of test_preemption last); --no-loadscope-reorder in pyproject.toml keeps this order.
LONGEST_FIRST = ("test_preemption", "test_workflow", "test_train", "test_metrics", "test_inputs", "test_bench",
                 "test_app", "test_data", "test_tracking", "test_sampling", "test_conditional", "test_features",
                 "test_paired", "test_config", "test_safety", "test_multiprocess", "test_objectives",
                 "test_likelihood", "test_gpu", "test_phema", "test_docs", "test_guidance")


def pytest_collection_modifyitems(items):
    """Order the files longest first (the order of the tests within a file is kept)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))


def compose_config(overrides: list[str] | tuple[str, ...] = (), config_name: str = "train") -> DictConfig:
    """The config a diffexp command's ``main`` receives for these command-line overrides, composed
    in-process with Hydra's compose API: Hydra's runtime config is set (so ``${hydra:...}``
    resolves and ``apply_overrides`` sees the overrides), group choices are recorded, and the
    ``hydra`` node is dropped. The tests run commands this way."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from diffexp.config import CONFIG_PATH, record_choices

    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    record_choices(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg
