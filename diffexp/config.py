"""What every diffexp command shares: composing configs (Hydra resolvers, the compose API), every
setup-time check of a composed config, and one-line error reporting.

``check_train_config`` raises a DiffexpError naming the first bad key, its value and what is
expected (the command turns it into one ``error:`` line and exit status 2); values that are
valid but surprising come back as warning lines. Checks that need built objects (a resolution the
U-Net cannot halve, a batch that does not split over processes, a sampler the schedule cannot
use) stay where those objects are built, also before anything is recorded.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import sys
import tempfile
from numbers import Integral, Real
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from diffexp import DiffexpError, first_line

CONFIG_PATH = str(Path(__file__).resolve().parent.parent / "conf")
log = logging.getLogger("diffexp")


def process_rank() -> int:
    """This process's rank under a distributed launcher (accelerate launch / torchrun), else 0."""
    return int(os.environ.get("RANK", "0"))


def _scratch_dir(prefix: str) -> str:
    """A throwaway folder for Hydra's own output where the process has no run directory of its
    own; it is removed when the process exits."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, True)
    return path


# Hydra sessions of this process: scratch folder -> the run directory it is for. Hydra writes its
# record and log into the scratch folder; the run adopts them once it has started.
SESSIONS: dict[str, str] = {}


def _run_dir(resume, default):
    """Hydra's output folder for a single run: a scratch folder, so a refused or failed start (bad
    input, a refused resume) leaves nothing behind. The run directory it is for (``default``, or
    the run being resumed) adopts the scratch folder's record when the run starts
    (``RunDir.adopt_session``)."""
    if process_rank() > 0:  # one run directory per run: other ranks get theirs by broadcast
        return _scratch_dir(f"diffexp-rank{process_rank()}-")
    scratch = _scratch_dir("diffexp-session-")
    SESSIONS[scratch] = str(default if resume in (None, "", "None") else Path(str(resume)).expanduser())
    return scratch


def session_dirs() -> tuple[str, str | None]:
    """(the run directory of this command, the scratch folder holding Hydra's record of this session, or
    None when Hydra wrote into the run directory itself: multirun jobs, an explicit hydra.run.dir)."""
    from hydra.core.hydra_config import HydraConfig

    out = HydraConfig.get().runtime.output_dir
    if out in SESSIONS:
        return SESSIONS[out], out
    return out, None


def _hydra_subdir(resume):
    return None if process_rank() > 0 else ".hydra"


def register_resolvers() -> None:
    """Resolvers used by conf/: where a run directory goes and where Hydra records itself."""
    if not OmegaConf.has_resolver("diffexp_run_dir"):
        OmegaConf.register_new_resolver("diffexp_run_dir", _run_dir)
        OmegaConf.register_new_resolver("diffexp_hydra_subdir", _hydra_subdir)


def apply_overrides(saved: DictConfig, *, skip: tuple[str, ...], composed: DictConfig | None = None) -> DictConfig:
    """A copy of a run's saved config with this command's overrides applied.

    Value overrides (``trainer.max_steps=100``) apply as they are. A config-group override
    (``model=unet_tiny``) replaces that group's node with the newly ``composed`` one (and its
    ``choices`` entry); without ``composed`` it is refused. ``skip`` keys and ``hydra.*`` belong
    to the command itself.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = saved.copy()
    hydra_cfg = HydraConfig.get()
    groups = set(hydra_cfg.runtime.choices)
    for override in OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task)):
        key = override.key_or_group
        if key in skip or key.startswith("hydra"):
            continue
        with open_dict(cfg):
            if key in groups:
                if OmegaConf.select(saved, f"choices.{key}", default=None) == hydra_cfg.runtime.choices[key]:
                    continue  # the run's own choice, repeated (``debug=tiny`` in a command that starts from it)
                if composed is None:
                    raise DiffexpError(f"{key}={override.value()}: a resumed run keeps its config groups; "
                                       "start a new run instead")
                if key not in composed:  # a global group (debug, experiment) sets keys all over the config
                    raise DiffexpError(f"{key}={override.value()}: a group that sets keys across the config cannot "
                                       "be applied to a saved config; give its settings as key=value")
                cfg[key] = OmegaConf.to_container(composed[key], resolve=False)
                OmegaConf.update(cfg, f"choices.{key}", hydra_cfg.runtime.choices[key], force_add=True)
            else:
                OmegaConf.update(cfg, key, override.value(), merge=True, force_add=True)
    return cfg


def record_choices(cfg: DictConfig) -> None:
    """Store which option of each config group was chosen (``choices.model: unet_small``) in the config,
    so saved configs, W&B and ``compare`` can group runs by it (needs Hydra's runtime config)."""
    from hydra.core.hydra_config import HydraConfig

    choices = {k: v for k, v in HydraConfig.get().runtime.choices.items() if not k.startswith("hydra")}
    with open_dict(cfg):
        cfg.choices = choices


