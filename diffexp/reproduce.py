"""``python -m diffexp.reproduce run=RUN_DIR [check=true] [overrides]``: rerun a run from its record.

The new run starts from the saved resolved config (``RUN_DIR/config.yaml``) in a NEW run directory
(``hydra.run.dir=`` to choose it). Overrides apply on top: values (``trainer.max_steps=100``) as
they are, config groups (``logger=none``) by replacing that group's node. Before training it warns
when the code's git commit differs from the recorded one or the checkout is dirty, and when
package versions differ. ``check=true`` then compares the new losses with the recorded ones step
by step, prints the largest difference and exits 1 when it exceeds ``check_tol`` (default 0: on a
CPU with the same code and versions the losses are identical).

``run=ENTITY/PROJECT/RUN_ID`` reads the config (and, for the check, the losses) from W&B instead,
when W&B is reachable.

A run resumed with a longer ``trainer.max_steps`` is rerun with its final recipe from the start
(one warning: its learning rates differ where the schedule depends on max_steps). A run started
with ``init_from`` starts from its parent's checkpoint when that is still there; otherwise the
parent is reproduced up to that step first (into ``NEW_RUN_DIR_parent``). A run of an older
diffexp that recorded ``changes`` on resume is rerun with its original recipe (one warning).

Examples::

    python -m diffexp.reproduce run=outputs/2026-11-26/10-00-00_unet_small-linear-s0 check=true
    python -m diffexp.reproduce run=outputs/... trainer.max_steps=200 logger=none
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from diffexp import DiffexpError
from diffexp.config import CONFIG_PATH, apply_overrides, need_new_run_dir, report_errors, session_dirs
from diffexp.records.catalog import wandb_run
from diffexp.records.rundir import RunDir, git_state, package_versions, step_of

OWN_KEYS = ("run", "check", "check_tol")


def open_source(run: str):
    """The run to reproduce: a run directory, or a W&B run path ``entity/project/run_id``."""
    if Path(run).expanduser().exists() or run.count("/") != 2:
        return RunDir(run).require()
    return wandb_run(run)


def reproduced_config(saved: DictConfig, composed: DictConfig | None = None) -> DictConfig:
    """The saved config with this command's overrides applied (groups replaced whole; none without
    ``composed``), and without the ``changes`` an older diffexp recorded (see ``recipe_warnings``)."""
    cfg = apply_overrides(saved, skip=OWN_KEYS, composed=composed) if composed is not None else saved.copy()
    with open_dict(cfg):
        cfg.resume = None
        cfg.pop("changes", None)
    OmegaConf.resolve(cfg)
    return cfg


def recipe_warnings(saved: DictConfig, info: dict) -> list[str]:
    """Why the rerun trains another recipe than the original's steps had: a resume that extended
    ``trainer.max_steps``, or an older diffexp's ``changes`` (which are not replayed)."""
    warnings = []
    extended = [r for r in info.get("resumes") or [] if r.get("max_steps")]
    if extended:
        first, last = extended[0]["max_steps"][0], extended[-1]["max_steps"][1]
        warnings.append(f"the run was extended on resume (trainer.max_steps {first} -> {last} at step "
                        f"{extended[0]['step']}): this trains its final recipe from the start, so its learning rates "
                        "differ where the schedule depends on max_steps")
    if saved.get("changes"):
        steps = ", ".join(str(c["step"]) for c in saved.changes)
        warnings.append(f"the run recorded `changes` on resume (at step {steps}), which are not replayed: this "
                        "reproduces its original recipe")
    return warnings


