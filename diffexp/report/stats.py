"""The numbers of a comparison: which runs, grouped how, mean ± 95% interval per group, the ranking,
the settings the runs disagree on, and the evaluate results pooled per sampler setting.

``compare_runs`` gathers them into the summary that ``diffexp.report.render`` writes out. Which way
a metric is better comes from ``diffexp.records.catalog.metric_goal`` alone.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from diffexp import DiffexpError
from diffexp.records.catalog import (
    STATUSES,
    curve_axes,
    goal_sign,
    primary_quality,
    quality_goal,
    result_key,
    result_setting,
    run_status,
    sample_count,
    setting_curves,
    summarize,
)

# Keys that never make runs incomparable: where they were written, what they were called, seeds.
IGNORED = ("name", "seed", "group", "resume", "cache_dir", "output_root", "hydra", "choices.debug", "logger.name",
           "trainer.stop_at")  # a stopping point, not part of a recipe
# Keys that configs saved before them lack, with the value they then had.
ADDED_KEYS = {"init_from": None, "checkpoint": None, "init_optimizer": False}
SCALARS = ("num_parameters", "steps", "wall_time_s", "img_per_s", "final_loss")
# What defines the number a loss is: runs that differ here have losses that cannot be compared.
LOSS_DEFINITION = ("scheduler._target_", "scheduler.prediction_type", "trainer.loss_weighting")
TRIAL = "sweep_trial"  # the config group an offline random/bayes sweep draws its runs into (diffexp.sweep)
SMOOTH = 0.9
NFE_LIMITS = (20, 50)  # the budgets the best-sampler table answers for (network evaluations per image)
# Setting fields the samplers table has columns of its own for; any other key field of a result
# (checkpoint, ...) gets a column when its value is set.
SAMPLER_COLUMNS = ("sampler", "sampler_options", "sampler_steps", "num_samples", "guidance_scale", "seed", "metric")


# ---------------------------------------------------------------------------- which runs
def parse_statuses(value: str, allowed: tuple[str, ...] = STATUSES) -> set[str]:
    """``{"finished", "failed"}`` from ``finished,failed``; ``all`` is every status."""
    wanted = {v for v in value.split(",") if v}
    if wanted == {"all"}:
        return set(allowed)
    unknown = sorted(wanted - set(allowed))
    if unknown or not wanted:
        raise DiffexpError(f"status={value}: expected all or a list of {', '.join(allowed)}")
    return wanted


def counted(statuses) -> str:
    """``2 failed, 1 running`` (most common first)."""
    return ", ".join(f"{n} {s}" for s, n in Counter(statuses).most_common())


def select_status(runs: list, wanted: set[str], spelled: str) -> tuple[list, str | None]:
    """(the runs whose status is wanted, one line saying what was skipped and why, or None)."""
    statuses = [run_status(r) for r in runs]
    kept = [r for r, s in zip(runs, statuses) if s in wanted]
    skipped = [s for s in statuses if s not in wanted]
    if not kept:
        raise DiffexpError(f"no runs with status={spelled} among {len(runs)} ({counted(statuses)}); "
                           "status=all includes them all")
    if not skipped:
        return kept, None
    return kept, (f"skipped {len(skipped)} of {len(runs)} runs ({counted(skipped)}): compared status={spelled} only; "
                  "status=all includes them")


def smoothing(value) -> float:
    """``smooth=`` as a weight in [0, 1)."""
    try:
        weight = float(value)
    except (TypeError, ValueError):
        weight = -1.0
    if not 0 <= weight < 1:
        raise DiffexpError(f"smooth={value}: expected a number from 0 (raw curves) up to, not including, 1")
    return weight


# ---------------------------------------------------------------------------- configs and axes
def axis_value(cfg, axis: str) -> Any:
    """A run's value on a comparison axis: its chosen option of a config group, else the config key."""
    choice = OmegaConf.select(cfg, f"choices.{axis}")
    if choice is not None:
        return choice
    value = OmegaConf.select(cfg, axis, default="(missing)")
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def flat_config(cfg) -> dict[str, Any]:
    """``{"trainer.lr": 0.001, ...}`` for every leaf of a config."""
    out = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return out


def flat_value(flat: dict[str, Any], key: str) -> str:
    """A key's value in a ``flat_config`` as JSON text; a key the config lacks has its ``ADDED_KEYS``
    value, else ``"(missing)"``."""
    return json.dumps(flat.get(key, ADDED_KEYS.get(key, "(missing)")), default=str)