def compose_config(overrides: list[str] | tuple[str, ...] = (), config_name: str = "train") -> DictConfig:
    """The config a diffexp command's ``main`` receives for these command-line overrides, composed
    in-process with Hydra's compose API: Hydra's runtime config is set (so ``${hydra:...}``
    resolves and ``apply_overrides`` sees the overrides), group choices are recorded, and the
    ``hydra`` node is dropped. The benchmark and the tests run commands this way."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    record_choices(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@contextlib.contextmanager
def report_errors():
    """Turn DiffexpError and config errors into one line on stderr and exit status 2."""
    try:
        yield
    except DiffexpError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except OmegaConfBaseException as e:
        print(f"error: {first_line(e)}", file=sys.stderr, flush=True)
        sys.exit(2)

MIXED_PRECISION = ("no", "fp16", "bf16")
CHANNELS = (1, 3)


def _value(cfg: DictConfig, key: str):
    return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)


def need_int(cfg: DictConfig, key: str, minimum: int, *, allow: tuple = ()) -> None:
    """``key`` is an integer of at least ``minimum`` (or one of ``allow``)."""
    v = _value(cfg, key)
    if v in allow and not isinstance(v, bool):
        return
    if isinstance(v, bool) or not isinstance(v, Integral) or v < minimum:
        what = f"an integer >= {minimum}" + (f" or {' or '.join(map(str, allow))}" if allow else "")
        raise DiffexpError(f"{key}={v}: expected {what}")


def need_number(cfg: DictConfig, key: str, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False, allow_none: bool = False) -> None:
    """``key`` is a number within the bounds (open or closed)."""
    v = _value(cfg, key)
    if v is None and allow_none:
        return
    ok = isinstance(v, Real) and not isinstance(v, bool)
    if ok and low is not None:
        ok = v > low if low_open else v >= low
    if ok and high is not None:
        ok = v < high if high_open else v <= high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        raise DiffexpError(f"{key}={v}: expected a number {' and '.join(x for x in (lo, hi) if x)}".rstrip())


def need_writable_dir(key: str, path: str) -> None:
    """``path`` is, or can be created as, a folder this process can write in."""
    p = Path(str(path)).expanduser()
    existing = next((q for q in (p, *p.parents) if q.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise DiffexpError(f"{key}={path}: not a folder this user can write in")


def check_train_config(cfg: DictConfig, *, cuda: bool | None = None) -> list[str]:
    """Raise DiffexpError (one line) for the first setting that cannot work; return warnings for
    settings that work but are probably not what was meant."""
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    warnings: list[str] = []
    need_int(cfg, "seed", 0)
    t = "trainer"
    need_int(cfg, f"{t}.batch_size", 1)
    need_int(cfg, f"{t}.grad_accum", 1)
    need_int(cfg, f"{t}.max_steps", 1)
    need_int(cfg, f"{t}.stop_at", 1, allow=(None,))
    need_number(cfg, f"{t}.lr", low=0, low_open=True)
    need_number(cfg, f"{t}.weight_decay", low=0)
    need_number(cfg, f"{t}.eps", low=0, low_open=True)
    betas = _value(cfg, f"{t}.betas")
    if not (OmegaConf.is_list(betas) and len(betas) == 2 and all(isinstance(b, Real) and 0 <= b < 1 for b in betas)):
        raise DiffexpError(f"{t}.betas={betas}: expected two numbers in [0, 1), e.g. [0.9,0.999]")
    need_int(cfg, f"{t}.warmup_steps", 0)
    need_number(cfg, f"{t}.max_grad_norm", low=0, allow_none=True)
    need_int(cfg, f"{t}.log_every", 1)
    need_int(cfg, f"{t}.sample_every", 0)
    need_int(cfg, f"{t}.checkpoint_every", 0)
    need_int(cfg, f"{t}.eval_every", 0, allow=("auto",))
    need_int(cfg, f"{t}.keep_checkpoints", 1)
    need_int(cfg, f"{t}.grid_size", 1)
    need_number(cfg, f"{t}.ema.decay", low=0, high=1, high_open=True)
    need_int(cfg, f"{t}.ema.update_every", 1)
    need_number(cfg, f"{t}.ema.inv_gamma", low=0, low_open=True)
    need_number(cfg, f"{t}.ema.power", low=0, low_open=True)
    need_int(cfg, f"{t}.ema.update_after_step", 0)
    mp = _value(cfg, f"{t}.mixed_precision")
    if mp not in MIXED_PRECISION:
        raise DiffexpError(f"{t}.mixed_precision={mp}: expected one of {', '.join(MIXED_PRECISION)}")
    if mp == "fp16" and not cuda:
        raise DiffexpError(f"{t}.mixed_precision=fp16: needs a CUDA GPU, and this machine has none; use bf16 "
                           "(autocast on CPUs too) or no")
    need_int(cfg, "sampler.steps", 1)
    need_int(cfg, "dataset.resolution", 1)
    channels = _value(cfg, "dataset.channels")
    if channels not in CHANNELS or isinstance(channels, bool):
        raise DiffexpError(f"dataset.channels={channels}: expected 1 (grayscale) or 3 (RGB)")
    need_writable_dir("output_root", cfg.output_root)
    need_writable_dir("cache_dir", cfg.cache_dir)

    steps = cfg.trainer.max_steps
    if cfg.trainer.warmup_steps >= steps:
        warnings.append(f"trainer.warmup_steps={cfg.trainer.warmup_steps} is not below trainer.max_steps={steps}: "
                        "the learning rate never reaches trainer.lr")
    horizon = 1 / (1 - cfg.trainer.ema.decay) if cfg.trainer.ema.decay < 1 else float("inf")
    if not cfg.trainer.ema.get("use_warmup", True) and horizon > steps:
        warnings.append(f"trainer.ema.decay={cfg.trainer.ema.decay} averages over ~{horizon:.0f} steps, more than "
                        f"the run's {steps}, without warm-up: the exported weights stay close to the initial ones")
    if cfg.trainer.lr > 0.1:
        warnings.append(f"trainer.lr={cfg.trainer.lr} is unusually large for Adam (1e-4 to 2e-3 is typical)")
    return warnings


register_resolvers()
