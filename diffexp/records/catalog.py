"""The runs under a folder or in W&B, and what each reached: finding run directories (and the folders
of attempts that never started), their status, their summary (steps, wall time, speed, final loss,
final and best quality), which way each metric is better and which one leads a comparison. ``runs``,
``compare``, the app and ``reproduce`` read runs through here; one run's files through ``RunDir``."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf

from diffexp import DiffexpError, first_line
from diffexp.records.rundir import RunDir, reachable, step_of


# --- W&B as a source of runs (compare source=wandb, reproduce run=ENTITY/PROJECT/RUN_ID)
def require_wandb_reachable(what: str) -> None:
    """DiffexpError (one line) unless the W&B server answers: offline mode, or no route to it."""
    mode = os.environ.get("WANDB_MODE", "")
    if mode in ("offline", "disabled", "dryrun"):
        raise DiffexpError(f"{what}: W&B is not reachable (WANDB_MODE={mode}); use run directories, or set "
                           "WANDB_MODE=online with network access")
    why = reachable(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"), timeout=5)
    if why:
        raise DiffexpError(f"{what}: W&B is not reachable ({why}); use run directories "
                           "(`wandb sync` uploads offline runs later)")


# W&B's run states in diffexp's words (a run diffexp closed also has ``status`` in its summary).
WANDB_STATES = {"crashed": "failed", "killed": "interrupted", "preempted": "interrupted", "preempting": "interrupted"}


class WandbRun:
    """A run read from W&B with RunDir's reader interface (config, info, metrics, sample_grids).

    The config is the one diffexp's W&B tracker uploads (the resolved run config).
    """

    def __init__(self, api_run: Any):
        self._run = api_run
        self.path = Path("wandb") / "/".join(api_run.path)

    def config(self) -> DictConfig:
        # diffexp's tracker uploads the resolved run config under "cfg" (group choices top-level)
        config = dict(self._run.config)
        return OmegaConf.create(config.get("cfg", config))

    def info(self) -> dict[str, Any]:
        meta = getattr(self._run, "metadata", None) or {}
        summary = dict(self._run.summary)
        status = summary.get("status") or WANDB_STATES.get(self._run.state, self._run.state)
        return {"status": status, "start": self._run.created_at, "end": None,
                "wall_time_s": summary.get("_runtime"), "num_parameters": summary.get("num_parameters"),
                "git": {"commit": (meta.get("git") or {}).get("commit"), "dirty": None}, "packages": {},
                "wandb_run_id": self._run.id}

    def metrics(self) -> list[dict[str, Any]]:
        rows = []
        for row in self._run.scan_history():
            clean = {k: v for k, v in row.items() if not k.startswith("_") and isinstance(v, (int, float))}
            if clean:
                rows.append({"step": row.get("train/step", row.get("_step")), **clean})
        return rows

    def sample_grids(self) -> list[Path]:
        return []


def wandb_runs(project: str, sweep: str | None = None) -> list[WandbRun]:
    """The runs of a W&B project (``entity/project``), optionally of one sweep."""
    require_wandb_reachable(f"project={project}")
    import wandb

    try:
        found = wandb.Api(timeout=30).runs(project, filters={"sweep": sweep} if sweep else None)
        runs = [WandbRun(r) for r in found]
    except Exception as e:  # wandb raises its own CommError/ValueError family here
        raise DiffexpError(f"project={project}: {first_line(e)}") from None
    if not runs:
        raise DiffexpError(f"project={project}{f' sweep={sweep}' if sweep else ''}: no runs found on W&B")
    return runs


def wandb_run(path: str) -> WandbRun:
    """One W&B run by its path ``entity/project/run_id``."""
    require_wandb_reachable(f"run={path}")
    import wandb

    try:
        return WandbRun(wandb.Api(timeout=30).run(path))
    except Exception as e:
        raise DiffexpError(f"run={path}: {first_line(e)}") from None


# --- finding runs and reading what they reached (compare, runs)
STATUSES = ("finished", "interrupted", "failed", "running", "empty")
# Hydra jobs that make run directories; their folder without run.json is an attempt that never started.
RUN_JOBS = ("train", "reproduce")
# Which way each quality metric is better: distances (Fréchet, kernel) lower, scores higher.
# Keys are the first word of the name: eval/fd_digits_1k -> fd, eval/kid_2k -> kid.
QUALITY_GOALS = {"fd": "min", "fid": "min", "kid": "min", "is": "max", "cs": "max", "precision": "max",
                 "recall": "max", "coverage": "max", "balance": "max", "confidence": "max", "class": "max",
                 "classmix": "min", "nll": "min"}  # nll: bits/dim (eval/nll_bpd_<n>)
# The metric a comparison leads with, in order of preference: the Fréchet distances first.
PRIMARY_ORDER = ("fd", "fid", "kid", "cs", "is")


def _is_run(folder: Path) -> bool:
    return (folder / "config.yaml").is_file() and (folder / "run.json").is_file()


def _is_empty_run(folder: Path) -> bool:
    """A train/reproduce job folder that holds nothing but Hydra's record and logs: an attempt
    refused before it wrote run.json (bad input). Anything else in it and it is not ours to call empty."""
    hydra_file = folder / ".hydra" / "hydra.yaml"
    if (folder / "run.json").exists() or not hydra_file.is_file():
        return False
    if any(not (c.name == ".hydra" or (c.is_file() and c.suffix == ".log")) for c in folder.iterdir()):
        return False
    try:
        return OmegaConf.select(OmegaConf.load(hydra_file), "hydra.job.name") in RUN_JOBS
    except Exception:  # noqa: BLE001 - an unreadable record is not a run
        return False


def run_dirs(root: str | os.PathLike, *, empty: bool = False) -> list[RunDir]:
    """The run directories at or below ``root``, sorted by path; with ``empty``, also the folders of
    attempts that never started (see ``run_status``).

    Symbolic links are not followed and nothing inside a run is searched: the links W&B makes
    (``wandb/*/files/config.yaml`` and ``run.json``, ``wandb/latest-run``) are not more runs.
    """
    found = []
    for folder, subdirs, _ in os.walk(Path(root).expanduser()):
        here = Path(folder)
        if _is_run(here) or (empty and _is_empty_run(here)):
            found.append(here)
            subdirs.clear()
        subdirs.sort()
    return [RunDir(f) for f in sorted(found)]


def iter_runs(paths: list[str | os.PathLike], *, empty: bool = False) -> Iterator[RunDir]:
    """Run directories at or below each path (a run, a multirun or sweep folder, outputs/);
    a DiffexpError for a path that does not exist or holds none."""
    for p in paths:
        if not Path(p).expanduser().exists():
            raise DiffexpError(f"{p}: no such file or directory")
        found = run_dirs(p, empty=empty)
        if not found:
            raise DiffexpError(f"{p}: no diffexp run directories found there")
        yield from found


def run_status(run) -> str:
    """finished, interrupted, failed or running as run.json says; ``empty`` for a folder with no run.json.

    A process killed outright (SIGKILL, out of memory) leaves ``running``: nothing is left to rewrite it.
    """
    return run.info().get("status") or "empty"


def quality_goal(key: str) -> str | None:
    """``min`` or ``max`` for a sample-quality metric (``eval/fd_digits_1k``, ``eval/is_2k``, ...);
    None for what is not one (training keys, ``eval/seconds``, the ``*_std_*`` spreads).
    A quality name not in QUALITY_GOALS counts as a distance (lower is better); timings
    (``eval/seconds``, ``eval/nll_seconds``) and spreads (``_std_``, the standard errors ``_se_``) are none."""
    if not key.startswith("eval/") or key.endswith("seconds") or "_std" in key or "_se_" in key:
        return None
    return QUALITY_GOALS.get(key[len("eval/"):].split("_")[0], "min")


def metric_goal(key: str) -> str | None:
    """Which way ``key`` is better, the one place that knows it: ``min`` for the training loss,
    ``quality_goal`` for a sample-quality metric, None for anything else (a rate, a step)."""
    return "min" if key == "train/loss" else quality_goal(key)


def goal_sign(key: str) -> int:
    """1 where lower is better, -1 where higher is: ``sorted(values, key=lambda v: goal_sign(k) * v)``
    puts the best first (a key without a direction sorts as a distance)."""
    return -1 if metric_goal(key) == "max" else 1


def sample_count(key: str) -> int:
    """The sample count a metric name carries: 2000 for ``eval/fid_2k``, 500 for ``eval/kid_digits_500``."""
    last = key.rsplit("_", 1)[-1].lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(last[-1:], 1)
    try:
        return int(float(last.rstrip("km")) * scale)
    except ValueError:
        return 0


def primary_quality(keys_per_run: list[set[str]]) -> str | None:
    """The quality metric to lead a comparison with: the one most runs logged, then the Fréchet
    distances before the rest (PRIMARY_ORDER), then the most samples; None when no run has one."""
    counts: dict[str, int] = {}
    for keys in keys_per_run:
        for k in keys:
            if quality_goal(k):
                counts[k] = counts.get(k, 0) + 1
    if not counts:
        return None

    def preference(k: str):
        kind = k[len("eval/"):].split("_")[0]
        order = PRIMARY_ORDER.index(kind) if kind in PRIMARY_ORDER else len(PRIMARY_ORDER)
        return -counts[k], order, -sample_count(k), k

    return min(counts, key=preference)


def duration_s(info: dict[str, Any]) -> float | None:
    """Seconds from run.json's start to its end (None while there is no end)."""
    try:
        return (datetime.fromisoformat(info["end"]) - datetime.fromisoformat(info["start"])).total_seconds()
    except (KeyError, TypeError, ValueError):
        return None


def summarize(run) -> dict[str, Any]:
    """What a run reached: name, status, the checkpoint it started from (``parent``: ``RUN@STEP`` for a
    run made with ``init_from``, else None), size, steps, wall time, speed, final loss, and for every
    quality metric its final and best value (``final eval/...``, ``best eval/...``)."""
    status = run_status(run)
    if status == "empty":
        return {"run": str(run.path), "name": None, "status": status, "parent": None, "num_parameters": None,
                "steps": 0, "wall_time_s": None, "img_per_s": None, "final_loss": None}
    cfg, info, rows = run.config(), run.info(), run.metrics()
    train_rows = [r for r in rows if "train/loss" in r]
    speeds = [r["train/img_per_s"] for r in train_rows if "train/img_per_s" in r]
    wall = duration_s(info)
    out = {
        "run": str(run.path), "name": cfg.get("name"), "status": status,
        "parent": f"{Path(parent['run']).name}@{parent['step']}" if (parent := info.get("parent")) else None,
        "num_parameters": info.get("num_parameters"),
        "steps": max((r["step"] for r in rows), default=0),
        "wall_time_s": wall if wall is not None else info.get("wall_time_s"),
        "img_per_s": sum(speeds) / len(speeds) if speeds else None,
        "final_loss": train_rows[-1]["train/loss"] if train_rows else None,
    }
    for key in sorted({k for r in rows for k in r if quality_goal(k)}):
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        if values:
            out[f"final {key}"], out[f"best {key}"] = values[-1], min(values, key=lambda v: goal_sign(key) * v)
    return out


# --- evaluation results by setting, and the best checkpoint
# What an evaluate result was keyed by before results named their own key fields (``key``).
OLD_EVAL_KEY = ("metric", "num_samples", "sampler", "sampler_options", "sampler_steps", "seed", "guidance_scale")


def result_key(result: dict[str, Any]) -> list[str]:
    """The fields that make an evaluate result one measurement (its setting: checkpoint, sampler, steps,
    guidance, sampling seed, metric, ...), as the result lists them under ``key``."""
    return list(result.get("key") or OLD_EVAL_KEY)


def result_setting(result: dict[str, Any], leave_out: tuple[str, ...] = ()) -> str:
    """A result's setting as one comparable string, without the fields ``leave_out`` (``seed`` to pool
    sampling seeds); an unset field (None: ``model/``'s checkpoint) is left out, so a result recorded
    before that field existed has the same setting."""
    return json.dumps({k: result.get(k) for k in result_key(result) if k not in leave_out and result.get(k) is not None},
                      sort_keys=True, default=str)


def checkpoint_scores(run: RunDir) -> dict[str, dict[tuple[str, int], list[float]]]:
    """Every quality value computed for the run's complete checkpoints, by metric, then by (setting,
    step): the evaluations logged during training (metrics.jsonl at the checkpoint's step; setting
    ``training``) and evaluate's results for a checkpoint (eval.json, ``checkpoint`` = its step; one
    setting per sampler, steps, guidance, ..., its sampling seeds pooled)."""
    steps = {step_of(c) for c in run.checkpoints()}
    found: dict[str, dict[tuple[str, int], list[float]]] = {}
    sources = [("training", r.get("step"), r) for r in run.metrics()]
    sources += [(result_setting(r, ("checkpoint", "seed")), r.get("checkpoint"), r) for r in run.eval_results()]
    for setting, step, values in sources:
        if step not in steps or isinstance(step, bool):
            continue
        for k, v in values.items():
            if quality_goal(k) and isinstance(v, (int, float)) and not isinstance(v, bool):
                found.setdefault(k, {}).setdefault((setting, int(step)), []).append(float(v))
    return found


def best_checkpoint(run: RunDir, metric_key: str | None = None) -> tuple[int, str, float]:
    """The complete checkpoint with the best ``metric_key`` value (default: the run's primary quality
    metric, ``primary_quality``) among those already computed (``checkpoint_scores``; a setting's
    values averaged over its sampling seeds, and the best of any setting wins): (step, metric, value).
    A one-line DiffexpError when none was computed."""
    found = checkpoint_scores(run)
    if not found:
        steps = ",".join(str(step_of(c)) for c in run.checkpoints())
        raise DiffexpError(f"checkpoint=best: no quality metric was computed for any checkpoint of {run.path} "
                           f"(steps: {steps or 'none'}); score them first, e.g. python -m diffexp.evaluate -m "
                           f"run={run.path} checkpoint={steps or 'STEP'}")
    key = metric_key or primary_quality([set(found)])
    if key not in found:
        raise DiffexpError(f"metric_key={metric_key}: not computed for any checkpoint of {run.path} "
                           f"(computed: {', '.join(sorted(found))})")
    means = {cell: sum(vs) / len(vs) for cell, vs in found[key].items()}
    best = min(means, key=lambda cell: (goal_sign(key) * means[cell], -cell[1]))
    return best[1], key, means[best]


# Key fields that are no axis of a quality curve: the sampling seed (pooled into an interval), the
# metric and its sample count (one curve is one metric), a sampler's options (shown with its name).
NOT_AN_AXIS = ("seed", "metric", "num_samples", "sampler_options")


def axis_value(result: dict[str, Any], field: str) -> Any:
    """A result's value on key field ``field``; on ``checkpoint`` its training step (``model/`` at its own)."""
    return result.get("step", result.get("checkpoint")) if field == "checkpoint" else result.get(field)


def curve_axes(results: list[dict[str, Any]]) -> list[str]:
    """The key fields whose values differ between ``results`` and are numbers (checkpoint, guidance,
    steps, ...): what quality can be drawn against, in key order."""
    fields = dict.fromkeys(k for r in results for k in result_key(r) if k not in NOT_AN_AXIS)
    out = []
    for field in fields:
        values = {axis_value(r, field) for r in results}
        if len(values) > 1 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out.append(field)
    return out


def setting_curves(results: list[dict[str, Any]], metric: str, field: str) -> dict[str, list[tuple[float, list[float]]]]:
    """``metric`` of ``results`` against key field ``field``: one curve per setting of the other fields that
    vary (sampling seeds pooled), named ``sampler=ddim, guidance_scale=1.5`` (``all`` when none does);
    its points (x, the values there) sorted by x."""
    scored = [r for r in results if isinstance(r.get(metric), (int, float))]
    others = [k for k in dict.fromkeys(k for r in scored for k in result_key(r))
              if k not in (*NOT_AN_AXIS, field) and len({json.dumps(r.get(k), default=str) for r in scored}) > 1]
    curves: dict[str, dict[float, list[float]]] = {}
    for r in scored:
        x = axis_value(r, field)
        if not isinstance(x, (int, float)):
            continue
        name = ", ".join(f"{k}={'model/' if k == 'checkpoint' and r.get(k) is None else r.get(k)}"
                         for k in others) or "all"
        curves.setdefault(name, {}).setdefault(x, []).append(float(r[metric]))
    return {name: sorted(points.items()) for name, points in sorted(curves.items())}
