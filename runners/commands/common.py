"""What every subcommand shares: the results folder, the console, comma-separated values."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from runners.checks import InputError

if TYPE_CHECKING:
    from rich.console import Console


DEFAULT_RESULTS = Path("results")


TERMINAL_WIDTH = 100
"""Tables fit this many columns (fewer on a narrower terminal)."""


def make_console() -> Console:
    """A console whose tables fit :data:`TERMINAL_WIDTH` columns. Lines of text are not broken
    (a path or an error stays one line to copy and to search for; the terminal wraps it)."""
    from rich.console import Console

    # Rich assumes 80 columns when output is not a terminal (logs, CI).
    width = shutil.get_terminal_size((TERMINAL_WIDTH, 24)).columns if sys.stdout.isatty() else TERMINAL_WIDTH
    return Console(width=min(width, TERMINAL_WIDTH), soft_wrap=True)


def comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def pattern_value(name: str) -> str:
    """A pattern's name, checked (an :class:`InputError` names the valid ones)."""
    from attention_zoo import Pattern

    try:
        return Pattern.parse(name).value
    except ValueError as error:
        raise InputError(str(error)) from None


def os_reason(error: BaseException) -> str:
    """An OS or network error in words (urllib wraps the cause in ``reason``)."""
    reason = getattr(error, "reason", None) or getattr(error, "strerror", None) or error
    return f"{type(error).__name__}: {reason}"
