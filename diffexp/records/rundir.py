"""Run records: the one place that writes and reads a run directory.

Layout (see README): ``config.yaml`` (resolved config), ``run.json`` (provenance and status),
``metrics.jsonl`` (one row per logged step), ``samples/step_XXXXXXX.png``,
``checkpoints/step_XXXXXXX/`` (accelerate state), ``model/`` (diffusers pipeline, EMA weights),
``wandb/`` and Hydra's ``.hydra/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import urllib.parse
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf

from diffexp import DiffexpError, first_line

PACKAGES = ("diffexp", "torch", "diffusers", "accelerate", "hydra-core", "omegaconf", "wandb", "torchmetrics",
            "torch-fidelity", "datasets", "numpy", "scikit-learn")
STEP_DIR = "step_{:07d}"
STEP_DIR_RE = re.compile(r"step_(\d{7})")
MANIFEST = "manifest.json"  # a checkpoint's file list (sizes, sha256), written last: its seal of completeness
log = logging.getLogger(__name__)
# Classes that configs saved before diffexp's stage folders name by their old module (``_target_``).
MOVED_TARGETS = {"diffexp.data.": "diffexp.data.datasets.", "diffexp.schedulers.": "diffexp.sampling.schedulers."}


def step_of(path: str | os.PathLike) -> int:
    """The training step a ``step_XXXXXXX`` checkpoint folder or sample grid belongs to."""
    found = STEP_DIR_RE.fullmatch(Path(path).stem)
    if not found:
        raise DiffexpError(f"{path}: not a step_XXXXXXX checkpoint or sample grid")
    return int(found.group(1))


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(path: Path | None = None) -> dict[str, Any]:
    """Commit and dirty flag (tracked files only) of the git checkout holding ``path``."""
    cwd = str(path or Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True,
                                text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(status.strip())}


def replace_path(tmp: Path, final: Path) -> None:
    """Put the finished file or folder ``tmp`` at ``final`` in one rename. An existing ``final``
    folder (which a rename cannot overwrite) is first moved to a hidden side name, removed after;
    ``RunDir.checkpoints`` puts such a side folder back if a crash came between the two renames."""
    if tmp.is_dir() and final.exists():
        side = final.with_name(f".{final.name}.old")
        shutil.rmtree(side, ignore_errors=True)
        os.replace(final, side)
        os.replace(tmp, final)
        shutil.rmtree(side, ignore_errors=True)
    else:
        os.replace(tmp, final)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``final`` to write a file or folder into; when the block ends
    without an error it replaces ``final`` at once (readers see the old or the new one, never a
    half-written one), and after an error it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    try:
        yield tmp
        replace_path(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file (read in blocks): checkpoint manifests, feature-network weights in cache keys."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """Seal a checkpoint folder whose files are all written: ``manifest.json`` lists each file's size and
    sha256, and is written last (``checkpoint_damage`` checks a folder against it)."""
    files = {str(f.relative_to(folder)): {"size": f.stat().st_size, "sha256": file_sha256(f)}
             for f in sorted(folder.rglob("*")) if f.is_file() and f.name != MANIFEST}
    write_json_atomic(folder / MANIFEST, {"files": files})


def checkpoint_damage(folder: Path, *, checksums: bool = False) -> str | None:
    """Why checkpoint ``folder`` cannot be used (a file missing, cut short or, with ``checksums``,
    changed since its manifest was written; an unreadable manifest), or None when it is complete.
    Checkpoints of diffexp before manifests have none and are trusted: they were renamed into place whole."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, OSError):
        return f"{MANIFEST} cannot be read"
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["size"]:
            return f"{name} is {path.stat().st_size} bytes, its manifest says {want['size']}"
        if checksums and file_sha256(path) != want["sha256"]:
            return f"{name} differs from its manifest (sha256)"
    return None


_WARNED: set[str] = set()


def _warn_damaged(folder: Path, why: str) -> None:
    if str(folder) not in _WARNED:  # once per folder and process
        _WARNED.add(str(folder))
        log.warning("checkpoint %s is damaged (%s): skipped", folder, why)


