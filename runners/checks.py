"""Checks of the command line's inputs that need no task and no torch: numbers, folders, YAML.

Each failure is an :class:`InputError` (or an ``argparse`` type error) whose message names the bad
value and what was expected; ``attnbench`` prints it as one line, without a traceback (``--debug``
shows the traceback).
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

OUTSIDE_ERRORS = (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST)


class InputError(ValueError):
    """A bad input (a value, a file, a folder) named in the message; not a bug of attnbench."""


def integer(minimum: int, meaning: str = "") -> Callable[[str], int]:
    """An ``argparse`` type: an integer of at least ``minimum`` (``meaning`` explains the
    smallest value in the message, e.g. "0: torch's default")."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {minimum}{f' ({meaning})' if meaning else ''}, got {text!r}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


def finite_seconds(value: Any, where: str) -> float | None:
    """A positive finite number of seconds, or None for no limit (``none``/``null``)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if isinstance(value, bool) or not math.isfinite(seconds) or seconds <= 0:
        raise InputError(f"{where}: timeout must be a positive finite number of seconds or none, "
                         f"got {value!r}")
    return seconds


def writable_folder(path: Path, what: str) -> Path:
    """``path`` as a folder this process can write into (created if absent); an
    :class:`InputError` naming it if it is a file, cannot be created, or is not writable."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} {path} is a file, not a folder; give a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".attnbench-write-check-") as probe:
            probe.write(b"\0" * 65536)  # a full disk refuses this
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as error:
        raise InputError(f"{what} {path} is not writable: {error.strerror or error}") from None
    return path


def load_yaml(path: Path) -> Any:
    """The YAML document in ``path``; an :class:`InputError` naming the file, the line and the
    column of a syntax error, or why the file cannot be read."""
    import yaml

    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot be read ({error})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        context = getattr(error, "context", None)
        raise InputError(f"{where}: malformed YAML: {problem}"
                         + (f" ({context})" if context else "")) from None


def is_input_error(error: BaseException) -> bool:
    """Whether ``error`` is a bad input to report in one line (rather than a bug to show)."""
    if isinstance(error, InputError):
        return True
    if isinstance(error, OSError) and error.errno in OUTSIDE_ERRORS:
        return True  # a full disk, a read-only or forbidden folder: the message names the file
    zoo = sys.modules.get("attention_zoo")
    if zoo is not None and isinstance(error, zoo.AttentionConfigError):
        return True
    tasks = sys.modules.get("tasks.base")
    return tasks is not None and isinstance(error, tasks.DatasetUnavailable)
