"""``python -m diffexp.compare RUN_DIR_OR_SWEEP_DIR... [by=AXES] [status=finished] [rank=KEY] [smooth=0.9] [out=DIR]``.

Writes ``report.md``, ``report.html``, ``summary.json`` and PNG plots (loss and quality curves per
group, the last sample grid of every run) into ``out`` (default: ``compare/`` inside the one
folder given, else ``outputs/compare/DATE_TIME``). Only finished runs are compared unless
``status=`` says otherwise; one line says what was left out. Rows are grouped by the ``by`` axes (a
config group such as ``model``, or any config key such as ``scheduler.prediction_type``; default:
the groups whose option differs, with an offline random sweep's ``sweep_trial`` spelled out as the
values it drew); each group gets mean ± 95% confidence interval over its runs (Student t), and the
groups are ranked by a sample-quality metric when the runs logged one, else by the final loss.
Runs that differ in anything else (dataset, steps, metric sample count, ...) are reported, and so
is a ranking by loss across prediction types or objectives, whose losses measure different things.

``source=wandb project=ENTITY/PROJECT [sweep=ID]`` reads the runs from W&B instead, when W&B is
reachable.
"""

from __future__ import annotations

import html
import json
import math
import shutil
import sys
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from diffexp import DiffexpError
from diffexp.config import report_errors
from diffexp.records.rundir import (
    STATUSES,
    iter_runs,
    primary_quality,
    quality_goal,
    run_status,
    sample_count,
    summarize,
    wandb_runs,
)

OPTIONS = ("by", "out", "source", "project", "sweep", "status", "rank", "smooth")
# Keys that never make runs incomparable: where they were written, what they were called, seeds.
IGNORED = ("name", "seed", "group", "resume", "cache_dir", "output_root", "hydra", "choices.debug", "logger.name")
SCALARS = ("num_parameters", "steps", "wall_time_s", "img_per_s", "final_loss")
# What defines the number a loss is: runs that differ here have losses that cannot be compared.
LOSS_DEFINITION = ("scheduler._target_", "scheduler.prediction_type", "trainer.loss_weighting")
TRIAL = "sweep_trial"  # the config group an offline random/bayes sweep draws its runs into (diffexp.sweep)
SMOOTH = 0.9
ARROW = {"min": "↓", "max": "↑"}


def parse_args(argv: list[str], options: tuple[str, ...] = OPTIONS) -> tuple[list[str], dict[str, str]]:
    """(run or sweep paths, options) from ``PATH... key=value...``."""
    paths, found = [], {}
    for a in argv:
        key = a.split("=", 1)[0]
        if "=" in a and key in options:
            found[key] = a.split("=", 1)[1]
        elif "=" in a and not Path(a).exists():
            raise DiffexpError(f"{a}: unknown option (expected one of {', '.join(options)}) and not a path")
        else:
            paths.append(a)
    return paths, found


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


