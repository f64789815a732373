"""Result records: one JSON file per cell, written atomically (see results/README.md)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_record(path: Path, record: dict[str, Any]) -> Path:
    """Write ``record`` as JSON to ``path`` atomically: readers never see a partial file, and
    concurrent writers of different cells on a shared file system never collide."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(record, stream, indent=1, sort_keys=True, default=str)
            stream.write("\n")
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def read_records(directory: Path, kind: str | None = None) -> list[dict[str, Any]]:
    """Every record below ``directory`` (optionally of one ``kind``), in path order.

    JSON files that are not records (a task's artifacts under ``results/artifacts/``) are
    skipped: a record is an object with a ``schema`` and a ``kind``.
    """
    records = []
    for path in sorted(Path(directory).rglob("*.json")):
        record = json.loads(path.read_text())
        if not (isinstance(record, dict) and "schema" in record and "kind" in record):
            continue
        if kind is None or record.get("kind") == kind:
            records.append(record)
    return records
