"""One run's evaluation sweep as the app shows it: compare's own numbers and plots of it
(``stats.evaluation_summary``, ``render.plot_evaluation_curves``, ``render.sampler_tables``), the plots
written into a folder of the caller's, never into the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffexp.report.render import plot_evaluation_curves, sampler_tables, setting_name
from diffexp.report.stats import evaluation_summary

SWEEP_HINT = "`python -m diffexp.evaluate -m run=RUN_DIR checkpoint=A,B seed=0,1,2` makes one"


@dataclass
class SweepView:
    """What the page shows of a run's evaluate results."""

    line: str  # Markdown: the best setting with its interval over sampling seeds, or that there is none
    plots: list[tuple[str, str]] = field(default_factory=list)  # (PNG file, title), one per setting that varies
    header: list[str] = field(default_factory=list)  # the table of every evaluation setting
    rows: list[list[str]] = field(default_factory=list)
    best: dict[str, Any] | None = None  # the best setting as compare's summary.json holds it (less its group)


def sweep_view(run, name: str, out: Path) -> SweepView:
    """Run ``run``'s evaluate results (eval.json) as ``python -m diffexp.compare RUN_DIR`` reports them: its
    best setting's line (compare's note, word for word), the plots of the lead metric against each numeric
    setting that varies (written into ``out`` as compare names them), the table of every setting (mean ±
    95% CI over sampling seeds) and the best setting's numbers. A run without results is one line."""
    summary = evaluation_summary([run], [()], [], [name])
    if not summary:
        return SweepView(f"No evaluation sweep: no `python -m diffexp.evaluate` results in eval.json ({SWEEP_HINT}).")
    samplers, curves = summary["samplers"], summary["evaluation_curves"]
    out.mkdir(parents=True, exist_ok=True)
    titles = plot_evaluation_curves(curves, out)
    (_, header, rows), _ = sampler_tables(samplers["rows"], [], samplers["metric"], samplers["best"])
    [note], [best] = summary["notes"], samplers["best_setting"]
    n = sum(r["n"] for r in samplers["rows"])
    said = f"**{note}**"  # compare's own line
    if titles:
        line = f"{said} {n} results; quality against {', '.join(setting_name(f) for f in curves['fields'])} below."
    else:
        line = f"{said} No numeric setting varies between its {n} results, so nothing to plot ({SWEEP_HINT})."
    return SweepView(line, [(str(out / f"{k}.png"), t) for k, t in titles.items()], header, rows,
                     {k: v for k, v in best.items() if k != "axes"})