def covers(key: str, prefixes) -> bool:
    """Whether ``key`` is one of ``prefixes`` or lies under one (``model.layers`` under ``model``)."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def varying_keys(configs: list, skip: list[str]) -> list[str]:
    """The config keys whose values differ between runs, besides ``skip`` and IGNORED."""
    flats = [flat_config(c) for c in configs]
    keys = sorted({k for f in flats for k in f})
    return [k for k in keys if not covers(k, [*skip, *IGNORED, "choices"])
            and len({json.dumps(f.get(k, "(missing)"), default=str) for f in flats}) > 1]


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


def mismatches(configs: list, axes: list[str], summaries: list[dict]) -> list[str]:
    """One line per config key (other than the compared axes) on which the runs disagree."""
    flats = [flat_config(c) for c in configs]
    # A group compared by its option (model=...) may differ in all of its keys; so may a sweep's draws.
    covered = [*axes, *(f"choices.{a}" for a in axes), f"choices.{TRIAL}"]
    per_run = lambda key: tuple(json.dumps(f.get(key, "(missing)"), default=str) for f in flats)  # noqa: E731
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
    goal = "min" if rank == "train/loss" else quality_goal(rank)
    sign = 1 if goal == "min" else -1
    ordered = sorted(groups, key=lambda g: (column not in g, sign * g[column]["mean"] if column in g else 0))
    for i, g in enumerate(ordered, 1):
        g["rank"] = i if column in g else None
    better = "lower" if goal == "min" else "higher"
    line = f"groups ranked by the mean final {rank} ({better} is better)"
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


NFE_LIMITS = (20, 50)  # the budgets the best-sampler table answers for (network evaluations per image)


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
    """Per sampler name: each option's most common value (as JSON) among the results of that sampler."""
    usual = {}
    for name in {r["sampler"] for r in results}:
        settings = [r.get("sampler_options") or {} for r in results if r["sampler"] == name]
        usual[name] = {k: Counter(json.dumps(o.get(k), default=str) for o in settings).most_common(1)[0][0]
                       for k in set().union(*settings)}
    return usual


def sampler_label(result: dict, usual: dict[str, dict[str, str]]) -> str:
    """``dpmpp_sde``, or ``dpmpp_sde use_karras_sigmas=True`` for a result whose options differ from the
    usual ones (the most common value of each option among the results of that sampler)."""
    options = result.get("sampler_options") or {}
    shown = [f"{k}={options.get(k, '–')}" for k, v in sorted(usual.get(result["sampler"], {}).items())
             if json.dumps(options.get(k), default=str) != v]
    return " ".join([result["sampler"], *shown])


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
        row_key = (key, label, r["sampler_steps"], r.get("num_samples"), r.get("guidance_scale"))
        row = rows.setdefault(row_key, {"axes": list(key), "sampler": label, "steps": r["sampler_steps"], "nfe": nfe,
                                        "num_samples": r.get("num_samples"), "guidance_scale": r.get("guidance_scale"),
                                        "seeds": [], "values": {}})
        row["seeds"].append(r.get("seed"))
        for k, v in r.items():
            if quality_goal(k) and isinstance(v, (int, float)):
                row["values"].setdefault(k, []).append(float(v))
    sign = -1 if quality_goal(lead) == "max" else 1
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


def paired_table(runs, keys: list[tuple], axes: list[str]) -> tuple[list[dict], tuple | None]:
    """The runs' ``python -m diffexp.research.paired`` results (a row each, in run order) and their report table:
    each metric's ``sampler / reference - 1`` with its 95% interval and the verdict at the result's tolerance."""
    rows = [{"axes": list(key), "run": run.path.name, **r}
            for run, key in zip(runs, keys) for r in (run.paired_results() if hasattr(run, "paired_results") else [])]
    if not rows:
        return [], None
    columns = list(dict.fromkeys(uncounted(k) for r in rows for k, d in r["metrics"].items() if "relative" in d))

    def cell(r: dict, column: str) -> str:
        d = next((d for k, d in r["metrics"].items() if uncounted(k) == column and "relative" in d), None)
        if d is None:
            return "–"
        verdict = "within" if d["within_tolerance"] else "not shown within"
        return (f"{100 * d['relative']:+.1f}% ({100 * d['low']:+.1f}% .. {100 * d['high']:+.1f}%): "
                f"{verdict} {100 * r['tolerance']:g}%")

    header = [*axes, "run", "sampler", "steps", "against", "pairs", "same class", *(f"{c} vs reference" for c in columns)]
    usual = usual_options(rows)
    table = [[*r["axes"], r["run"], sampler_label(r, usual), fmt(r["sampler_steps"]), r["reference"], fmt(r["pairs"]),
              "–" if r.get("same_class") is None else f"{100 * r['same_class']:.1f}%", *(cell(r, c) for c in columns)]
             for r in rows]
    title = ("Against the reference sampler on coupled pairs (python -m diffexp.research.paired; sampler / reference - 1, "
             "95% bootstrap interval over the pairs)")
    return rows, (title, header, table)