def reachable(url: str, timeout: float = 3.0) -> str | None:
    """None when a TCP connection to ``url``'s host opens within ``timeout`` seconds, else why not."""
    parsed = urllib.parse.urlparse(url)
    try:
        socket.create_connection((parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return None
    except OSError as e:
        return f"{parsed.hostname}: {e.strerror or first_line(e)}"


def retarget_file_logs(old: Path, new: Path) -> None:
    """Logging handlers that write to ``old`` go on writing to ``new`` (appending)."""
    import logging

    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for handler in {h for lg in loggers for h in lg.handlers}:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename) == old.resolve():
            handler.acquire()
            try:
                handler.close()
                handler.baseFilename, handler.mode = str(new.resolve()), "a"
                handler.stream = handler._open()
            finally:
                handler.release()


class RunDir:
    """A run directory: paths, writers used by training, readers used by every other CLI."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser().resolve()

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # --- paths
    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def info_file(self) -> Path:
        return self.path / "run.json"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def samples_dir(self) -> Path:
        return self.path / "samples"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def eval_file(self) -> Path:
        return self.path / "eval.json"

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints_dir / STEP_DIR.format(step)

    def sample_grid_file(self, step: int) -> Path:
        return self.samples_dir / (STEP_DIR.format(step) + ".png")

    # --- readers
    def exists(self) -> bool:
        return self.config_file.is_file()

    def require(self) -> "RunDir":
        """Self, or a DiffexpError when this is not a run directory."""
        if not self.exists():
            raise DiffexpError(f"run={self.path}: not a diffexp run directory (no config.yaml)")
        return self

    def config(self) -> DictConfig:
        """The run's saved config (``_target_``s of moved classes renamed, see MOVED_TARGETS); a one-line
        DiffexpError when it cannot be read."""
        try:
            text = self.require().config_file.read_text()
            for old, new in MOVED_TARGETS.items():
                text = re.sub(rf"(_target_: ){re.escape(old)}(?=\w+\s*$)", rf"\g<1>{new}", text, flags=re.M)
            return OmegaConf.create(text)
        except DiffexpError:
            raise
        except Exception as e:  # noqa: BLE001 - a corrupt YAML file raises the parser's own errors
            raise DiffexpError(f"{self.config_file}: cannot be read as a saved config ({type(e).__name__})") from None

    def require_model(self) -> Path:
        """The run's exported ``model/`` folder, or a DiffexpError while there is none."""
        if not self.require().model_dir.is_dir():
            raise DiffexpError(f"run={self.path}: no model/ yet (the run has not finished); "
                               f"finish it with python -m diffexp.train resume={self.path}")
        return self.model_dir

    def info(self) -> dict[str, Any]:
        if not self.info_file.exists():
            return {}
        try:
            return json.loads(self.info_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DiffexpError(f"{self.info_file}: cannot be read as JSON ({type(e).__name__})") from None

    def eval_results(self) -> list[dict[str, Any]]:
        """The results ``diffexp.evaluate`` recorded in eval.json (one per metric, sample count, sampler,
        steps and seed); an eval.json of diffexp 0.1 holds one result."""
        if not self.eval_file.is_file():
            return []
        data = json.loads(self.eval_file.read_text())
        return data["results"] if "results" in data else [data]

    def metrics(self) -> list[dict[str, Any]]:
        """The rows of metrics.jsonl; a last line cut short by a killed process is left out."""
        if not self.metrics_file.exists():
            return []
        rows = []
        lines = [line for line in self.metrics_file.read_text().splitlines() if line.strip()]
        for i, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if i < len(lines) - 1:
                    raise DiffexpError(f"{self.metrics_file}: line {i + 1} is not JSON") from None
        return rows

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first: ``step_XXXXXXX`` folders only (temporary and side
        folders of an interrupted write are never listed), whose files have the sizes their manifest
        lists (a damaged one is skipped with one warning line naming it). A checkpoint that a crash left under its
        side name during a swap (see ``replace_path``) is put back first, and a side folder whose
        swap finished is removed."""
        if not self.checkpoints_dir.is_dir():
            return []
        for side in [*self.checkpoints_dir.glob(".step_*.old"), *self.checkpoints_dir.glob("step_*.old")]:
            final = side.with_name(side.name.lstrip(".").removesuffix(".old"))  # "step_*.old": diffexp 0.1's side name
            if not STEP_DIR_RE.fullmatch(final.name):
                continue
            if final.exists():  # the swap finished: the side folder is a leftover
                shutil.rmtree(side, ignore_errors=True)
            else:
                os.replace(side, final)
        found = sorted(p for p in self.checkpoints_dir.iterdir() if p.is_dir() and STEP_DIR_RE.fullmatch(p.name))
        complete = []
        for folder in found:
            why = checkpoint_damage(folder)
            if why:
                _warn_damaged(folder, why)
            else:
                complete.append(folder)
        return complete

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint whose files also match their manifest's checksums (what a
        resume loads); newer damaged ones are skipped with a warning line each."""
        for folder in reversed(self.checkpoints()):
            why = checkpoint_damage(folder, checksums=True)
            if not why:
                return folder
            _warn_damaged(folder, why)
        return None

    def find_checkpoint(self, which: int | str | None = "last") -> Path:
        """The complete checkpoint of step ``which`` (an integer or its digits), or the newest one for
        ``last`` (or None); a one-line DiffexpError naming ``checkpoint=`` and the available steps otherwise."""
        found = {step_of(c): c for c in self.checkpoints()}
        if which in (None, "last") and found:
            return found[max(found)]
        if str(which).isdigit() and int(which) in found:
            return found[int(which)]
        available = ", ".join(map(str, sorted(found))) or "none"
        raise DiffexpError(f"checkpoint={which}: {self.path} has no such complete checkpoint (steps: {available})")

    def sample_grids(self) -> list[Path]:
        return sorted(self.samples_dir.glob("step_*.png")) if self.samples_dir.is_dir() else []

    # --- writers (main process only)
    def adopt_session(self, session: Path, *, resumed: bool) -> None:
        """Take over what Hydra recorded of this command in its scratch folder ``session``: its
        ``.hydra/`` (a resume's goes to ``.hydra/resume_TIME/``, beside the run's own) and its log,
        which is appended to the run's and goes on there."""
        session = Path(session)
        target = self.path / ".hydra"
        if resumed:
            target = target / f"resume_{datetime.now():%Y-%m-%d_%H-%M-%S}"
        if (session / ".hydra").is_dir():
            shutil.copytree(session / ".hydra", target, dirs_exist_ok=True)
        for log_file in session.glob("*.log"):
            dest = self.path / log_file.name
            with open(dest, "a") as out:
                out.write(log_file.read_text())
            retarget_file_logs(log_file, dest)


    def write_config(self, cfg: DictConfig) -> None:
        with atomic_path(self.config_file) as tmp:  # resume, reproduce and compare read it
            OmegaConf.save(cfg, tmp, resolve=True)

    def start(self, cfg: DictConfig, *, num_processes: int, resumed: bool, extra: dict[str, Any] | None = None,
              resume_note: dict[str, Any] | None = None) -> None:
        """Write run.json at the start of a run, or note the resume in its ``resumes`` list (with
        ``resume_note``'s fields, e.g. ``{"step": 4, "max_steps": [4, 6]}`` for an extension)."""
        info = self.info() if resumed else {}
        if resumed:
            info.setdefault("resumes", []).append({"at": now(), "command": sys.orig_argv, "git": git_state(),
                                                   **(resume_note or {})})
        else:
            info.update(
                git=git_state(),
                packages=package_versions(),
                command=sys.orig_argv,
                cwd=os.getcwd(),
                seed=cfg.seed,
                host=socket.gethostname(),
                platform=platform.platform(),
                python=sys.version.split()[0],
                start=now(),
            )
        info.update(num_processes=num_processes, status="running", end=None, **(extra or {}))
        write_json_atomic(self.info_file, info)

    def update_info(self, **fields: Any) -> None:
        info = self.info()
        info.update(fields)
        write_json_atomic(self.info_file, info)

    def finish(self, status: str) -> None:
        self.update_info(status=status, end=now())

    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics_file.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_metrics(self, after_step: int) -> None:
        """Drop rows logged after ``after_step`` (a resumed run replays those steps)."""
        rows = [r for r in self.metrics() if r.get("step", 0) <= after_step]
        with atomic_path(self.metrics_file) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def prune_checkpoints(self, keep: int) -> None:
        """Remove all but the newest ``keep`` complete checkpoints (damaged ones are neither counted nor
        removed, so the newest complete checkpoint always stays)."""
        for old in self.checkpoints()[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)


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
                 "classmix": "min"}
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
    A quality name not in QUALITY_GOALS counts as a distance (lower is better)."""
    if not key.startswith("eval/") or key == "eval/seconds" or "_std" in key:
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
