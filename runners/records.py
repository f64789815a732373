"""Result records: one JSON file per cell, written atomically (see results/README.md).

A file is a record only when it parses, is an object of a known ``schema`` and ``kind``, and holds
the fields its kind needs; anything else below a records folder is a *problem* that readers name
(file and reason) and otherwise ignore, so that one corrupt file never breaks a run or a report.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUN_SCHEMA = "attnbench.run/1"
EFFICIENCY_SCHEMA = "attnbench.efficiency/1"
SCHEMAS = {"run": RUN_SCHEMA, "efficiency": EFFICIENCY_SCHEMA}
"""The schema of each record kind this version reads and writes."""
STATUSES = {"run": ("ok", "error", "oom", "timeout", "crashed"), "efficiency": ("ok", "oom", "error")}
REQUIRED = {"run": ("key", "cell", "status"), "efficiency": ("cell", "status")}
CELL_FIELDS = {"run": ("task", "attention", "seed"), "efficiency": ("attention", "pattern", "length")}


class RecordError(ValueError):
    """A file that is not a valid record; the message names the file and what is wrong."""


@dataclass(frozen=True)
class RecordProblem:
    """A file below a records folder that is not a valid record, and why."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_record(path: Path, record: dict[str, Any]) -> Path:
    """Write ``record`` as JSON to ``path`` atomically: readers never see a partial file, and
    concurrent writers of different cells on a shared file system never collide. The file gets
    the permissions of an ordinary new file (0666 less the umask), so a group can read it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(record, stream, indent=1, sort_keys=True, default=str)
            stream.write("\n")
            stream.flush()
            os.chmod(temporary, 0o666 & ~_umask())  # mkstemp creates 0600
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def check_record(record: Any, kind: str | None = None) -> str | None:
    """Why ``record`` is not a valid record (of ``kind`` when given), or None when it is."""
    if not isinstance(record, dict):
        return f"not a JSON object ({type(record).__name__})"
    found = record.get("kind")
    if found not in SCHEMAS:
        return f"kind {found!r} is none of {', '.join(SCHEMAS)}"
    if kind is not None and found != kind:
        return f"a {found!r} record where {kind!r} records belong"
    if record.get("schema") != SCHEMAS[found]:
        return f"schema {record.get('schema')!r}; this version reads {SCHEMAS[found]!r}"
    missing = [name for name in REQUIRED[found] if name not in record]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    cell = record["cell"]
    if not isinstance(cell, dict) or any(name not in cell for name in CELL_FIELDS[found]):
        return f"'cell' must be an object with {', '.join(CELL_FIELDS[found])}"
    if record["status"] not in STATUSES[found]:
        return f"status {record['status']!r} is none of {', '.join(STATUSES[found])}"
    if record["status"] == "ok":
        return _check_metrics(record.get("metrics"))
    return None


def _check_metrics(metrics: Any) -> str | None:
    if not isinstance(metrics, dict):
        return "status ok without a 'metrics' object"
    for name, value in metrics.items():
        if isinstance(value, list):
            continue  # an efficiency record's repeats
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return f"status ok but metric {name!r} is {value!r}, not a finite number"
    return None


def load_record(path: Path, kind: str | None = None) -> dict[str, Any]:
    """The record in ``path``; :class:`RecordError` (naming the file and the cause) if it is
    unreadable, not JSON, or not a valid record of ``kind``."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise RecordError(f"{path}: unreadable ({error})") from None
    if not text.strip():
        raise RecordError(f"{path}: empty file")
    try:
        record = json.loads(text)
    except ValueError as error:
        raise RecordError(f"{path}: not valid JSON ({error})") from None
    reason = check_record(record, kind)
    if reason:
        raise RecordError(f"{path}: {reason}")
    return record


def scan_records(
    directory: Path, kind: str | None = None
) -> tuple[list[dict[str, Any]], list[RecordProblem]]:
    """Every valid record below ``directory`` (optionally of one ``kind``), in path order, and
    the problems: every other ``.json`` file there, with the reason it is not a record."""
    records, problems = [], []
    for path in sorted(Path(directory).rglob("*.json")):
        try:
            records.append(load_record(path, kind))
        except RecordError as error:
            problems.append(RecordProblem(path, str(error).removeprefix(f"{path}: ")))
    return records, problems


def read_records(directory: Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The valid records below ``directory`` (see :func:`scan_records`; problems are dropped)."""
    return scan_records(directory, kind)[0]
