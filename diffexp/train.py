"""``python -m diffexp.train [overrides]``: train a diffusion model from the composed config.

Examples::

    python -m diffexp.train                                   # unet_small on digits, CPU, minutes
    python -m diffexp.train model=unet_tiny trainer.max_steps=200
    python -m diffexp.train resume=outputs/2026-11-26/10-00-00_unet_small-linear-s0
    python -m diffexp.train resume=RUN_DIR trainer.max_steps=3000     # the same recipe, longer
    python -m diffexp.train init_from=RUN_DIR checkpoint=2000 trainer.lr=2e-4   # a new run, changed recipe
    python -m diffexp.train -m scheduler=linear,cosine seed=0,1
    python -m diffexp.train --cfg job                         # print the composed config
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from diffexp import DiffexpError
from diffexp.config import CONFIG_PATH, apply_overrides, process_rank, record_choices, report_errors, session_dirs
from diffexp.records.rundir import RunDir, step_of

log = logging.getLogger("diffexp.train")

# What a resume may change: how far it trains and what it records, never the steps already taken.
RESUME_MAY_CHANGE = ("trainer.max_steps", "trainer.stop_at", "trainer.log_every", "trainer.sample_every",
                     "trainer.eval_every", "trainer.checkpoint_every", "trainer.keep_checkpoints", "trainer.grid_size",
                     "trainer.compile", "trainer.compile_mode", "trainer.compile_backend", "trainer.channels_last",
                     "trainer.tf32", "trainer.fused_adamw", "logger", "metric", "sampler", "name", "group",
                     "cache_dir", "output_root")
# This command's own keys: where a run starts from, not part of a recipe.
START_KEYS = ("resume", "init_from", "checkpoint", "init_optimizer")


def _may_change(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUME_MAY_CHANGE)


def load_run_config(run: RunDir) -> DictConfig:
    """The run's saved config, or a one-line DiffexpError when it cannot be read."""
    cfg = run.config()
    if not OmegaConf.is_dict(cfg) or "trainer" not in cfg:
        raise DiffexpError(f"{run.config_file}: cannot be read as a saved config (no trainer settings)")
    return cfg


