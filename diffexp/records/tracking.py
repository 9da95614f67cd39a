"""Experiment tracking: the seam between the training loop and W&B / TensorBoard.

Only the main process talks to a tracker. Tracking must never cost a training run: every call
into a tracker is guarded, and a failure becomes one warning, after which tracking is off (the run
directory's metrics.jsonl and samples/ stay the complete record).

The trackers are accelerate's own (``accelerate.tracking.WandBTracker`` / ``TensorBoardTracker``),
used directly rather than through ``Accelerator(log_with=...)``: the Accelerator is built before the
run directory and run.json exist, and ``init_trackers`` would raise into the training loop where we
need a failed start to cost one warning.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import numpy as np
from accelerate import Accelerator
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from diffexp import DiffexpError, first_line
from diffexp.records.catalog import QUALITY_GOALS, curve_axes, primary_quality, quality_goal, result_key, setting_curves
from diffexp.records.rundir import RunDir, reachable

log = logging.getLogger(__name__)

WANDB_MODES = ("auto", "online", "offline", "disabled")
# Older spellings WANDB_MODE still accepts.
WANDB_MODE_ALIASES = {"dryrun": "offline", "run": "online"}
EXIT_CODES = {"finished": 0, "failed": 1, "interrupted": 130}  # 130 = 128 + SIGINT, what the CLI exits with


class Tracker:
    """No-op tracker (``logger=none``); the run directory stays the complete record."""

    run_id: str | None = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Record one row of scalars at training step ``step``."""

    def log_image(self, key: str, image: Image.Image, step: int) -> None:
        """Record an image under ``key`` at training step ``step``."""

    def finish(self, status: str) -> None:
        """Close the tracker; ``status`` is finished, failed or interrupted."""


def make_tracker(logger_cfg: DictConfig, cfg: DictConfig, accelerator: Accelerator, run: RunDir,
                 run_id: str | None, fork_from: str | None = None, logged_through: int = 0) -> Tracker:
    """The tracker named by ``logger.kind`` on the main process, a no-op one elsewhere.

    ``run_id`` (from run.json on resume) continues that W&B run, which already holds the steps up to
    ``logged_through`` (those a resume replays after a crash are not logged to it twice).
    ``fork_from`` (``RUN_ID?_step=N``, a run started with ``init_from``) makes an online W&B run a
    fork of its parent where the server supports it (else a plain new run, with one warning). A tracker that cannot start costs one
    warning and gives a no-op tracker; a bad ``logger.kind``/``logger.mode`` is a DiffexpError.
    """
    check_logger_cfg(logger_cfg)
    kind = logger_cfg.kind
    if not accelerator.is_main_process or kind == "none":
        return Tracker()
    if kind == "wandb":
        mode = wandb_mode(logger_cfg.mode, starting_in=tracker_dir(logger_cfg, run))
        if mode == "disabled":
            return Tracker()
        if fork_from and mode == "online":  # offline runs cannot fork: the parent is in their config
            try:
                return WandbTracker(logger_cfg, cfg, run, run_id, mode, fork_from=fork_from)
            except Exception as e:  # noqa: BLE001 - a server without forking still gets the run
                log.warning("W&B could not fork %s (%s); the run starts unforked, its parent in its config",
                            fork_from, _one_line(e))
        held = logged_through if run_id else 0  # a new W&B run holds nothing yet
        start = lambda: WandbTracker(logger_cfg, cfg, run, run_id, mode, logged_through=held)  # noqa: E731
    else:
        start = lambda: TensorBoardTracker(logger_cfg, cfg, run)  # noqa: E731
    try:
        return start()
    except Exception as e:  # noqa: BLE001 - whatever the tracker raises, training goes on
        _warn_off(kind, "could not start", e)
        fallback = Tracker()
        fallback.run_id = run_id  # keep run.json's W&B id so a later resume can still continue it
        return fallback


def check_logger_cfg(logger_cfg: DictConfig) -> None:
    """DiffexpError (one line) for a ``logger.kind`` or ``logger.mode`` that cannot work."""
    if logger_cfg.kind not in ("wandb", "tensorboard", "none"):
        raise DiffexpError(f"logger.kind={logger_cfg.kind}: expected wandb, tensorboard or none")
    if logger_cfg.kind == "wandb":
        wandb_mode(logger_cfg.mode)


