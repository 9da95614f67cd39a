"""``python -m diffexp.runs [PATH...] [status=...] [remove=failed,empty [yes=true]]``: list runs, tidy up.

Lists every run directory at or below the paths (default ``outputs/``): path, name, status, steps,
wall time, final loss and the best value of the quality metric most runs logged. ``status=`` keeps
some statuses (``finished``, ``interrupted``, ``failed``, ``running``, ``empty``: a folder of an
attempt refused before it started). ``remove=failed``, ``remove=empty`` or both list what would
be deleted; with ``yes=true`` it is deleted. Finished, interrupted and running runs are never removed.
A Hydra app (``conf/runs.yaml``): ``--cfg job`` shows the options, the paths typed first become ``paths``.
"""

from __future__ import annotations

import shutil

from omegaconf import DictConfig

from diffexp import DiffexpError
from diffexp.config import hydra_command, option_text, report_errors
from diffexp.records.catalog import STATUSES, iter_runs, primary_quality, run_status, summarize
from diffexp.records.rundir import RunDir
from diffexp.report.render import fmt, heading, shown_path, wall_time
from diffexp.report.stats import counted, parse_statuses

REMOVABLE = ("failed", "empty")


def table(summaries: list[dict]) -> str:
    """The runs as aligned text columns, led by the quality metric most of them logged (and the parent
    of runs started with init_from, when there are any)."""
    primary = primary_quality([{k[len("best "):] for k in s if k.startswith("best eval/")} for s in summaries])
    header = ["path", "name", "status", "steps", "wall time", "final loss"]
    header += [heading(f"best {primary}")] if primary else []
    lineage = any(s.get("parent") for s in summaries)  # runs started with init_from: PARENT@STEP
    header += ["parent"] if lineage else []
    rows = [[shown_path(s["run"]), s["name"] or "–", s["status"], fmt(s["steps"]), wall_time(s["wall_time_s"]),
             fmt(s["final_loss"]), *([fmt(s.get(f"best {primary}"))] if primary else []),
             *([s.get("parent") or "–"] if lineage else [])] for s in summaries]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def remove(summaries: list[dict], confirmed: bool) -> None:
    """Delete the listed runs if ``confirmed``, else say what would go. Each run's status is read
    again first: only a run that is still failed or empty is deleted."""
    if not summaries:
        print("nothing to remove")
        return
    what = f"{len(summaries)} run{'s' * (len(summaries) != 1)} ({counted(s['status'] for s in summaries)})"
    if not confirmed:
        print(f"would remove {what}; pass yes=true to delete them")
        return
    for s in summaries:
        now = run_status(RunDir(s["run"]))
        if now not in REMOVABLE:
            raise DiffexpError(f"{s['run']}: its status is now {now}; kept, and nothing after it removed")
        shutil.rmtree(s["run"])
    print(f"removed {what}")


@hydra_command("runs", "paths", lists=("status", "remove"))
def main(cfg: DictConfig) -> None:
    """List the runs, then remove the failed or empty ones when asked to."""
    with report_errors():
        wanted = parse_statuses(option_text(cfg.status))
        removing = parse_removable(option_text(cfg.remove)) if cfg.remove is not None else None
        confirmed = cfg["yes"]
        if not isinstance(confirmed, bool):
            raise DiffexpError(f"yes={confirmed}: expected true or false")
        if confirmed and removing is None:
            raise DiffexpError("yes=true confirms a removal: give remove=failed, remove=empty or remove=failed,empty")
        summaries = [summarize(r) for r in iter_runs([str(p) for p in cfg.paths], empty=True)]
        listed = [s for s in summaries if s["status"] in (removing or wanted)]
        print(table(listed) if listed else "no runs with status " + ",".join(sorted(removing or wanted)))
        everything = f"{len(summaries)} runs: {counted(s['status'] for s in summaries)}"
        print(everything if len(listed) == len(summaries) else f"{len(listed)} shown of {everything}")
        if removing is not None:
            remove(listed, confirmed)


def parse_removable(value: str) -> set[str]:
    """``remove=failed,empty`` as a set; finished, interrupted and running runs cannot be named."""
    wanted = parse_statuses(value)
    kept = sorted(wanted - set(REMOVABLE), key=STATUSES.index)
    if kept:
        raise DiffexpError(f"remove={value}: only failed and empty runs can be removed "
                           f"({', '.join(kept)} runs are kept)")
    return wanted


if __name__ == "__main__":
    main()