def _as_plain(value):
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def resume_config(resume: str, composed: DictConfig) -> tuple[DictConfig, int]:
    """The config to continue run ``resume`` with (its saved config with this command's accepted
    overrides; groups among them replaced whole from ``composed``) and its newest checkpoint's step.

    A resume continues the same recipe: an override that would change it (see RESUME_MAY_CHANGE) is
    refused in one line that shows the ``init_from`` command for a changed recipe, and
    ``trainer.max_steps`` may only grow. Nothing is written here.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    run = RunDir(resume).require()
    saved = load_run_config(run)
    run.info()  # a corrupt run.json is refused before anything else
    checkpoint = run.latest_checkpoint()
    if checkpoint is None:
        raise DiffexpError(f"resume={run.path}: no checkpoint in {run.checkpoints_dir}")
    step = step_of(checkpoint)
    if saved.get("changes"):
        raise DiffexpError(f"resume={run.path}: its config.yaml records `changes` (an older diffexp's resume with a "
                           f"changed recipe), which this version does not replay; start a new run from its checkpoint: "
                           f"python -m diffexp.train init_from={run.path} checkpoint={step}")
    cfg = saved.copy()
    choices = HydraConfig.get().runtime.choices
    for override in OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task)):
        key, value = override.key_or_group, override.value()
        if key in START_KEYS or key.startswith("hydra"):
            continue
        before = OmegaConf.select(saved, f"choices.{key}" if key in choices else key, default=None)
        if _as_plain(before) == (choices[key] if key in choices else value):
            continue  # the recipe's own value or group choice, repeated
        if not _may_change(key):
            typed = override.input_line if isinstance(value, (list, dict)) else f"{key}={value}"  # a list: as typed
            raise DiffexpError(f"{key}={value}: a resume continues the same recipe; for a changed recipe start a new "
                               f"run from a checkpoint: python -m diffexp.train init_from={run.path} checkpoint={step} "
                               f"{typed}")
        with open_dict(cfg):
            if key in choices:  # logger=, metric=, sampler=: the group's node replaced whole
                cfg[key] = OmegaConf.to_container(composed[key], resolve=False)
                OmegaConf.update(cfg, f"choices.{key}", choices[key], force_add=True)
            else:
                OmegaConf.update(cfg, key, value, merge=True, force_add=True)
    recorded = saved.trainer.max_steps
    if isinstance(cfg.trainer.max_steps, int) and cfg.trainer.max_steps < recorded:
        raise DiffexpError(f"trainer.max_steps={cfg.trainer.max_steps}: a resume may only extend the run's "
                           f"{recorded} steps; for a shorter run: python -m diffexp.train init_from={run.path} "
                           f"checkpoint=STEP trainer.max_steps={cfg.trainer.max_steps}")
    with open_dict(cfg):
        cfg.resume = str(run.path)
        cfg.trainer.stop_at = composed.trainer.get("stop_at")  # a stopping point belongs to the command giving it
    stop_at = cfg.trainer.stop_at
    if isinstance(stop_at, int) and not isinstance(stop_at, bool) and stop_at <= step:
        raise DiffexpError(f"trainer.stop_at={stop_at}: not after the checkpoint's step ({step})")
    return cfg, step


def init_config(composed: DictConfig) -> DictConfig:
    """The config of a new run started from a checkpoint of run ``init_from``: the parent's saved
    config with this command's overrides (groups replaced whole), its lineage (``init_from``, the
    checkpoint's step) and, unless ``name=`` is given, the parent's name with ``-fromSTEP``. The
    parent and its checkpoint are checked here (the architecture when the weights are loaded)."""
    from hydra.core.hydra_config import HydraConfig

    parent = RunDir(composed.init_from)
    if not parent.exists():
        raise DiffexpError(f"init_from={composed.init_from}: not a diffexp run directory (no config.yaml)")
    saved = load_run_config(parent)
    step = step_of(parent.find_checkpoint(composed.checkpoint))
    cfg = apply_overrides(saved, skip=START_KEYS, composed=composed)
    if cfg.pop("changes", None):
        log.warning("init_from=%s: the parent's recorded `changes` are not carried over: this run starts from its "
                    "original settings and this command's overrides", parent.path)
    named = any(o.split("=", 1)[0].lstrip("+~") == "name" for o in HydraConfig.get().overrides.task)
    with open_dict(cfg):
        cfg.resume, cfg.init_from, cfg.checkpoint = None, str(parent.path), step
        cfg.init_optimizer = bool(composed.get("init_optimizer", False))
        cfg.trainer.stop_at = composed.trainer.get("stop_at")  # the parent's stopping point is not this run's
        if not named:
            cfg.name = f"{saved.name}-from{step}"
    OmegaConf.resolve(cfg)
    return cfg


def nothing_to_do(cfg: DictConfig, step: int) -> bool:
    """Whether resuming ``cfg`` (a finished run) would train nothing; says so if it would."""
    run = RunDir(cfg.resume)
    if run.info().get("status") != "finished" or step < cfg.trainer.max_steps:
        return False
    if process_rank() == 0:
        print(f"{run.path} is finished ({step} of {cfg.trainer.max_steps} steps): nothing to do. To train on, pass "
              f"trainer.max_steps=N with N > {step}.", flush=True)
    return True


def continues_in_place(cfg: DictConfig, run_dir: str | None, session_dir: str | None) -> bool:
    """Whether this command continues the run already in its folder: the folder was fixed by the
    command (``hydra.run.dir=``, a multirun job's folder: the same command again, or a requeued SLURM
    job, lands in it) and holds a run (config.yaml and run.json). The run's recipe must be this
    command's (``resume_config`` refuses a changed one in one line)."""
    if cfg.resume or run_dir is None or session_dir is not None:
        return False
    run = RunDir(run_dir)
    if not (run.exists() and run.info_file.is_file()):
        return False
    if process_rank() == 0:
        log.info("%s holds this run: continuing it (the same command again resumes)", run.path)
    return True