def uncounted(key: str) -> str:
    """A metric name without its sample count: ``eval/fd_digits`` for ``eval/fd_digits_2k``."""
    return key.rsplit("_", 1)[0]


def at_own_count(row: dict) -> dict:
    """A sampler row's quality values at its own sample count, by their names without the count (FD at
    500 and at 2,000 samples are different numbers: the count is the row's ``samples`` column)."""
    return {uncounted(k): v for k, v in row.items()
            if isinstance(v, dict) and quality_goal(k) and sample_count(k) == row["num_samples"]}


def best_samplers(rows: list[dict], lead: str, limits=NFE_LIMITS) -> list[dict]:
    """Per group: the best sampler row by ``lead`` within each NFE limit, and the best at any NFE."""
    sign = -1 if quality_goal(lead) == "max" else 1
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


def smooth(values: list[float], weight: float) -> list[float]:
    """W&B's / TensorBoard's exponential moving average with the start-up bias removed: each point is
    ``weight`` times the average so far plus ``1 - weight`` times itself (0 leaves the curve alone)."""
    out, average, norm = [], 0.0, 0.0
    for v in values:
        average = weight * average + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(average / norm)
    return out


def label(axes: list[str], values) -> str:
    return ", ".join(f"{a}={v}" for a, v in zip(axes, values))


