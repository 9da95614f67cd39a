"""Read a W&B run back from its local ``run-*.wandb`` record file (offline or online runs alike).

wandb ships no Python reader for these files. The format: a 7-byte header (``:W&B``, a 2-byte
magic, a version byte), then LevelDB-log-style 32 KiB blocks; each chunk has a 7-byte header
(CRC32C, little-endian length, type: full/first/middle/last) and the chunks of one record join to
one ``wandb_internal_pb2.Record`` protobuf. A killed process may leave its last records unwritten;
a truncated tail is ignored.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from wandb.proto import wandb_internal_pb2 as pb

FILE_HEADER = 7
BLOCK = 32 * 1024
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_records(path: str | Path) -> Iterator[pb.Record]:
    """Every record of a ``.wandb`` file, in the order written (a truncated tail is skipped)."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B record file")
    pos, parts = FILE_HEADER, []
    while pos + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK_HEADER:  # block trailer: zero padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        start = pos + CHUNK_HEADER
        if kind == 0 or start + length > len(data):  # zero-filled or unfinished tail
            return
        chunk = data[start:start + length]
        pos = start + length
        if kind == FULL:
            parts = [chunk]
        elif kind == FIRST:
            parts = [chunk]
            continue
        elif kind == MIDDLE:
            parts.append(chunk)
            continue
        else:
            parts.append(chunk)
        record = pb.Record()
        record.ParseFromString(b"".join(parts))
        parts = []
        yield record


def _key(item) -> str:
    return item.nested_key[0] if item.nested_key else item.key


def _put(target: dict[str, Any], item, value: Any) -> None:
    """Set ``value`` at the item's key; a nested key (an image's fields) becomes nested dicts."""
    keys = list(item.nested_key) or [item.key]
    for k in keys[:-1]:
        target = target.setdefault(k, {})
    target[keys[-1]] = value


def _history_value(item) -> Any:
    which = item.WhichOneof("value")
    if which in ("boolean", "integer", "number", "text"):
        return getattr(item, which)
    if which == "none":
        return None
    return json.loads(item.value_json) if item.value_json else None


@dataclass
class RunRecord:
    """What a ``.wandb`` file says about one run."""

    path: Path
    run_id: str = ""
    project: str = ""
    entity: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    resumed: bool = False
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    preempting: bool = False
    exit_code: int | None = None

    def column(self, key: str) -> list[Any]:
        """The logged values of ``key`` in history order (rows without it skipped)."""
        return [row[key] for row in self.history if key in row]


def read_run(path: str | Path) -> RunRecord:
    """Parse one ``run-*.wandb`` file (or the ``offline-run-*``/``run-*`` folder holding one)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.wandb"))
        if not found:
            raise FileNotFoundError(f"{path}: no .wandb file")
        path = found[0]
    run, r = RunRecord(path=path), pb.RunRecord()
    for record in iter_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":  # merged: a later run record's empty fields do not erase what an earlier one set
            r.MergeFrom(record.run)
            run.run_id, run.project, run.entity = r.run_id, r.project, r.entity
            run.name, run.group, run.job_type = r.display_name, r.run_group, r.job_type
            run.tags, run.resumed = list(dict.fromkeys(r.tags)), r.resumed
            for item in record.run.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
            for item in record.config.remove:
                run.config.pop(_key(item), None)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _put(row, item, _history_value(item))
            run.history.append(row)
        elif kind == "summary":
            for item in record.summary.update:
                _put(run.summary, item, json.loads(item.value_json))
            for item in record.summary.remove:
                run.summary.pop(_key(item), None)
        elif kind == "metric":
            m = record.metric
            run.metrics.append({"name": m.name, "glob_name": m.glob_name, "step_metric": m.step_metric})
        elif kind == "files":
            run.files += [f.path for f in record.files.files]
        elif kind == "artifact":
            a = record.artifact
            run.artifacts.append({"name": a.name, "type": a.type, "aliases": list(a.aliases),
                                  "files": [e.path for e in a.manifest.contents]})
        elif kind == "preempting":
            run.preempting = True
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def find_runs(wandb_dir: str | Path) -> list[RunRecord]:
    """Every run under a ``wandb/`` folder (``offline-run-*`` and ``run-*``), oldest first."""
    folders = [p for pattern in ("offline-run-*", "run-*") for p in Path(wandb_dir).glob(pattern)]
    folders = sorted((p for p in folders if p.is_dir() and any(p.glob("*.wandb"))),
                     key=lambda p: p.name.removeprefix("offline-"))
    return [read_run(p) for p in folders]
