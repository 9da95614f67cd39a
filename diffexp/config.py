"""What every diffexp command shares: composing configs (Hydra resolvers, the compose API), the command
line (``hydra_command``: a Hydra app that also takes positional paths), every setup-time check of a
composed config, and one-line error reporting.

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
import re
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


# Hydra's flags that take the next argument as their value (``--cfg job``, ``-cn NAME``); --info only
# when the next argument is one of its topics.
HYDRA_VALUE_FLAGS = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--experimental-rerun", "--info", "-i")
INFO_TOPICS = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")


def split_positional(argv: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(the positional arguments: those without ``=``, or naming an existing path; the ``key=value``
    overrides; Hydra's flags with their values), each in the order typed."""
    positional, overrides, flags = [], [], []
    args = iter(argv)
    for a in args:
        if a.startswith("-"):
            flags.append(a)
            if a in HYDRA_VALUE_FLAGS:
                following = next(args, None)
                if following is not None and a in ("--info", "-i") and following not in INFO_TOPICS:
                    positional.append(following)
                elif following is not None:
                    flags.append(following)
        elif "=" not in a or Path(a).expanduser().exists():
            positional.append(a)
        else:
            overrides.append(a)
    return positional, overrides, flags


def hydra_quoted(text: str) -> str:
    """``text`` as a quoted value of Hydra's override grammar: any character parses. Backslashes are
    literal there except in a run just before a quote, which is halved (and an odd one escapes it)."""
    escaped = re.sub(r"(\\*)'", lambda m: 2 * m.group(1) + "\\'", text)
    escaped = re.sub(r"(\\+)$", lambda m: 2 * m.group(1), escaped)
    return f"'{escaped}'"


def hydra_args(argv: list[str], positional: str, *, lists: tuple[str, ...] = (),
               paths: tuple[str, ...] = ()) -> list[str]:
    """``argv`` as Hydra's parser takes it, so a command keeps the paths users type before its options
    (``compare RUN_DIR... by=model``): the positional arguments become one list override
    ``positional=['RUN_DIR',...]`` (quoted: a path may hold any character), ``key=a,b`` of a ``lists``
    key becomes the list ``key=[a,b]`` (not a multirun sweep), and a ``paths`` key's value is quoted."""
    found, overrides, flags = split_positional(argv)
    out = []  # flags first: Hydra's parser takes the overrides as one run of arguments after them
    for a in overrides:
        key, _, value = a.partition("=")
        plain = value and value[0] not in "[\'\""
        if key in lists and plain and "," in value:
            a = f"{key}=[{value}]"
        elif key in paths and plain:
            a = f"{key}={hydra_quoted(value)}"
        out.append(a)
    listed = [f"{positional}=[{','.join(map(hydra_quoted, found))}]"] if found else []
    return [*flags, *out, *listed]


def option_text(value) -> str:
    """An option as the user typed it: ``finished,failed`` for the list ``hydra_args`` made of it."""
    if OmegaConf.is_list(value) or isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return "" if value is None else str(value)


def hydra_command(config_name: str, positional: str, *, lists: tuple[str, ...] = (), paths: tuple[str, ...] = ()):
    """``hydra.main`` for ``conf/<config_name>.yaml`` whose command line first goes through ``hydra_args``:
    ``--help``, ``--cfg job`` and ``key=value`` overrides as every diffexp command has them, plus the
    positional arguments as the list ``positional``."""
    import functools

    import hydra

    def decorate(task):
        hydra_main = hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=config_name)(task)

        @functools.wraps(task)
        def main():
            typed = sys.argv
            sys.argv = [typed[0], *hydra_args(typed[1:], positional, lists=lists, paths=paths)]  # Hydra reads sys.argv
            try:
                return hydra_main()
            finally:
                sys.argv = typed

        return main

    return decorate


@contextlib.contextmanager
def report_errors():
    """Turn DiffexpError and config errors into one line on stderr and exit status 2."""
    try:
        yield
    except DiffexpError as e:
        if not (e.everywhere and process_rank() > 0):
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
        allowed = ["null" if a is None else str(a) for a in allow]
        what = f"an integer >= {minimum}" + (f" or {' or '.join(allowed)}" if allow else "")
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
    if cfg.trainer.get("lr_schedule") == "wsd":
        need_number(cfg, f"{t}.cooldown", low=0, high=1, low_open=True)
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
    need_phema(cfg)
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



EMA_KINDS = ("ema", "phema", "ema+phema")


def need_phema(cfg: DictConfig) -> None:
    """``trainer.ema.kind`` and, when it tracks power-function profiles, ``trainer.ema.phema.*``."""
    ema = cfg.trainer.ema
    kind = ema.get("kind", "ema")
    if kind not in EMA_KINDS:
        raise DiffexpError(f"trainer.ema.kind={kind}: expected one of {', '.join(EMA_KINDS)}")
    if kind == "ema":
        return
    stds = ema.get("phema", {}).get("std")
    if not (OmegaConf.is_list(stds) and len(stds) >= 1 and len(set(stds)) == len(stds)
            and all(isinstance(s, Real) and not isinstance(s, bool) and 0 < s < 0.3 for s in stds)):
        raise DiffexpError(f"trainer.ema.phema.std={stds}: expected distinct relative widths in (0, 0.3), e.g. [0.05,0.10]")
    need_int(cfg, "trainer.ema.phema.snapshot_every", 1)
    dtype = ema.phema.get("dtype", "float16")
    if dtype not in ("float16", "bfloat16", "float32"):
        raise DiffexpError(f"trainer.ema.phema.dtype={dtype}: expected float16, bfloat16 or float32")


