"""``python -m diffexp.train [overrides]``: train a diffusion model from the composed config.

Examples::

    python -m diffexp.train                                   # unet_small on digits, CPU, minutes
    python -m diffexp.train model=unet_tiny trainer.max_steps=200
    python -m diffexp.train resume=outputs/2026-11-26/10-00-00_unet_small-linear-s0
    python -m diffexp.train resume=RUN_DIR trainer.max_steps=3000 trainer.lr=2e-4
    python -m diffexp.train -m scheduler=linear,cosine seed=0,1
    python -m diffexp.train --cfg job                         # print the composed config
"""

from __future__ import annotations

import logging
import math
import signal
import sys

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from diffexp import DiffexpError
from diffexp.config import CONFIG_PATH, record_choices, report_errors, session_dirs
from diffexp.records.rundir import RunDir, effective_config

log = logging.getLogger("diffexp.train")

# What a resume may change. These apply from the checkpoint's step on and are recorded there as
# `changes` in config.yaml, so `reproduce` replays them at the same step:
AT_STEP = ("trainer.lr", "trainer.betas", "trainer.weight_decay", "trainer.eps", "trainer.max_steps",
           "trainer.lr_schedule", "trainer.warmup_steps", "trainer.max_grad_norm", "trainer.ema.", "trainer.log_every",
           "trainer.sample_every", "trainer.eval_every", "trainer.checkpoint_every", "trainer.keep_checkpoints",
           "trainer.grid_size")
# and these change how the rest is computed, evaluated or recorded, not what is trained (they are
# updated in config.yaml):
RECORD = ("trainer.compile", "trainer.compile_mode", "trainer.compile_backend", "trainer.channels_last", "trainer.tf32",
          "trainer.fused_adamw", "metric.", "sampler.steps", "sampler.scheduler.", "logger.", "name", "group",
          "cache_dir", "output_root")
# Everything else (seed, batch size, data, model, objective, precision, ...) decides what the saved
# state means: a resume refuses to change it.


def _matches(key: str, keys: tuple[str, ...]) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in keys)


def load_run_config(run: RunDir) -> DictConfig:
    """The run's saved config, or a one-line DiffexpError when it cannot be read."""
    cfg = run.config()
    if not OmegaConf.is_dict(cfg) or "trainer" not in cfg:
        raise DiffexpError(f"{run.config_file}: cannot be read as a saved config (no trainer settings)")
    return cfg


def resume_config(resume: str) -> tuple[DictConfig, bool]:
    """The config to continue run ``resume`` with, and whether the run is finished and nothing changes.

    This command's value overrides are checked against what a resume may change (AT_STEP, RECORD);
    anything else, and any config-group override, is refused in one line. Nothing is written here.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    run = RunDir(resume).require()
    saved = load_run_config(run)
    run.info()  # a corrupt run.json is refused before anything else
    checkpoint = run.latest_checkpoint()
    if checkpoint is None:
        raise DiffexpError(f"resume={run.path}: no checkpoint in {run.checkpoints_dir}")
    step = int(checkpoint.name.split("_")[1])
    cfg, changed = saved.copy(), {}
    groups = set(HydraConfig.get().runtime.choices)
    for override in OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task)):
        key, value = override.key_or_group, override.value()
        if key == "resume" or key.startswith("hydra"):
            continue
        if key in groups:
            raise DiffexpError(f"{key}={value}: a resumed run keeps its config groups; start a new run instead")
        if _matches(key, AT_STEP):
            before = OmegaConf.select(effective_config(saved, step), key, default=None)
            if OmegaConf.is_config(before):
                before = OmegaConf.to_container(before)
            if before != value:
                changed[key] = value
        elif _matches(key, RECORD):
            with open_dict(cfg):
                OmegaConf.update(cfg, key, value, merge=True, force_add=True)
        else:
            raise DiffexpError(f"{key}={value}: a resume keeps {key}, which decides what the saved state means; "
                               f"start a new run (or python -m diffexp.reproduce run={run.path} {key}={value})")
    with open_dict(cfg):
        cfg.resume = str(run.path)
        if changed:
            cfg.changes = [*(cfg.get("changes") or []), {"step": step, "set": changed}]
    return cfg, run.info().get("status") == "finished" and not changed


def nothing_to_do(cfg: DictConfig) -> bool:
    """Whether resuming ``cfg`` (a finished run with nothing changed) would train nothing; says so if it would."""
    run = RunDir(cfg.resume)
    step = int(run.latest_checkpoint().name.split("_")[1])
    max_steps = effective_config(cfg, math.inf).trainer.max_steps
    if step < max_steps:
        return False
    print(f"{run.path} is finished ({step} of {max_steps} steps): nothing to do. To train on, pass "
          f"trainer.max_steps=N with N > {step}.", flush=True)
    return True


def run(cfg: DictConfig, run_dir: str | None, session_dir: str | None = None) -> str:
    """What ``python -m diffexp.train`` does with its composed config: check it, then train a new run
    into ``run_dir`` or continue ``cfg.resume``; returns the run's final status. Nothing is written
    before every check has passed; ``session_dir`` (Hydra's scratch record of this command) is
    adopted by the run when it starts."""
    from diffexp.config import check_train_config
    from diffexp.models.build import resolve_sampler
    from diffexp.quality.evaluator import resolve_metric

    resume, unchanged = bool(cfg.resume), False
    if resume:
        cfg, unchanged = resume_config(cfg.resume)
        run_dir = cfg.resume
    elif "choices" not in cfg:
        record_choices(cfg)
    with open_dict(cfg):  # auto choices: decided here, and recorded
        cfg.sampler = resolve_sampler(cfg.sampler, cfg.scheduler)
    for warning in check_train_config(effective_config(cfg, math.inf)):
        log.warning(warning)
    if unchanged and nothing_to_do(cfg):
        return "finished"
    with open_dict(cfg):
        cfg.metric = resolve_metric(cfg.metric, cfg.dataset)
    from diffexp.training.loop import train  # heavy imports after the checks

    return train(cfg, run_dir, resume=resume, session_dir=session_dir)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> None:
    with report_errors():
        try:
            status = run(cfg, *session_dirs())
        except KeyboardInterrupt:
            print("error: interrupted (Ctrl-C); a run that had started is recorded as interrupted", file=sys.stderr, flush=True)
            sys.exit(128 + signal.SIGINT)
    if status == "interrupted":
        sys.exit(128 + signal.SIGINT)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C before main() was reached (Hydra's own start-up)
        print("error: interrupted (Ctrl-C) during start-up; nothing was recorded", file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGINT)
