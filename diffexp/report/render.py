"""A comparison written out: curves and sample grids as PNG, tables as Markdown and HTML, the summary
as JSON (``write_report``); and the cell formats ``python -m diffexp.runs`` and the app share.

Only presentation lives here; the numbers come from ``diffexp.report.stats``.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from diffexp.records.catalog import metric_goal
from diffexp.report.stats import SCALARS, at_own_count, run_key, smooth, uncounted

ARROW = {"min": "↓", "max": "↑"}


# ---------------------------------------------------------------------------- cells
def fmt(v: Any) -> str:
    """A table cell: ``–`` for nothing, integral floats without a point, others to 4 significant digits."""
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


def heading(column: str) -> str:
    """A column's title: ``best eval/fd_digits_1k ↓`` says which way is better."""
    goal = metric_goal(column.split(" ", 1)[-1])
    return f"{column} {ARROW[goal]}" if goal else column.replace("_", " ")


def label(axes: list[str], values) -> str:
    """``model=unet_tiny, seed=0``."""
    return ", ".join(f"{a}={v}" for a, v in zip(axes, values))


def shown_path(path: str) -> str:
    """``path`` relative to the working directory when it lies below it."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def wall_time(seconds: float | None) -> str:
    """``1h02m``, ``3m05s``, ``12s`` (``–`` when unknown)."""
    if seconds is None:
        return "–"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


# ---------------------------------------------------------------------------- plots
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
    goal = metric_goal(metric)
    ax.set_ylabel(metric + (f" ({'lower' if goal == 'min' else 'higher'} is better)" if goal else "")
                  + (f", smoothed {weight:g}" if weight > 0 else ""))
    if metric == "train/loss":
        ax.set_yscale("log")
    save_plot(fig, ax, path)
    return True


def save_plot(fig, ax, path: Path) -> None:
    """A line plot finished as every plot of the report is (legend, grid) and written as a PNG."""
    import matplotlib.pyplot as plt

    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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


# How the plots name an evaluation setting (a key field of evaluate's results) other than by its field.
SETTING_NAMES = {"checkpoint": "training step (checkpoint)", "ema_std": "post-hoc EMA σ_rel (ema_std)",
                 "sampler_steps": "sampler steps", "guidance_scale": "guidance scale"}


def setting_name(field: str) -> str:
    """What an evaluation setting is, for a plot's axis and title: ``training step (checkpoint)``."""
    return SETTING_NAMES.get(field, field)