def ensure_parent(cfg: DictConfig, out: Path) -> None:
    """For a run started with ``init_from``: when the parent's checkpoint is gone, reproduce the parent
    up to that step (``trainer.stop_at``) into ``OUT_parent`` beside ``out``, and start ``cfg`` from
    it (recursively for a parent that has a parent)."""
    from diffexp.training.loop import train

    if not cfg.get("init_from"):
        return
    parent, step = RunDir(cfg.init_from), int(cfg.checkpoint)
    if step in {step_of(c) for c in parent.checkpoints()}:  # complete (its manifest checked)
        return
    if not parent.exists():
        raise DiffexpError(f"init_from={parent.path}: the parent run is gone, so checkpoint {step} cannot be "
                           "reproduced")
    parent_cfg = reproduced_config(parent.config())
    with open_dict(parent_cfg):
        parent_cfg.trainer.stop_at = step
    where = out.with_name(f"{out.name}_parent")
    need_new_run_dir(where)
    print(f"warning: {parent.path} no longer has checkpoint {step}: reproducing it first, into {where}",
          file=sys.stderr, flush=True)
    ensure_parent(parent_cfg, where)
    train(parent_cfg, str(where))
    with open_dict(cfg):
        cfg.init_from = str(where)


def provenance_warnings(info: dict) -> list[str]:
    """Why the rerun may not match: a different or dirty checkout, different package versions."""
    warnings = []
    recorded, current = (info.get("git") or {}), git_state()
    if recorded.get("commit") and current["commit"] != recorded["commit"]:
        warnings.append(f"code differs: the run used commit {recorded['commit'][:12]}, this checkout is at "
                        f"{(current['commit'] or 'no git')[:12]}")
    if current["dirty"]:
        warnings.append("this checkout has uncommitted changes (git status): the code is not what any commit holds")
    if recorded.get("dirty"):
        warnings.append("the original run was made from a checkout with uncommitted changes")
    now = package_versions()
    changed = [f"{name} {old} -> {now.get(name)}" for name, old in (info.get("packages") or {}).items()
               if name in now and now[name] != old]
    if changed:
        warnings.append(f"package versions differ: {', '.join(changed)}")
    return warnings


def loss_check(original: list[dict], new: list[dict]) -> tuple[int, float, int | None]:
    """(steps compared, largest |difference| of train/loss, first step that differs or None)."""
    before = {r["step"]: r["train/loss"] for r in original if "train/loss" in r}
    after = {r["step"]: r["train/loss"] for r in new if "train/loss" in r}
    common = sorted(set(before) & set(after))
    if not common:
        raise DiffexpError("check=true: the runs share no logged step (compare trainer.log_every and max_steps)")
    diffs = [abs(before[s] - after[s]) for s in common]
    first = next((s for s, d in zip(common, diffs) if d > 0), None)
    return len(common), max(diffs), first


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="reproduce")
def main(cfg: DictConfig) -> None:
    from diffexp.config import check_train_config  # heavy imports after Hydra has parsed the command line
    from diffexp.quality.evaluator import resolve_metric
    from diffexp.training.loop import train

    with report_errors():
        source = open_source(str(cfg.run))
        saved, info = source.config(), source.info()
        new_cfg = reproduced_config(saved, cfg)
        out, session = session_dirs()
        if RunDir(out).path == getattr(source, "path", None):
            raise DiffexpError(f"hydra.run.dir={out}: that is the run being reproduced; choose a new directory")
        need_new_run_dir(out)
        for w in [*provenance_warnings(info), *recipe_warnings(saved, info), *check_train_config(new_cfg)]:
            print(f"warning: {w}", file=sys.stderr, flush=True)
        new_cfg.metric = resolve_metric(new_cfg.metric, new_cfg.dataset)
        ensure_parent(new_cfg, RunDir(out).path)
        status = train(new_cfg, out, resume=False, session_dir=session)
        print(f"reproduced {source.path} into {out} ({status})", flush=True)
        if cfg.check and status == "finished":
            n, largest, first = loss_check(source.metrics(), RunDir(out).metrics())
            verdict = "identical" if largest == 0 else f"differ, first at step {first}"
            print(f"check: {n} logged losses compared; largest difference {largest:.3g} ({verdict})", flush=True)
            if largest > cfg.check_tol:
                sys.exit(1)


if __name__ == "__main__":
    main()