def add_to_wandb_summary(run: RunDir, values: dict[str, Any], results: list[dict[str, Any]] | None = None) -> None:
    """Continue ``run``'s W&B run (its id is in run.json) just long enough to put the numeric
    ``values`` in its summary and, given the run's evaluation ``results`` (eval.json), log them as a
    table (``evaluations/results``) with the primary quality metric against each setting that varies
    (``evaluation_charts``), at the run's last step; then close it with the exit code its training
    ended with (run.json's status), so its state stays what it was. A W&B failure costs one warning;
    a run without a W&B run is an error."""
    run_id = run.info().get("wandb_run_id")
    if not run_id:
        raise DiffexpError(f"wandb=true: {run.path} has no W&B run (it was not trained with logger=wandb)")
    logger_cfg = run.config().logger
    numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    wandb_parent = tracker_dir(logger_cfg, run)
    try:
        import wandb

        wb = wandb.init(id=run_id, resume="allow", project=logger_cfg.project, entity=logger_cfg.entity or None,
                        dir=wandb_parent, mode=wandb_mode(logger_cfg.mode, starting_in=wandb_parent))
        wb.summary.update(numbers)
        if results:  # at the last step the run logged: W&B's steps only grow, and training's stay untouched
            wb.log(evaluation_charts(results), step=run.last_recorded_step())
        # closed as the training left it: adding results never turns a crashed or interrupted run finished
        status = run.info().get("status")
        if status == "interrupted":  # as training closes it: preempted, to be resumed
            wb.mark_preempting()
        wb.finish(exit_code=EXIT_CODES.get(status, 1))
    except Exception as e:  # noqa: BLE001 - eval.json already holds the result
        _warn_off("wandb", "could not add the evaluation to the W&B run", e)
    drop_latest_run_link(wandb_parent)


def evaluation_charts(results: list[dict[str, Any]]) -> dict[str, Any]:
    """W&B objects of a run's evaluation results: ``evaluations/results``, a table of every result (its
    setting, training step, quality metrics, NFE), and ``evaluations/<metric>_vs_<field>``, a line chart
    of the primary quality metric against each numeric setting that varies (checkpoint step, guidance,
    ...; one line per setting of the others, mean over sampling seeds)."""
    import json

    import wandb

    keys = list(dict.fromkeys(k for r in results for k in result_key(r)))
    metrics = sorted({k for r in results for k in r if quality_goal(k)})
    columns = [*keys, "step", *metrics, "nfe"]

    def cell(v):
        return json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v

    charts: dict[str, Any] = {"evaluations/results": wandb.Table(
        columns=columns, data=[[cell(r.get(c)) for c in columns] for r in results], allow_mixed_types=True)}
    lead = primary_quality([set(metrics)])
    for field in curve_axes(results) if lead else []:
        curves = setting_curves(results, lead, field)
        name = f"{lead.removeprefix('eval/')}_vs_{field}"
        charts[f"evaluations/{name}"] = wandb.plot.line_series(
            xs=[[x for x, _ in points] for points in curves.values()],
            ys=[[sum(vs) / len(vs) for _, vs in points] for points in curves.values()],
            keys=list(curves), title=f"{lead} against {'training step' if field == 'checkpoint' else field}",
            xname="step" if field == "checkpoint" else field)
    return charts


def tracker_dir(logger_cfg: DictConfig, run: RunDir) -> str:
    """Where the tracker writes (wandb its ``wandb/`` folder): ``logger.dir``, else the run directory."""
    return logger_cfg.get("dir") or str(run.path)


def drop_latest_run_link(wandb_parent: str | os.PathLike) -> None:
    """Remove the ``wandb/latest-run`` link wandb leaves beside a closed run: `wandb sync` and any
    search of the run directory would take it for one more run. The run's own folder stays."""
    link = os.path.join(wandb_parent, "wandb", "latest-run")
    if os.path.islink(link):
        with contextlib.suppress(OSError):
            os.remove(link)


def wandb_mode(mode: str | None, starting_in: str | None = None) -> str:
    """``logger.mode`` as wandb.init takes it; ``auto`` is online with W&B credentials, else offline.

    ``starting_in`` (the folder a W&B run is about to start in) also checks that ``auto``'s server
    takes a connection within 3 s; if not, the run logs offline with one warning, rather than wait
    out wandb's retries (90 s by default) and lose its tracking. An explicit ``online`` is left alone.
    """
    value = WANDB_MODE_ALIASES.get(str(mode).lower(), str(mode).lower()) if mode is not None else "auto"
    if value not in WANDB_MODES:
        raise DiffexpError(f"logger.mode={mode}: expected one of {', '.join(WANDB_MODES)}")
    if value != "auto":
        return value
    if not wandb_credentials_present():
        return "offline"
    url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    why = reachable(url, timeout=3) if starting_in is not None else None
    if why is None:
        return "online"
    log.warning("W&B server %s unreachable (%s): logging offline (logger.mode=auto); upload later with "
                "`wandb sync %s`", url, why, os.path.join(starting_in, "wandb", "offline-run-*"))
    return "offline"


