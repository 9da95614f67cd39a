"""``python -m diffexp.compare RUN_DIR_OR_SWEEP_DIR... [by=AXES] [status=finished] [rank=KEY] [smooth=0.9] [out=DIR]``.

Writes ``report.md``, ``report.html``, ``summary.json`` and PNG plots (loss and quality curves per
group, the last sample grid of every run) into ``out`` (default: ``compare/`` inside the one
folder given, else ``outputs/compare/DATE_TIME``), a folder of its own: an ``out`` that holds runs
or other files is refused in one line, and an earlier report there is replaced whole, at once. Only finished runs are compared unless
``status=`` says otherwise; one line says what was left out. Rows are grouped by the ``by`` axes (a
config group such as ``model``, or any config key such as ``scheduler.prediction_type``; default:
the groups whose option differs, with an offline random sweep's ``sweep_trial`` spelled out as the
values it drew); each group gets mean ± 95% confidence interval over its runs (Student t), and the
groups are ranked by a sample-quality metric when the runs logged one, else by the final loss.
Runs that differ in anything else (dataset, steps, metric sample count, ...) are reported, and so
is a ranking by loss across prediction types or objectives, whose losses measure different things.

``source=wandb project=ENTITY/PROJECT [sweep=ID]`` reads the runs from W&B instead, when W&B is
reachable. A Hydra app (``conf/compare.yaml``): ``--cfg job`` shows the options, the paths typed
first become ``paths``. The numbers come from ``diffexp.report.stats``, the files from
``diffexp.report.render``.
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig

from diffexp import DiffexpError
from diffexp.config import hydra_command, option_text, report_errors
from diffexp.records.catalog import iter_runs, run_dirs, wandb_runs
from diffexp.records.rundir import atomic_path
from diffexp.report.render import is_report_file, write_report
from diffexp.report.stats import compare_runs, parse_statuses, select_status, smoothing

USAGE = ("usage: python -m diffexp.compare RUN_OR_SWEEP_DIR... [by=model,scheduler] [status=finished] [rank=KEY] "
         "[smooth=0.9] [out=DIR]")


def default_out(paths: list[str]) -> Path:
    """``compare/`` inside the one folder compared, else ``outputs/compare/DATE_TIME``."""
    if len(paths) == 1 and Path(paths[0]).is_dir():
        return Path(paths[0]) / "compare"
    return Path("outputs") / "compare" / f"{datetime.now():%Y-%m-%d_%H-%M-%S}"


def read_runs(cfg: DictConfig) -> tuple[list, Path]:
    """(the runs ``cfg`` names, from run directories or W&B; the report folder)."""
    if cfg.source == "wandb":
        if not cfg.project:
            raise DiffexpError("source=wandb needs project=ENTITY/PROJECT (and optionally sweep=ID)")
        return list(wandb_runs(str(cfg.project), cfg.sweep)), Path(str(cfg.out or default_out([])))
    if cfg.source != "dirs":
        raise DiffexpError(f"source={cfg.source}: expected dirs or wandb")
    paths = [str(p) for p in cfg.paths]
    if not paths:
        raise DiffexpError(USAGE)
    return list(iter_runs(paths)), Path(str(cfg.out or default_out(paths)))


def check_out(out: Path) -> None:
    """Refuse, in one line and before any work, a report folder that holds anything but an earlier
    report of compare's own (``render.is_report_file``): compare replaces its own files only, never a run or
    a user's file."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DiffexpError(f"out={out}: is a file; compare writes its report into a folder of its own")
    if run_dirs(out, empty=True):
        raise DiffexpError(f"out={out}: holds runs; compare writes its report into a folder of its own "
                           f"(e.g. out={out / 'compare'})")
    foreign = sorted(p.name + "/" * p.is_dir() for p in out.iterdir() if not is_report_file(p.name) or not p.is_file())
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise DiffexpError(f"out={out}: holds files compare did not write ({shown}); choose a new or empty folder")


def compare(cfg: DictConfig) -> tuple[dict, Path, str | None]:
    """Compare the runs ``cfg`` names and write the report; (its summary, its folder, the line saying
    which runs were skipped for their status, or None)."""
    axes = [a for a in option_text(cfg.by).split(",") if a] or None
    status = option_text(cfg.status)
    wanted = parse_statuses(status)
    weight = smoothing(cfg.smooth)
    runs, out = read_runs(cfg)
    check_out(out)
    runs, skipped = select_status(runs, wanted, status)
    rank = None if cfg.rank is None else str(cfg.rank)
    summary, ordered = compare_runs(runs, axes, rank=rank, weight=weight, notes=[skipped] if skipped else [])
    with atomic_path(out) as tmp:  # an earlier report (nothing else, see check_out) is replaced whole, at once
        summary = write_report(summary, ordered, tmp)
    return summary, out, skipped


@hydra_command("compare", "paths", lists=("by", "status"), paths=("out",))
def main(cfg: DictConfig) -> None:
    """Read the runs, print what was skipped, the warnings, and where the report went."""
    with report_errors():
        summary, out, skipped = compare(cfg)
    if skipped:
        print(skipped)
    for w in summary["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    print(f"compared {len(summary['runs'])} runs in {len(summary['groups'])} groups by {','.join(summary['axes'])}, "
          f"ranked by {summary['rank']}: {out / 'report.md'} (and report.html)")


if __name__ == "__main__":
    main()
