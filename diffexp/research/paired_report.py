"""``python -m diffexp.research.paired_report RUN_OR_SWEEP_DIR... [by=AXES]``: the coupled-pairs results of
runs (``python -m diffexp.research.paired``) as one Markdown table on stdout.

A row per result, in run order: each metric's ``sampler / reference - 1`` with its 95% bootstrap interval
over the pairs and the verdict at the result's tolerance. Rows carry the runs' values on the ``by`` axes
(default: the config groups whose option differs, as ``compare`` groups them).
"""

from __future__ import annotations

from omegaconf import DictConfig

from diffexp import DiffexpError
from diffexp.config import hydra_command, option_text, report_errors
from diffexp.records.catalog import iter_runs
from diffexp.report.render import fmt, markdown_table
from diffexp.report.stats import run_keys, sampler_label, uncounted, usual_options
from diffexp.research.paired import paired_results

TITLE = ("Against the reference sampler on coupled pairs (python -m diffexp.research.paired; sampler / reference - 1, "
         "95% bootstrap interval over the pairs)")


def verdict(result: dict, column: str) -> str:
    """``+3.1% (-0.4% .. +6.5%): not shown within 5%`` for the result's metric ``column`` (``–`` without it)."""
    d = next((d for k, d in result["metrics"].items() if uncounted(k) == column and "relative" in d), None)
    if d is None:
        return "–"
    said = "within" if d["within_tolerance"] else "not shown within"
    return (f"{100 * d['relative']:+.1f}% ({100 * d['low']:+.1f}% .. {100 * d['high']:+.1f}%): "
            f"{said} {100 * result['tolerance']:g}%")


def paired_table(runs, keys: list[tuple], axes: list[str]) -> tuple[list[dict], tuple | None]:
    """The runs' results (a row each, in run order, with ``axes`` and ``run``) and their table
    (title, header, rows), or None when no run has any."""
    rows = [{"axes": list(key), "run": run.path.name, **r}
            for run, key in zip(runs, keys) for r in paired_results(run)]
    if not rows:
        return [], None
    columns = list(dict.fromkeys(uncounted(k) for r in rows for k, d in r["metrics"].items() if "relative" in d))
    header = [*axes, "run", "sampler", "steps", "against", "pairs", "same class",
              *(f"{c} vs reference" for c in columns)]
    usual = usual_options(rows)
    table = [[*r["axes"], r["run"], sampler_label(r, usual), fmt(r["sampler_steps"]), r["reference"], fmt(r["pairs"]),
              "–" if r.get("same_class") is None else f"{100 * r['same_class']:.1f}%", *(verdict(r, c) for c in columns)]
             for r in rows]
    return rows, (TITLE, header, table)


def report(cfg: DictConfig) -> str:
    """The Markdown table of the results of the runs ``cfg.paths`` names."""
    if not cfg.paths:
        raise DiffexpError("usage: python -m diffexp.research.paired_report RUN_OR_SWEEP_DIR... [by=model,scheduler]")
    runs = list(iter_runs([str(p) for p in cfg.paths]))
    axes, keys = run_keys([r.config() for r in runs], [a for a in option_text(cfg.by).split(",") if a] or None)
    _, table = paired_table(runs, keys, axes)
    if table is None:
        raise DiffexpError(f"no paired results in {len(runs)} runs: make them with python -m diffexp.research.paired "
                           "run=RUN_DIR")
    title, header, rows = table
    return f"## {title}\n\n{markdown_table(header, rows)}"


@hydra_command("paired_report", "paths", lists=("by",))
def main(cfg: DictConfig) -> None:
    with report_errors():
        text = report(cfg)
    print(text, flush=True)


if __name__ == "__main__":
    main()
