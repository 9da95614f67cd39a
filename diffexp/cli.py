"""What every diffexp command shares: Hydra resolvers and one-line error reporting."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import sys
import tempfile
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
                if composed is None:
                    raise DiffexpError(f"{key}={override.value()}: a resumed run keeps its config groups; "
                                       "start a new run instead")
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
register_resolvers()