def plot_setting_curves(curves: dict[str, list[dict]], metric: str, field: str, path: Path) -> bool:
    """Quality ``metric`` against evaluation setting ``field`` (``stats.evaluation_curves``): one line per
    curve, the mean over sampling seeds with its 95% interval as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, points) in enumerate(curves.items()):
        n = max(p["n"] for p in points)
        ax.errorbar([p["x"] for p in points], [p["mean"] for p in points], color=f"C{i % 10}", marker="o", markersize=4,
                    yerr=[p["ci95"] or 0.0 for p in points], capsize=3, label=f"{name} (seeds: {n})")
    if all(isinstance(p["x"], int) for points in curves.values() for p in points):  # steps: no 2.25 ticks
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    goal = metric_goal(metric)
    ax.set_xlabel(setting_name(field))
    ax.set_ylabel(metric + (f" ({'lower' if goal == 'min' else 'higher'} is better)" if goal else ""))
    save_plot(fig, ax, path)
    return True


# ---------------------------------------------------------------------------- tables
def sampler_cell(row: dict | None, lead: str) -> str:
    """``dpmpp_sde 20 steps (20 NFE, n=6): 1.61 ± 0.2`` for the best-sampler table (n: the results pooled;
    a best of n=1 is one sampling seed's luck as much as the sampler's)."""
    if row is None:
        return "–"
    return f"{row['sampler']} {row['steps']} steps ({fmt(row['nfe'])} NFE, n={row['n']}): {fmt_ci(row.get(lead))}"


def setting_cell(row: dict, field: str) -> str:
    """A sampler row's value of an evaluation setting beyond the sampler's (``model/`` for no checkpoint)."""
    value = row.get("setting", {}).get(field)
    return "model/" if value is None and field == "checkpoint" else fmt(value)


def sampler_tables(rows: list[dict], axes: list[str], lead: str, best: list[dict]) -> list[tuple]:
    """The report's tables of evaluate results: every evaluation setting (checkpoint, sampler, ...), and
    the best sampler per NFE budget."""
    lead_base = uncounted(lead)  # each row shows its metrics at its own sample count (the samples column)
    own = [at_own_count(r) for r in rows]
    # the lead first, then its variants (eval/fd_digits_balanced after eval/fd_digits), then the rest by name
    columns = [lead_base, *sorted({k for values in own for k in values if k != lead_base},
                                  key=lambda k: (not k.startswith(lead_base), k))]
    settings = list(dict.fromkeys(k for r in rows for k in r.get("setting", {})))
    header = [*axes, *settings, "sampler", "steps", "NFE", "samples", "guidance", "n", *map(heading, columns)]
    table = [[*r["axes"], *(setting_cell(r, k) for k in settings), r["sampler"], fmt(r["steps"]), fmt(r["nfe"]),
              fmt(r["num_samples"]), fmt(r["guidance_scale"]), str(r["n"]), *(fmt_ci(values.get(c), r["n"]) for c in columns)]
             for r, values in zip(rows, own)]
    limits = [k for k in best[0] if k != "axes"]
    best_header = [*axes, *(f"best at {k.replace('nfe<=', 'NFE ≤ ')}" if k != "any" else "best at any NFE"
                            for k in limits)]
    best_table = [[*b["axes"], *(sampler_cell(b[k], lead) for k in limits)] for b in best]
    title = (f"Samplers (python -m diffexp.evaluate results in eval.json; mean ± 95% CI over runs and sampling "
             f"seeds, at each row's sample count; best {lead} first)")
    return [(title, header, table),
            (f"Best sampler per group by {heading(lead)} within a network-evaluation budget", best_header, best_table)]


def comparison_tables(summary: dict, lead: str | None) -> list[tuple]:
    """(title, header, rows) of every table of the report: groups, quality per group, runs, samplers."""
    axes, groups = summary["axes"], summary["groups"]
    # The tables lead with one quality metric; every quality metric's final value has its own table.
    headline = [f"best {lead}", f"final {lead}"] if lead else []
    quality = sorted({c for s in summary["runs"] for c in s if c.startswith("final eval/")})
    lineage = any(s.get("parent") for s in summary["runs"])  # runs started with init_from: PARENT@STEP
    run_header = ["run", *axes, "seed", "status", "parameters", "steps", "wall time (s)", "images/s", "final loss",
                  *map(heading, headline), *(["parent"] if lineage else [])]
    run_rows = [[s["name"], *(fmt(s["axes"][a]) for a in axes), fmt(s["seed"]), s["status"],
                 fmt(s["num_parameters"]), fmt(s["steps"]), fmt(s["wall_time_s"]), fmt(s["img_per_s"]),
                 fmt(s["final_loss"]), *(fmt(s.get(c)) for c in headline),
                 *([s.get("parent") or "–"] if lineage else [])] for s in summary["runs"]]
    group_cols = [c for c in (*SCALARS, *headline)
                  if any(c in g for g in groups)]
    group_header = ["rank", *axes, "n", *map(heading, group_cols)]
    group_table = [[fmt(g["rank"]), *g["axes"], str(g["n"]), *(fmt_ci(g.get(c), g["n"]) for c in group_cols)]
                   for g in groups]
    tables = [("Groups (mean ± 95% CI over runs, Student t)", group_header, group_table)]
    if len(quality) > 1:
        tables.append(("Quality metrics per group (final value, mean ± 95% CI)", [*axes, "n", *map(heading, quality)],
                       [[*g["axes"], str(g["n"]), *(fmt_ci(g.get(c), g["n"]) for c in quality)] for g in groups]))
    tables.append(("Runs", run_header, run_rows))
    if "samplers" in summary:
        samplers = summary["samplers"]
        tables += sampler_tables(samplers["rows"], axes, samplers["metric"], samplers["best"])
    return tables


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def to_markdown(title: str, warnings: list[str], notes: list[str], tables, plots) -> str:
    """The report as Markdown: title, warnings and notes, tables, then plots."""
    md = [f"# {title}", ""]
    md += [f"> warning: {w}" for w in warnings] + [f"> {n}" for n in notes] + [""]
    for name, header, rows in tables:
        md += [f"## {name}", "", markdown_table(header, rows), ""]
    for name, src in plots:
        md += [f"## {name}", "", f"![{name}]({src})", ""]
    return "\n".join(md)


def to_html(title: str, warnings: list[str], notes: list[str], tables, plots) -> str:
    """The report as one HTML page (the plots as images beside it)."""
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


# Every file ``write_report`` may write: what a folder of compare's own holds (``compare.check_out``),
# and the pattern of its plots against evaluation settings (``eval_vs_checkpoint.png``, ...).
REPORT_FILES = ("report.md", "report.html", "summary.json", "loss.png", "quality.png", "grids.png")
SETTING_PLOTS = "eval_vs_{}.png"


def is_report_file(name: str) -> bool:
    """Whether ``name`` is a file ``write_report`` writes."""
    prefix, suffix = SETTING_PLOTS.split("{}")
    return name in REPORT_FILES or (name.startswith(prefix) and name.endswith(suffix))


def plot_evaluation_curves(curves: dict | None, out: Path) -> dict[str, str]:
    """Quality against each evaluation setting that varies (``curves``: ``stats.evaluation_summary``'s
    ``evaluation_curves``, or None), one PNG per setting in ``out`` (``eval_vs_checkpoint.png``, ...);
    returns {plot name (the file without .png): title}, in the order of the settings."""
    titles = {}
    for field, lines in (curves or {"fields": {}})["fields"].items():
        name = SETTING_PLOTS.format(field).removesuffix(".png")
        if plot_setting_curves(lines, curves["metric"], field, out / f"{name}.png"):
            titles[name] = (f"{curves['metric']} against {setting_name(field)} (evaluate results; mean ± 95% CI "
                            "over sampling seeds)")
    return titles


def write_report(summary: dict[str, Any], runs: list, out: Path) -> dict[str, Any]:
    """Write ``summary`` (``stats.compare_runs``; ``runs`` in its order) into ``out``: the plots,
    ``summary.json`` (with the plots' names added), ``report.md`` and ``report.html``; returns the summary."""
    axes, weight = summary["axes"], summary["smooth"]
    keys = [run_key(summary, s) for s in summary["runs"]]
    lead = summary["rank"] if summary["rank"] != "train/loss" else summary["primary_quality"]
    out.mkdir(parents=True, exist_ok=True)
    curves = {"loss": ("train/loss", weight), "quality": (lead, 0.0)}
    plots = {name: bool(metric) and plot_curves(runs, keys, axes, metric, out / f"{name}.png", w)
             for name, (metric, w) in curves.items()}
    titles = plot_grids(runs, [f"{label(axes, k)}, seed {s['seed']}" for k, s in zip(keys, summary["runs"])],
                        out / "grids.png")
    plots["grids"] = bool(titles)
    by_setting = plot_evaluation_curves(summary.get("evaluation_curves"), out)
    plots.update(dict.fromkeys(by_setting, True))
    summary = {**summary, "grid_titles": titles, "plots": [f"{k}.png" for k, ok in plots.items() if ok]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")

    titles_of = {"loss": "Training loss" + (f" (smoothed {weight:g}; faint: raw)" if weight > 0 else ""),
                 "quality": f"Sample quality: {lead}", "grids": "Last sample grids", **by_setting}
    shown = [(titles_of[k], f"{k}.png") for k, ok in plots.items() if ok]
    tables = comparison_tables(summary, lead)
    title = f"Comparison of {len(runs)} runs by {', '.join(axes)}"
    (out / "report.md").write_text(to_markdown(title, summary["warnings"], summary["notes"], tables, shown))
    (out / "report.html").write_text(to_html(title, summary["warnings"], summary["notes"], tables, shown))
    return summary