def plot_curves(runs, keys, axes, metric: str, path: Path, weight: float = 0.0) -> bool:
    """Mean curve of ``metric`` per group against the step, thin lines for its single runs.

    With ``weight`` > 0 the curves are smoothed (``smooth``) and the raw group mean stays faint behind.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple, list[list[tuple[int, float]]]] = {}
    for run, key in zip(runs, keys):
        points = [(r["step"], r[metric]) for r in run.metrics() if isinstance(r.get(metric), (int, float))]
        if points:
            series.setdefault(key, []).append(points)
    if not series:
        return False
    shown = (lambda ys: smooth(ys, weight)) if weight > 0 else (lambda ys: ys)
    marker = "o" if metric != "train/loss" else None  # quality is measured a few times, loss every few steps
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (key, members) in enumerate(series.items()):
        color = f"C{i % 10}"
        by_step: dict[int, list[float]] = {}
        for points in members:
            steps, ys = zip(*points)
            if len(members) > 1:
                ax.plot(steps, shown(list(ys)), color=color, alpha=0.3, linewidth=0.8)
            for step, v in points:
                by_step.setdefault(step, []).append(v)
        steps = sorted(by_step)
        mean = [sum(by_step[s]) / len(by_step[s]) for s in steps]
        if weight > 0:
            ax.plot(steps, mean, color=color, alpha=0.2, linewidth=0.8)
        ax.plot(steps, shown(mean), color=color, linewidth=2, marker=marker, markersize=4,
                label=f"{label(axes, key)} (n={len(members)})")
    ax.set_xlabel("step")
    goal = quality_goal(metric)
    ax.set_ylabel(metric + (f" ({'lower' if goal == 'min' else 'higher'} is better)" if goal else "")
                  + (f", smoothed {weight:g}" if weight > 0 else ""))
    if metric == "train/loss":
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_grids(runs, titles: list[str], path: Path) -> list[str]:
    """The last sample grid of every run side by side, each titled with its compared values and
    step; returns the titles shown (empty when no run has a grid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    grids = [(f"{t}\n{r.sample_grids()[-1].stem.replace('_', ' ')}", r.sample_grids()[-1])
             for r, t in zip(runs, titles) if r.sample_grids()]
    if not grids:
        return []
    cols = min(4, len(grids))
    nrows = math.ceil(len(grids) / cols)
    fig, axs = plt.subplots(nrows, cols, figsize=(3 * cols, 3.6 * nrows), squeeze=False)
    for ax in axs.flat:
        ax.axis("off")
    for ax, (title, grid) in zip(axs.flat, grids):
        ax.imshow(Image.open(grid), cmap="gray")
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [t for t, _ in grids]


def fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() and abs(v) < 1e15 else f"{v:.4g}"
    return str(v)


def fmt_ci(cell: dict | None, n: int | None = None) -> str:
    """``mean ± ci95``; with ``n`` (the row's count), a cell made of fewer values says how many: ``0.51 (n=1)``."""
    if not cell:
        return "–"
    text = fmt(cell["mean"]) if cell["ci95"] is None else f"{fmt(cell['mean'])} ± {fmt(cell['ci95'])}"
    return text if n is None or cell.get("n", n) == n else f"{text} (n={cell['n']})"


def sampler_cell(row: dict | None, lead: str) -> str:
    """``dpmpp_sde 20 steps (20 NFE, n=6): 1.61 ± 0.2`` for the best-sampler table (n: the results pooled;
    a best of n=1 is one sampling seed's luck as much as the sampler's)."""
    if row is None:
        return "–"
    return f"{row['sampler']} {row['steps']} steps ({fmt(row['nfe'])} NFE, n={row['n']}): {fmt_ci(row.get(lead))}"


def sampler_tables(rows: list[dict], axes: list[str], lead: str, best: list[dict]) -> list[tuple]:
    """The report's tables of evaluate results: every sampler setting, and the best per NFE budget."""
    lead_base = uncounted(lead)  # each row shows its metrics at its own sample count (the samples column)
    own = [at_own_count(r) for r in rows]
    # the lead first, then its variants (eval/fd_digits_balanced after eval/fd_digits), then the rest by name
    columns = [lead_base, *sorted({k for values in own for k in values if k != lead_base},
                                  key=lambda k: (not k.startswith(lead_base), k))]
    header = [*axes, "sampler", "steps", "NFE", "samples", "guidance", "n", *map(heading, columns)]
    table = [[*r["axes"], r["sampler"], fmt(r["steps"]), fmt(r["nfe"]), fmt(r["num_samples"]), fmt(r["guidance_scale"]),
              str(r["n"]), *(fmt_ci(values.get(c), r["n"]) for c in columns)] for r, values in zip(rows, own)]
    limits = [k for k in best[0] if k != "axes"]
    best_header = [*axes, *(f"best at {k.replace('nfe<=', 'NFE ≤ ')}" if k != "any" else "best at any NFE"
                            for k in limits)]
    best_table = [[*b["axes"], *(sampler_cell(b[k], lead) for k in limits)] for b in best]
    title = (f"Samplers (python -m diffexp.evaluate results in eval.json; mean ± 95% CI over runs and sampling "
             f"seeds, at each row's sample count; best {lead} first)")
    return [(title, header, table),
            (f"Best sampler per group by {heading(lead)} within a network-evaluation budget", best_header, best_table)]


def heading(column: str) -> str:
    """A column's title: ``best eval/fd_digits_1k ↓`` says which way is better."""
    key = column.split(" ", 1)[-1]
    return f"{column} {ARROW[quality_goal(key)]}" if quality_goal(key) else column.replace("_", " ")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_report(runs, axes: list[str] | None, out: Path, *, rank: str | None = None, weight: float = SMOOTH,
                 notes: list[str] | None = None) -> dict[str, Any]:
    """Write the report files into ``out``; returns the summary (also in ``summary.json``)."""
    runs = list(runs)
    configs = [r.config() for r in runs]
    axes = expand_trials(axes or default_axes(configs), configs)
    summaries = [summarize(r) for r in runs]
    for s, c in zip(summaries, configs):
        s["axes"] = {a: axis_value(c, a) for a in axes}
        s["seed"] = c.get("seed")
    primary = primary_quality([{k[len("final "):] for k in s if k.startswith("final eval/")} for s in summaries])
    rank = check_rank(rank, primary, summaries)
    keys = [tuple(str(s["axes"][a]) for a in axes) for s in summaries]
    warnings = mismatches(configs, axes, summaries) + loss_warning(configs, rank)
    groups, rank_line = rank_groups(group_rows(summaries, keys), rank)
    order = {tuple(g["axes"]): i for i, g in enumerate(groups)}
    by_rank = sorted(range(len(runs)), key=lambda i: (order[keys[i]], summaries[i]["run"]))
    out.mkdir(parents=True, exist_ok=True)
    lead = rank if rank != "train/loss" else primary  # the quality metric the tables and the curve lead with
    curves = {"loss": ("train/loss", weight), "quality": (lead, 0.0)}
    plots = {name: bool(metric) and plot_curves(runs, keys, axes, metric, out / f"{name}.png", w)
             for name, (metric, w) in curves.items()}
    titles = plot_grids([runs[i] for i in by_rank], [f"{label(axes, keys[i])}, seed {summaries[i]['seed']}"
                                                      for i in by_rank], out / "grids.png")
    plots["grids"] = bool(titles)
    notes = [*(notes or []), rank_line]
    summary = {"axes": axes, "runs": [summaries[i] for i in by_rank], "groups": groups, "warnings": warnings,
               "notes": notes, "rank": rank, "primary_quality": primary, "smooth": weight, "grid_titles": titles,
               "plots": [f"{k}.png" for k, ok in plots.items() if ok]}
    rows, eval_lead = sampler_rows(runs, keys)  # the runs' evaluate results, if any
    if rows:
        summary["samplers"] = {"metric": eval_lead, "rows": rows, "best": best_samplers(rows, eval_lead)}
    paired, paired_tab = paired_table(runs, keys, axes)  # the runs' paired results, if any
    if paired:
        summary["paired"] = paired
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")

    # The tables lead with one quality metric; every quality metric's final value has its own table.
    headline = [f"best {lead}", f"final {lead}"] if lead else []
    quality = sorted({c for s in summaries for c in s if c.startswith("final eval/")})
    run_header = ["run", *axes, "seed", "status", "parameters", "steps", "wall time (s)", "images/s", "final loss",
                  *map(heading, headline)]
    run_rows = [[s["name"], *(fmt(s["axes"][a]) for a in axes), fmt(s["seed"]), s["status"],
                 fmt(s["num_parameters"]), fmt(s["steps"]), fmt(s["wall_time_s"]), fmt(s["img_per_s"]),
                 fmt(s["final_loss"]), *(fmt(s.get(c)) for c in headline)] for s in summary["runs"]]
    group_cols = [c for c in (*SCALARS, *headline) if any(c in g for g in groups)]
    group_header = ["rank", *axes, "n", *map(heading, group_cols)]
    group_table = [[fmt(g["rank"]), *g["axes"], str(g["n"]), *(fmt_ci(g.get(c), g["n"]) for c in group_cols)]
                   for g in groups]
    tables = [("Groups (mean ± 95% CI over runs, Student t)", group_header, group_table)]
    if len(quality) > 1:
        tables.append(("Quality metrics per group (final value, mean ± 95% CI)", [*axes, "n", *map(heading, quality)],
                       [[*g["axes"], str(g["n"]), *(fmt_ci(g.get(c), g["n"]) for c in quality)] for g in groups]))
    tables.append(("Runs", run_header, run_rows))
    if "samplers" in summary:
        tables += sampler_tables(summary["samplers"]["rows"], axes, summary["samplers"]["metric"],
                                 summary["samplers"]["best"])
    if paired_tab:
        tables.append(paired_tab)
    titles_of = {"loss": "Training loss" + (f" (smoothed {weight:g}; faint: raw)" if weight > 0 else ""),
                 "quality": f"Sample quality: {lead}", "grids": "Last sample grids"}
    shown = [(titles_of[k], f"{k}.png") for k, ok in plots.items() if ok]

    title = f"Comparison of {len(runs)} runs by {', '.join(axes)}"
    md = [f"# {title}", ""]
    md += [f"> warning: {w}" for w in warnings] + [f"> {n}" for n in notes] + [""]
    for name, header, rows in tables:
        md += [f"## {name}", "", markdown_table(header, rows), ""]
    for name, src in shown:
        md += [f"## {name}", "", f"![{name}]({src})", ""]
    (out / "report.md").write_text("\n".join(md))
    (out / "report.html").write_text(to_html(title, warnings, notes, tables, shown))
    return summary


def to_html(title: str, warnings: list[str], notes: list[str], tables, plots) -> str:
    e = html.escape
    parts = [f"<!doctype html><meta charset='utf-8'><title>{e(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}.warn{color:#a40}</style>",
             f"<h1>{e(title)}</h1>"]
    parts += [f"<p class='warn'>warning: {e(w)}</p>" for w in warnings] + [f"<p>{e(n)}</p>" for n in notes]
    for name, header, rows in tables:
        parts.append(f"<h2>{e(name)}</h2><table><tr>{''.join(f'<th>{e(h)}</th>' for h in header)}</tr>")
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    parts += [f"<h2>{e(t)}</h2><img src='{e(src)}' alt='{e(t)}'>" for t, src in plots]
    return "\n".join(parts) + "\n"


def default_out(paths: list[str]) -> Path:
    if len(paths) == 1 and Path(paths[0]).is_dir():
        return Path(paths[0]) / "compare"
    return Path("outputs") / "compare" / f"{datetime.now():%Y-%m-%d_%H-%M-%S}"


def smoothing(value: str) -> float:
    """``smooth=`` as a weight in [0, 1)."""
    try:
        weight = float(value)
    except ValueError:
        weight = -1.0
    if not 0 <= weight < 1:
        raise DiffexpError(f"smooth={value}: expected a number from 0 (raw curves) up to, not including, 1")
    return weight


def main(argv: list[str] | None = None) -> None:
    """Read the runs, print what was skipped, the warnings, and where the report went."""
    with report_errors():
        paths, options = parse_args(sys.argv[1:] if argv is None else argv)
        axes = [a for a in options.get("by", "").split(",") if a] or None
        spelled = options.get("status", "finished")
        wanted = parse_statuses(spelled)
        weight = smoothing(options.get("smooth", str(SMOOTH)))
        if options.get("source", "dirs") == "wandb":
            if not options.get("project"):
                raise DiffexpError("source=wandb needs project=ENTITY/PROJECT (and optionally sweep=ID)")
            runs = list(wandb_runs(options["project"], options.get("sweep")))
            out = Path(options.get("out") or default_out([]))
        elif options.get("source", "dirs") != "dirs":
            raise DiffexpError(f"source={options['source']}: expected dirs or wandb")
        else:
            if not paths:
                raise DiffexpError("usage: python -m diffexp.compare RUN_OR_SWEEP_DIR... [by=model,scheduler] "
                                   "[status=finished] [rank=KEY] [smooth=0.9] [out=DIR]")
            runs = list(iter_runs(paths))
            out = Path(options.get("out") or default_out(paths))
        runs, skipped = select_status(runs, wanted, spelled)
        if out.exists() and (out / "summary.json").exists():
            shutil.rmtree(out)  # a previous report of the same runs: replace it whole
        summary = write_report(runs, axes, out, rank=options.get("rank"), weight=weight,
                               notes=[skipped] if skipped else [])
    if skipped:
        print(skipped)
    for w in summary["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    print(f"compared {len(summary['runs'])} runs in {len(summary['groups'])} groups by {','.join(summary['axes'])}, "
          f"ranked by {summary['rank']}: {out / 'report.md'} (and report.html)")


if __name__ == "__main__":
    main()
