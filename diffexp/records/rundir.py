"""Run records: the one place that writes and reads a run directory.

Layout (see README): ``config.yaml`` (resolved config), ``run.json`` (provenance and status),
``metrics.jsonl`` (one row per logged step), ``samples/step_XXXXXXX.png``,
``checkpoints/step_XXXXXXX/`` (accelerate state), ``model/`` (diffusers pipeline, EMA weights),
``wandb/`` and Hydra's ``.hydra/``.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
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
from functools import lru_cache
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


@lru_cache(maxsize=64)
def _parsed_config(text: str) -> DictConfig:
    """A saved config's text parsed (moved targets renamed), once per distinct text: the commands and the
    app read the same run's config many times, and parsing it costs a copy's four times. Keyed by the
    text, so a changed file is parsed again; callers get a copy."""
    for old, new in MOVED_TARGETS.items():
        text = re.sub(rf"(_target_: ){re.escape(old)}(?=\w+\s*$)", rf"\g<1>{new}", text, flags=re.M)
    return OmegaConf.create(text)


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
            return copy.deepcopy(_parsed_config(self.require().config_file.read_text()))
        except DiffexpError:
            raise
        except Exception as e:  # noqa: BLE001 - a corrupt YAML file raises the parser's own errors
            raise DiffexpError(f"{self.config_file}: cannot be read as a saved config ({type(e).__name__})") from None

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

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive use of the run's result files (several evaluations may run at once under a launcher)."""
        with open(self.path / ".eval.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    @contextlib.contextmanager
    def training_lock(self) -> Iterator[None]:
        """This command's exclusive hold on the run (``.train.lock``, held until the context ends; the
        folder is made if needed). Another command training the same run is refused in one line."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".train.lock", "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip() or "another process"
                raise DiffexpError(f"{self.path}: another command is training this run ({holder}); one run "
                                   "directory takes one launch at a time") from None
            lock.truncate(0)
            lock.write(f"pid {os.getpid()} on {socket.gethostname()}")
            lock.flush()
            yield

    def keep_result(self, file: Path, result: dict[str, Any], fields: tuple[str, ...], *,
                    ordered: bool = True) -> list[dict[str, Any]]:
        """Add ``result`` to the results file ``file`` (``{"results": [...]}``: ``eval.json``, a study's),
        replacing the one that is the same measurement (equal ``fields``; never two of one); the results
        sorted by those fields (``ordered``) or in the order they came. Returns them all."""
        def key(r: dict[str, Any]) -> str:
            return json.dumps([r.get(k) for k in fields], sort_keys=True, default=str)

        with self.locked():
            old = json.loads(file.read_text()) if file.is_file() else {"results": []}
            results = [r for r in old.get("results", [old]) if key(r) != key(result)] + [result]
            if ordered:
                results.sort(key=key)
            write_json_atomic(file, {"results": results})
        return results

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
        ``last`` (or None), its files checked against their manifest's checksums; a one-line DiffexpError
        naming ``checkpoint=`` and the available steps otherwise."""
        found = {step_of(c): c for c in self.checkpoints()}
        if which in (None, "last") and found:
            newest = self.latest_checkpoint()  # checksums too, as for a resume
            if newest is not None:
                return newest
        if str(which).isdigit() and int(which) in found:
            why = checkpoint_damage(found[int(which)], checksums=True)
            if not why:
                return found[int(which)]
            _warn_damaged(found[int(which)], why)
            del found[int(which)]
        available = ", ".join(map(str, sorted(found))) or "none"
        raise DiffexpError(f"checkpoint={which}: {self.path} has no such complete checkpoint (steps: {available})")

    def last_recorded_step(self) -> int:
        """The last training step the run recorded (a metrics row or a sample grid), and so logged to its
        tracker: after a crash, the steps past its newest checkpoint that a resume replays."""
        return max([r.get("step", 0) for r in self.metrics()] + [step_of(g) for g in self.sample_grids()], default=0)

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
            stopped_by = info.pop("stopped_by", None)  # what stopped the run before: kept with this resume
            info.setdefault("resumes", []).append({"at": now(), "command": sys.orig_argv, "git": git_state(),
                                                   **(resume_note or {}),
                                                   **({"stopped_by": stopped_by} if stopped_by else {})})
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

    def finish(self, status: str, **fields: Any) -> None:
        self.update_info(status=status, end=now(), **fields)

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