def wandb_credentials_present() -> bool:
    """True when wandb would find an API key: WANDB_API_KEY, an identity token, or a netrc entry
    for the W&B host (what ``wandb login`` writes)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        from wandb.sdk.lib.wbauth import wbnetrc

        return bool(wbnetrc.read_netrc_auth(host=os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")))
    except Exception:  # noqa: BLE001 - an unreadable netrc means no credentials, not a crash
        return False


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {first_line(error)}"


def _warn_off(kind: str, what: str, error: BaseException) -> None:
    name = {"wandb": "W&B", "tensorboard": "TensorBoard"}[kind]
    log.warning("%s tracking off: %s (%s); training continues, metrics.jsonl and samples/ keep the record",
                name, what, _one_line(error))


class _Guarded(Tracker):
    """Runs every tracker call under a guard: the first failure warns once and turns tracking off."""

    kind = ""

    def __init__(self) -> None:
        self.off = False

    def _guard(self, what: str, fn, *args, **kwargs) -> None:
        if self.off:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - logging must never stop training
            self.off = True
            _warn_off(self.kind, what, e)


def dashboard_config(cfg: DictConfig, info: dict[str, Any]) -> dict[str, Any]:
    """The W&B run config: the chosen option of each config group as a top-level key (``model``,
    ``scheduler``, ``dataset``, ``sampler``, ...) next to ``seed``, so the dashboard groups and filters
    by them directly; provenance from run.json; the whole resolved config under ``cfg``."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    choices = resolved.get("choices") or {}
    git = info.get("git") or {}
    return {
        **{k: v for k, v in choices.items() if v is not None},
        "seed": cfg.seed,
        "name": cfg.name,
        "group": cfg.get("group"),
        "num_parameters": info.get("num_parameters"),
        "git_commit": git.get("commit"),
        "git_dirty": git.get("dirty"),
        "packages": info.get("packages"),
        "num_processes": info.get("num_processes"),
        "parent": info.get("parent"),  # init_from's run, step and W&B id (offline runs cannot fork)
        "cfg": resolved,
    }