def need_new_run_dir(path: str | os.PathLike) -> None:
    """A new run's folder is new or empty but for Hydra's own record of this command (``.hydra/``, the
    log): a run never writes over files it did not write, nor into another run (``resume=`` continues one)."""
    folder = Path(str(path)).expanduser()
    if not folder.is_dir():
        return
    found = sorted(c.name for c in folder.iterdir() if c.name != ".hydra" and not (c.is_file() and c.suffix == ".log"))
    if found:
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        if (folder / "config.yaml").is_file():
            raise DiffexpError(f"hydra.run.dir={folder}: holds a run ({shown}); resume={folder} continues it, a new "
                               "run needs a new or empty folder")
        raise DiffexpError(f"hydra.run.dir={folder}: holds files a run did not write ({shown}); a new run needs a "
                           "new or empty folder")


def need_guidance(cfg: DictConfig, key: str = "guidance_scale") -> None:
    """``key`` is null (the run's own) or a finite number >= 0 (1: no guidance)."""
    need_number(cfg, key, low=0, high=float("inf"), high_open=True, allow_none=True)


def need_checkpoint(cfg: DictConfig, key: str = "checkpoint") -> None:
    """``key`` names a run's weights: null (its model/), a checkpoint step, ``last`` or ``best``; with
    ``best``, ``metric_key`` is null or a quality metric's name (``eval/...``)."""
    v = _value(cfg, key)
    if v is None or v in ("last", "best") or (isinstance(v, Integral) and not isinstance(v, bool) and v >= 0):
        metric_key = cfg.get("metric_key")
        if metric_key is not None and not str(metric_key).startswith("eval/"):
            raise DiffexpError(f"metric_key={metric_key}: expected a quality metric's name (eval/..., e.g. "
                               "eval/fd_digits_1k)")
        return
    raise DiffexpError(f"{key}={v}: expected a checkpoint step, last or best (null: the run's model/)")


def need_interval(cfg: DictConfig, key: str = "guidance_interval") -> None:
    """``key`` is null (the whole trajectory) or ``[lo, hi]``, fractions of the trajectory with
    0 <= lo <= hi <= 1 (``sampling.pipeline.in_interval``)."""
    v = _value(cfg, key)
    if v is None:
        return
    ok = (OmegaConf.is_list(v) or isinstance(v, (list, tuple))) and len(v) == 2
    ok = ok and all(isinstance(x, Real) and not isinstance(x, bool) for x in v) and 0 <= v[0] <= v[1] <= 1
    if not ok:
        shown = list(v) if OmegaConf.is_list(v) else v
        raise DiffexpError(f"{key}={shown}: expected [lo,hi], fractions of the sampling trajectory with "
                           "0 <= lo <= hi <= 1 (e.g. [0.2,0.7]; null: all of it)")


def need_guide(cfg: DictConfig) -> None:
    """``guide`` is null or a run directory's path; ``guide_checkpoint`` null, a step, last or best."""
    guide = _value(cfg, "guide")
    if guide is not None and not isinstance(guide, str):
        raise DiffexpError(f"guide={guide}: expected the path of a run directory")
    need_checkpoint(cfg, "guide_checkpoint")


def check_sample_config(cfg: DictConfig) -> None:
    """``python -m diffexp.sample``'s own settings (the run-dependent ones, a class for an unconditional
    run say, are checked against the run before any sampling)."""
    need_int(cfg, "n", 1)
    need_int(cfg, "seed", 0)
    need_int(cfg, "batch_size", 1)
    need_int(cfg, "sampler.steps", 1, allow=(None,))
    need_int(cfg, "class_label", 0, allow=(None,))
    need_guidance(cfg)
    need_number(cfg, "ema_std", low=0, low_open=True, allow_none=True)
    need_checkpoint(cfg)
    need_interval(cfg)
    need_guide(cfg)
    if cfg.out is not None and Path(str(cfg.out)).suffix != ".npz":
        raise DiffexpError(f"out={cfg.out}: expected a file name ending in .npz (the grid PNG is written beside it)")


def check_evaluate_config(cfg: DictConfig) -> None:
    """``python -m diffexp.evaluate``'s own settings (the metric's are checked with the run's dataset)."""
    need_int(cfg, "sampler.steps", 1, allow=(None,))
    need_guidance(cfg)
    need_number(cfg, "ema_std", low=0, low_open=True, allow_none=True)
    need_checkpoint(cfg)
    need_int(cfg, "seed", 0, allow=(None,))
    need_interval(cfg)
    need_guide(cfg)
    if not isinstance(cfg.wandb, bool):
        raise DiffexpError(f"wandb={cfg.wandb}: expected true or false")


def check_app_config(cfg: DictConfig) -> None:
    """``python -m diffexp.app``'s settings."""
    a = "app"
    if not Path(str(cfg.app.runs)).expanduser().is_dir():
        raise DiffexpError(f"app.runs={cfg.app.runs}: no such folder")
    need_int(cfg, f"{a}.port", 0)
    need_number(cfg, f"{a}.refresh_s", low=0, low_open=True)
    need_int(cfg, f"{a}.max_images", 1)


register_resolvers()