def plan(cfg: DictConfig, run_dir: str | None, session_dir: str | None = None) -> tuple[DictConfig, str | None, bool] | None:
    """What ``python -m diffexp.train`` will do with its composed config, every check passed and
    nothing written: (the config to train, the run directory, whether it resumes), or None when a
    finished run is resumed with nothing to do (said in one line). A new run goes into ``run_dir``
    (from a checkpoint of another run with ``init_from``); ``resume`` continues that run."""
    from diffexp.config import check_train_config, need_new_run_dir
    from diffexp.models.build import resolve_sampler
    from diffexp.quality.evaluator import resolve_metric

    if continues_in_place(cfg, run_dir, session_dir):
        with open_dict(cfg):
            cfg.resume, cfg.init_from, cfg.checkpoint, cfg.init_optimizer = run_dir, None, None, False
    resume, step = bool(cfg.resume), None
    if resume and cfg.get("init_from"):
        raise DiffexpError(f"init_from={cfg.init_from}: a new run; resume= continues one (give one of them)")
    for key in ("checkpoint", "init_optimizer"):  # (checkpoint=last and init_optimizer=false are the defaults)
        if not cfg.get("init_from") and cfg.get(key) not in (None, "last", False):
            raise DiffexpError(f"{key}={cfg.get(key)}: goes with init_from=RUN_DIR (a new run from that checkpoint); "
                               "resume= continues from the newest complete checkpoint")
    if resume:
        cfg, step = resume_config(cfg.resume, cfg)
        run_dir = cfg.resume
    else:
        if "choices" not in cfg:
            record_choices(cfg)
        if cfg.get("init_from"):
            cfg = init_config(cfg)
            if session_dir:  # the default folder is named after the run, and this run after its parent
                run_dir = str(Path(run_dir).with_name(f"{Path(run_dir).name.split('_')[0]}_{cfg.name}"))
    if not resume and run_dir is not None:
        need_new_run_dir(run_dir)
    with open_dict(cfg):  # auto choices: decided here, and recorded
        cfg.sampler = resolve_sampler(cfg.sampler, cfg.scheduler)
    for warning in check_train_config(cfg):
        log.warning(warning)
    if resume and nothing_to_do(cfg, step):
        return None
    with open_dict(cfg):
        cfg.metric = resolve_metric(cfg.metric, cfg.dataset)
    return cfg, run_dir, resume


def run(cfg: DictConfig, run_dir: str | None, session_dir: str | None = None) -> str:
    """What ``python -m diffexp.train`` does with its composed config: ``plan``, then train; returns the
    run's final status. ``session_dir`` (Hydra's scratch record of this command) is adopted by the
    run when it starts."""
    from diffexp.training.launch import check_launch

    check_launch()
    planned = plan(cfg, run_dir, session_dir)
    if planned is None:
        return "finished"
    from diffexp.training.loop import train  # heavy imports after the checks

    cfg, run_dir, resume = planned
    return train(cfg, run_dir, resume=resume, session_dir=session_dir)


def another_process_failed(e: BaseException) -> bool:
    """Whether ``e`` is a collective's failure because another process of the run went away (gloo
    raises one at once; NCCL waits, and the launcher stops this process instead)."""
    import torch.distributed as dist

    text = str(e)
    return process_rank() > 0 and (isinstance(e, dist.DistError) or "closed by peer" in text
                                   or "reset by peer" in text)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> None:
    with report_errors():
        try:
            status = run(cfg, *session_dirs())
        except Exception as e:
            if not another_process_failed(e):
                raise
            # Its own error is shown by the process that failed; this one says why it stops, once.
            print(f"error: process {process_rank()} stops: another process of this run failed (its error is shown "
                  "above or in its log)", file=sys.stderr, flush=True)
            sys.exit(1)
        except KeyboardInterrupt:
            print("error: interrupted (Ctrl-C); a run that had started is recorded as interrupted", file=sys.stderr, flush=True)
            sys.exit(128 + signal.SIGINT)
    if status == "interrupted":
        sys.exit(128 + signal.SIGINT)
    if status == "requeue":  # stopped by SIGUSR1/SIGUSR2 (a job near its time limit): a status a job script can test
        from diffexp.training.stop import REQUEUE_EXIT

        sys.exit(REQUEUE_EXIT)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C before main() was reached (Hydra's own start-up)
        print("error: interrupted (Ctrl-C) during start-up; nothing was recorded", file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGINT)