class WandbTracker(_Guarded):
    """One W&B run per training run (continued on resume), through accelerate's WandBTracker."""

    kind = "wandb"

    def __init__(self, logger_cfg: DictConfig, cfg: DictConfig, run: RunDir, run_id: str | None, mode: str,
                 fork_from: str | None = None, logged_through: int = 0) -> None:
        super().__init__()
        from accelerate.tracking import WandBTracker as AccelerateWandB

        self.run_dir = run
        self.last_step = 0
        # W&B keeps every row it is sent (its summaries too): a resumed run's replay of the steps after its
        # checkpoint, which the W&B run holds from before the crash, is not sent again (the same numbers on a CPU).
        self.logged_through = logged_through
        wandb_dir = tracker_dir(logger_cfg, run)  # wandb puts its files in DIR/wandb
        self.wandb_dir = wandb_dir
        os.makedirs(wandb_dir, exist_ok=True)
        # None lets wandb fall back to its own environment variables (WANDB_RUN_GROUP, WANDB_TAGS, ...).
        self.acc = AccelerateWandB(
            logger_cfg.project,
            entity=logger_cfg.entity or None,
            name=logger_cfg.name or None,
            group=logger_cfg.group or None,
            tags=_as_list(logger_cfg.tags) or None,
            job_type=logger_cfg.job_type or None,
            dir=wandb_dir,
            mode=mode,
            id=run_id,
            resume="allow" if run_id else None,
            **({"fork_from": fork_from} if fork_from else {}),
        )
        self.acc.start()
        self.run = self.acc.tracker
        self.run_id = self.run.id
        try:
            self._set_up(cfg, run)
        except BaseException:
            with contextlib.suppress(Exception):  # a half-started run is closed, not left open
                self.run.finish(exit_code=1)
            raise
        log.info("W&B run %s (%s) in %s", self.run_id, mode, os.path.join(wandb_dir, "wandb"))

    def _set_up(self, cfg: DictConfig, run: RunDir) -> None:
        self.acc.store_init_configuration(dashboard_config(cfg, run.info()))
        # Plotted against train/step (which W&B's own step now equals; runs logged before it counted rows).
        self.run.define_metric("train/step")
        for pattern in ("train/*", "samples/*"):
            self.run.define_metric(pattern, step_metric="train/step")
        # No catch-all eval/*: when two globs match a key, which one wandb applies is not defined.
        for prefix in QUALITY_GOALS:  # eval/fd_digits_1k: best and last in the summary
            pattern = f"eval/{prefix}_*"
            self.run.define_metric(pattern, step_metric="train/step", summary=f"{quality_goal(pattern)},last")
        self.run.save(str(run.config_file), base_path=str(run.path), policy="now")

    def held(self, step: int) -> bool:
        """Whether the W&B run holds step ``step`` already (from before a crash); says so once."""
        if step > self.logged_through:
            return False
        if not getattr(self, "_said", False):
            self._said = True
            log.info("W&B: steps %d to %d are in the run from before the interruption and are not logged again "
                     "(metrics.jsonl holds them as replayed)", step, self.logged_through)
        return True

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Log a row at W&B step ``step``, the training step (so a fork's ``?_step=`` is a training step),
        with ``train/step`` as its x-axis; what is logged at one step (losses, evaluation, grid) is one row.
        Steps only grow: those a resume replays are not sent again (``held``)."""
        if self.held(step):
            return
        self.last_step = max(self.last_step, step)
        row = {k: v for k, v in metrics.items() if k != "step"}
        row["train/step"] = step
        self._guard("log", self.acc.log, row, step=step)

    def log_image(self, key: str, image: Image.Image, step: int) -> None:
        """Log ``image`` as a W&B image under ``key`` at ``train/step`` = ``step``."""
        if self.held(step):
            return
        import wandb

        self.last_step = max(self.last_step, step)
        self._guard("log image", lambda: self.acc.log({key: wandb.Image(image, caption=f"step {step}"),
                                                       "train/step": step}, step=step))

    def finish(self, status: str) -> None:
        """Upload model/ as a ``model`` artifact if finished, save run.json, close with the status's exit
        code, and remove wandb's ``latest-run`` link (see ``drop_latest_run_link``)."""
        import wandb

        if status == "finished" and self.run_dir.model_dir.is_dir():
            def log_model():
                artifact = wandb.Artifact(f"model-{self.run_id}", type="model",
                                          metadata={"step": self.last_step, "name": self.run.name})
                artifact.add_dir(str(self.run_dir.model_dir))
                self.run.log_artifact(artifact, aliases=["latest", f"step_{self.last_step}"])
            self._guard("model artifact", log_model)
        self._guard("save run.json", self.run.save, str(self.run_dir.info_file), base_path=str(self.run_dir.path),
                    policy="now")
        self._guard("summary", self.run.summary.update, {"status": status})
        if status == "interrupted":  # W&B shows the run as preempted: it can be resumed
            self._guard("mark preempting", self.run.mark_preempting)
        try:
            self.run.finish(exit_code=EXIT_CODES.get(status, 1))
        except Exception as e:  # noqa: BLE001
            if not self.off:
                _warn_off(self.kind, "finish", e)
        drop_latest_run_link(self.wandb_dir)


class TensorBoardTracker(_Guarded):
    """TensorBoard event files under RUN_DIR/tensorboard, through accelerate's TensorBoardTracker."""

    kind = "tensorboard"

    def __init__(self, logger_cfg: DictConfig, cfg: DictConfig, run: RunDir) -> None:
        super().__init__()
        from accelerate.tracking import TensorBoardTracker as AccelerateTensorBoard

        self.acc = AccelerateTensorBoard("tensorboard", logging_dir=tracker_dir(logger_cfg, run))
        self.acc.start()
        self.acc.store_init_configuration(_flat_scalars(dashboard_config(cfg, run.info())))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Scalars at global step ``step``."""
        row = {k: v for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))}
        self._guard("log", self.acc.log, row, step=step)

    def log_image(self, key: str, image: Image.Image, step: int) -> None:
        """The image at global step ``step``."""
        self._guard("log image", self.acc.log_images, {key: np.asarray(image.convert("RGB"))[None]}, step=step,
                    dataformats="NHWC")

    def finish(self, status: str) -> None:
        """Flush and close the event file."""
        self._guard("finish", self.acc.finish)


def _as_list(value) -> list[str]:
    """``logger.tags=a`` and ``logger.tags=[a,b]`` alike."""
    if value is None:
        return []
    return [str(value)] if isinstance(value, str) else [str(v) for v in value]


def _flat_scalars(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """TensorBoard hparams take scalars only: nested keys joined with dots, lists as strings."""
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flat_scalars(v, key + "."))
        elif isinstance(v, (bool, int, float, str)):
            flat[key] = v
        else:
            flat[key] = str(v)
    return flat