def covers(key: str, prefixes) -> bool:
    """Whether ``key`` is one of ``prefixes`` or lies under one (``model.layers`` under ``model``)."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def varying_keys(configs: list, skip: list[str]) -> list[str]:
    """The config keys whose values differ between runs, besides ``skip`` and IGNORED."""
    flats = [flat_config(c) for c in configs]
    keys = sorted({k for f in flats for k in f})
    return [k for k in keys if not covers(k, [*skip, *IGNORED, "choices"])
            and len({flat_value(f, k) for f in flats}) > 1]


def expand_trials(axes: list[str], configs: list) -> list[str]:
    """``axes`` with an offline random sweep's ``sweep_trial`` (an opaque draw number) replaced by
    the values the draws set: the keys that differ between runs besides the other axes, each once
    (a key that only repeats another, such as an interpolated copy of ``trainer.lr``, is left out)."""
    if TRIAL not in axes:
        return axes
    others = [a for a in axes if a != TRIAL]
    drawn: dict[str, tuple] = {}
    for key in varying_keys(configs, others + [TRIAL]):
        values = tuple(json.dumps(OmegaConf.select(c, key), default=str) for c in configs)
        if values not in drawn.values():
            drawn[key] = values
    return others + list(drawn) or ["group"]


def default_axes(configs: list) -> list[str]:
    """The config groups whose chosen option differs between runs (``model``, ``scheduler``, ...)."""
    choices = [OmegaConf.to_container(c.get("choices") or {}) for c in configs]
    keys = sorted({k for c in choices for k in c if k not in ("debug",)})
    varying = [k for k in keys if len({str(c.get(k)) for c in choices}) > 1]
    return varying or ["group"]


def run_keys(configs: list, axes: list[str] | None) -> tuple[list[str], list[tuple]]:
    """(the comparison axes: ``axes``, else ``default_axes``, with a sweep's draws spelled out; each
    run's group key, its values on those axes as text)."""
    axes = expand_trials(axes or default_axes(configs), configs)
    return axes, [tuple(str(axis_value(c, a)) for a in axes) for c in configs]


def mismatches(configs: list, axes: list[str], summaries: list[dict]) -> list[str]:
    """One line per config key (other than the compared axes) on which the runs disagree."""
    flats = [flat_config(c) for c in configs]
    # A group compared by its option (model=...) may differ in all of its keys; so may a sweep's draws.
    covered = [*axes, *(f"choices.{a}" for a in axes), f"choices.{TRIAL}"]
    per_run = lambda key: tuple(flat_value(f, key) for f in flats)  # noqa: E731
    followers = {per_run(a) for a in axes}  # a key that moves with an axis (an interpolated copy) is that axis
    lines = []
    for key in sorted({k for f in flats for k in f}):
        if covers(key, covered) or covers(key, IGNORED) or per_run(key) in followers:
            continue
        values = sorted(set(per_run(key)))
        if len(values) > 1:
            lines.append(f"runs differ in {key} besides by={','.join(axes)}: {', '.join(values)}")
    steps = sorted({s["steps"] for s in summaries})
    if len(steps) > 1:
        lines.append(f"runs reached different steps: {', '.join(map(str, steps))}")
    return lines


def loss_warning(configs: list, rank: str) -> list[str]:
    """A line when the ranking is by loss but the runs' losses measure different things."""
    if rank != "train/loss":
        return []
    differ = []
    for key in LOSS_DEFINITION:
        values = sorted({str(OmegaConf.select(c, key, default="(missing)")) for c in configs})
        if len(values) > 1:
            differ.append(f"{key} ({', '.join(values)})")
    if not differ:
        return []
    return [f"losses are not comparable: runs differ in {'; '.join(differ)}, so their losses measure different "
            "targets; rank by a sample-quality metric instead (train with metric=... trainer.eval_every=N, then "
            "rank=eval/...)"]


# ---------------------------------------------------------------------------- groups and ranking
def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """Mean and half-width of the 95% Student-t interval (None for fewer than two values)."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    sem = stats.sem(values)
    return mean, float(sem * stats.t.ppf(0.975, n - 1))


def group_rows(summaries: list[dict], keys: list[tuple]) -> list[dict]:
    """Per distinct axis tuple: n and mean ± CI of every numeric column."""
    columns = sorted({c for s in summaries for c in s if c in SCALARS or c.startswith(("final eval/", "best eval/"))},
                     key=lambda c: (c not in SCALARS, SCALARS.index(c) if c in SCALARS else c))
    groups = []
    for key in dict.fromkeys(keys):
        members = [s for s, k in zip(summaries, keys) if k == key]
        row = {"axes": list(key), "n": len(members), "runs": [m["name"] for m in members]}
        for c in columns:
            values = [m[c] for m in members if isinstance(m.get(c), (int, float))]
            if values:
                mean, half = mean_ci(values)
                row[c] = {"mean": mean, "ci95": half, "n": len(values)}
        groups.append(row)
    return groups


def rank_groups(groups: list[dict], rank: str) -> tuple[list[dict], str]:
    """The groups best first by the mean final value of ``rank`` (groups without it last), each with
    its ``rank``; and one line saying what the order rests on."""
    column = "final_loss" if rank == "train/loss" else f"final {rank}"
    sign = goal_sign(rank)
    ordered = sorted(groups, key=lambda g: (column not in g, sign * g[column]["mean"] if column in g else 0))
    for i, g in enumerate(ordered, 1):
        g["rank"] = i if column in g else None
    line = f"groups ranked by the mean final {rank} ({'lower' if sign > 0 else 'higher'} is better)"
    ranked = [g for g in ordered if column in g]
    if len(ranked) > 1:
        a, b = ranked[0][column], ranked[1][column]
        if a["ci95"] is None or b["ci95"] is None:
            line += "; the top groups have one run each, so no interval tells them apart"
        elif abs(a["mean"] - b["mean"]) <= a["ci95"] + b["ci95"]:
            line += "; the 95% intervals of the top two overlap"
    return ordered, line


def check_rank(rank: str | None, primary: str | None, summaries: list[dict]) -> str:
    """The key to rank by: ``rank=`` if the runs logged it, else the primary quality metric, else loss."""
    if rank is None:
        return primary or "train/loss"
    logged = sorted({c[len("final "):] for s in summaries for c in s if c.startswith("final eval/")})
    if rank != "train/loss" and rank not in logged:
        raise DiffexpError(f"rank={rank}: no compared run logged it (quality metrics logged: "
                           f"{', '.join(logged) or 'none'}; train/loss always works)")
    return rank


def smooth(values: list[float], weight: float) -> list[float]:
    """W&B's / TensorBoard's exponential moving average with the start-up bias removed: each point is
    ``weight`` times the average so far plus ``1 - weight`` times itself (0 leaves the curve alone)."""
    out, average, norm = [], 0.0, 0.0
    for v in values:
        average = weight * average + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(average / norm)
    return out


# ---------------------------------------------------------------------------- evaluate results per sampler
def result_nfe(result: dict, scheduler_cfg) -> int | None:
    """Network evaluations per image of an evaluate result: recorded since evaluate records it, else
    worked out from its sampler settings and the run's training schedule (None if that fails)."""
    if result.get("nfe") is not None:
        return int(result["nfe"])
    from diffexp.models.build import build_sampler
    from diffexp.sampling.generate import network_evaluations

    try:
        node = OmegaConf.create({"name": result.get("sampler"), "scheduler": result["sampler_options"]})
        return network_evaluations(build_sampler(node, scheduler_cfg), int(result["sampler_steps"]))
    except Exception:  # noqa: BLE001 - a setting this version cannot build: the table shows "–"
        return None


def usual_options(results: list[dict]) -> dict[str, dict[str, str]]:
    """Per sampler name: each option's usual value (as JSON): the one of its config
    (``conf/sampler/<name>.yaml``; absent options are null), else, for a sampler without one, the most
    common among the results of that sampler."""
    from diffexp.models.build import sampler_config

    usual = {}
    for name in {r["sampler"] for r in results}:
        settings = [r.get("sampler_options") or {} for r in results if r["sampler"] == name]
        try:
            own = sampler_config(name).get("scheduler")
        except DiffexpError:  # a sampler config of an older diffexp, gone since
            own = None
        if own is not None:
            defaults = OmegaConf.to_container(own)
            usual[name] = {k: json.dumps(defaults.get(k), default=str)
                           for k in set(defaults).union(*settings) - {"_target_"}}
        else:
            usual[name] = {k: Counter(json.dumps(o.get(k), default=str) for o in settings).most_common(1)[0][0]
                           for k in set().union(*settings)}
    return usual


def sampler_label(result: dict, usual: dict[str, dict[str, str]]) -> str:
    """``dpmpp_sde``, or ``dpmpp_sde use_karras_sigmas=True`` for a result whose options differ from the
    usual ones (``usual_options``: the sampler config's own), so one setting alone is named too."""
    options = result.get("sampler_options") or {}
    shown = [f"{k}={options.get(k, '–')}" for k, v in sorted(usual.get(result["sampler"], {}).items())
             if json.dumps(options.get(k), default=str) != v]
    return " ".join([result["sampler"], *shown])


def uncounted(key: str) -> str:
    """A metric name without its sample count: ``eval/fd_digits`` for ``eval/fd_digits_2k``."""
    return key.rsplit("_", 1)[0]


def at_own_count(row: dict) -> dict:
    """A sampler row's quality values at its own sample count, by their names without the count (FD at
    500 and at 2,000 samples are different numbers: the count is the row's ``samples`` column)."""
    return {uncounted(k): v for k, v in row.items()
            if isinstance(v, dict) and quality_goal(k) and sample_count(k) == row["num_samples"]}


def sampler_rows(runs, keys: list[tuple]) -> tuple[list[dict], str | None]:
    """The ``python -m diffexp.evaluate`` results of the runs (their eval.json), pooled per group,
    sampler setting, steps, sample count and guidance: n and mean ± 95% CI of each quality metric over
    the runs and sampling seeds. Returns the rows (best first by the lead metric within each group)
    and the lead metric (None when no run was evaluated)."""
    found = []
    for run, key in zip(runs, keys):
        results = run.eval_results() if hasattr(run, "eval_results") else []
        scheduler_cfg = run.config().scheduler if results else None
        found += [(key, r, result_nfe(r, scheduler_cfg)) for r in results]
    if not found:
        return [], None
    usual = usual_options([r for _, r, _ in found])
    lead = primary_quality([{k for k in r if quality_goal(k)} for _, r, _ in found])
    if lead is None:
        return [], None
    rows: dict[tuple, dict] = {}
    for key, r, nfe in found:
        label = sampler_label(r, usual)
        row_key = (key, label, result_setting(r, ("seed", "sampler", "sampler_options")))
        extra = {k: r.get(k) for k in result_key(r) if k not in SAMPLER_COLUMNS and r.get(k) is not None}
        row = rows.setdefault(row_key, {"axes": list(key), "sampler": label, "steps": r["sampler_steps"], "nfe": nfe,
                                        "num_samples": r.get("num_samples"), "guidance_scale": r.get("guidance_scale"),
                                        "setting": extra, "seeds": [], "values": {}})
        row["seeds"].append(r.get("seed"))
        for k, v in r.items():
            if quality_goal(k) and isinstance(v, (int, float)):
                row["values"].setdefault(k, []).append(float(v))
    sign = goal_sign(lead)
    out = []
    for row in rows.values():
        values = row.pop("values")
        row["n"] = len(row["seeds"])
        for k, vs in values.items():
            mean, half = mean_ci(vs)
            row[k] = {"mean": mean, "ci95": half, "n": len(vs)}
        out.append(row)
    lead_base = uncounted(lead)

    def order(r: dict):  # per group: the lead metric's sample count first, then each other count, best first
        value = at_own_count(r).get(lead_base)
        return (keys.index(tuple(r["axes"])), r["num_samples"] != sample_count(lead), r["num_samples"] or 0,
                value is None, sign * value["mean"] if value else 0)
    out.sort(key=order)
    return out, lead


def best_samplers(rows: list[dict], lead: str, limits=NFE_LIMITS) -> list[dict]:
    """Per group: the best sampler row by ``lead`` within each NFE limit, and the best at any NFE."""
    sign = goal_sign(lead)
    best = []
    for axes in dict.fromkeys(tuple(r["axes"]) for r in rows):
        scored = [r for r in rows if tuple(r["axes"]) == axes and lead in r]
        entry: dict[str, Any] = {"axes": list(axes)}
        for limit in (*limits, None):
            within = [r for r in scored if limit is None or (r["nfe"] is not None and r["nfe"] <= limit)]
            entry["any" if limit is None else f"nfe<={limit}"] = (min(within, key=lambda r: sign * r[lead]["mean"])
                                                                  if within else None)
        best.append(entry)
    return best


def best_setting(rows: list[dict], lead: str, axis_names: list[str]) -> list[dict]:
    """Per group: the sampler row (a whole evaluation setting) with the best mean ``lead``, its interval
    over the sampling seeds pooled in it; a line saying so (``note``)."""
    sign, out = goal_sign(lead), []
    groups = list(dict.fromkeys(tuple(r["axes"]) for r in rows))
    for axes in groups:
        scored = [r for r in rows if tuple(r["axes"]) == axes and lead in r]
        if not scored:
            continue
        best = min(scored, key=lambda r: sign * r[lead]["mean"])
        where = ", ".join(f"{k}={v}" for k, v in best["setting"].items())
        cell = best[lead]
        value = f"{cell['mean']:.4g}" + (f" ± {cell['ci95']:.3g}" if cell["ci95"] is not None else "")
        out.append({"axes": list(axes), "row": best,
                    "note": (f"best evaluation setting"
                             f"{' of ' + ', '.join(f'{a}={v}' for a, v in zip(axis_names, axes)) if len(groups) > 1 else ''}: "
                             f"{where + ', ' if where else ''}{best['sampler']} {best['steps']} steps, guidance "
                             f"{best['guidance_scale'] if best['guidance_scale'] is not None else '–'}: {lead} {value} "
                             f"(95% interval over {best['n']} sampling seed{'s' if best['n'] != 1 else ''})")})
    return out


def evaluation_curves(runs, names: list[str], lead: str) -> dict[str, dict[str, list[dict]]]:
    """Quality ``lead`` of the runs' evaluate results against each numeric setting that varies
    (``catalog.curve_axes``: checkpoint step, guidance, ...): per field, per curve (run name and the other
    settings), the points ``{x, mean, ci95, n}`` (sampling seeds pooled)."""
    per_run = [(name, run.eval_results()) for run, name in zip(runs, names) if hasattr(run, "eval_results")]
    curves: dict[str, dict[str, list[dict]]] = {}
    for name, results in per_run:
        for field in curve_axes(results):
            for label, points in setting_curves(results, lead, field).items():
                shown = label if len(per_run) == 1 else name if label == "all" else f"{name}: {label}"
                curves.setdefault(field, {})[shown] = [
                    dict(zip(("x", "mean", "ci95"), (x, *mean_ci(vs))), n=len(vs)) for x, vs in points]
    return curves


# ---------------------------------------------------------------------------- the whole comparison
def compare_runs(runs: list, axes: list[str] | None, *, rank: str | None = None, weight: float = SMOOTH,
                 notes: list[str] | None = None) -> tuple[dict[str, Any], list]:
    """The comparison's summary (what ``summary.json`` holds, less the plots) and the runs in its order:
    best group first, by run directory within a group."""
    runs = list(runs)
    configs = [r.config() for r in runs]
    axes, keys = run_keys(configs, axes)
    summaries = [summarize(r) for r in runs]
    for s, c in zip(summaries, configs):
        s["axes"] = {a: axis_value(c, a) for a in axes}
        s["seed"] = c.get("seed")
    primary = primary_quality([{k[len("final "):] for k in s if k.startswith("final eval/")} for s in summaries])
    rank = check_rank(rank, primary, summaries)
    warnings = mismatches(configs, axes, summaries) + loss_warning(configs, rank)
    groups, rank_line = rank_groups(group_rows(summaries, keys), rank)
    order = {tuple(g["axes"]): i for i, g in enumerate(groups)}
    by_rank = sorted(range(len(runs)), key=lambda i: (order[keys[i]], summaries[i]["run"]))
    summary = {"axes": axes, "runs": [summaries[i] for i in by_rank], "groups": groups, "warnings": warnings,
               "notes": [*(notes or []), rank_line], "rank": rank, "primary_quality": primary, "smooth": weight}
    ordered = [runs[i] for i in by_rank]
    evaluations = evaluation_summary(ordered, [keys[i] for i in by_rank], axes,
                                     [s["name"] or Path(s["run"]).name for s in summary["runs"]])
    summary["notes"] += evaluations.pop("notes", [])
    return {**summary, **evaluations}, ordered


def evaluation_summary(runs: list, keys: list[tuple], axes: list[str], names: list[str]) -> dict[str, Any]:
    """The runs' ``python -m diffexp.evaluate`` results (eval.json; ``keys``: each run's group, ``names``:
    how curves name it) as a comparison reports them: ``samplers`` (the lead metric, every evaluation
    setting pooled over sampling seeds, the best sampler per NFE budget, the best setting per group),
    ``evaluation_curves`` (the lead metric against each numeric setting that varies) and ``notes``
    (a line per group naming its best setting with its interval over sampling seeds); ``{}`` when no
    run has a result. What compare writes and the app shows of an evaluation sweep."""
    rows, lead = sampler_rows(runs, keys)
    if not rows:
        return {}
    best = best_setting(rows, lead, axes)
    return {"samplers": {"metric": lead, "rows": rows, "best": best_samplers(rows, lead),
                         "best_setting": [{"axes": b["axes"], **b["row"]} for b in best]},
            "evaluation_curves": {"metric": lead, "fields": evaluation_curves(runs, names, lead)},
            "notes": [b["note"] for b in best]}


def run_key(summary: dict, run_summary: dict) -> tuple:
    """A run's group key (its values on the summary's axes, as text), as ``run_keys`` made it."""
    return tuple(str(run_summary["axes"][a]) for a in summary["axes"])

