"""Keeping the libraries' chatter out of the terminal: a sweep prints progress and tables.

fairseq, ESPnet, hydra, librosa and torch print warnings, log lines and banners when imported and
while a cell trains. By default (without ``--verbose``):

- each local worker process writes its standard output and error, the file descriptors included
  (so that C++ warnings and subprocesses' output follow), to a log file of its own under
  ``results/logs/workers/``; nothing a library prints is lost, and the terminal keeps the
  coordinator's progress;
- the coordinator imports the tasks (to expand and check the matrix) with the libraries' prints
  captured, their known noisy loggers at ERROR and their warnings ignored.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

NOISY_LIBRARIES = ("fairseq", "fairseq_cli", "espnet", "espnet2", "hydra", "omegaconf", "librosa",
                   "numba", "matplotlib", "torch", "torchaudio", "typeguard", "submitit", "urllib3")
"""Packages whose warnings and log records stay out of the terminal unless ``--verbose``."""

WORKER_LOGS = Path("logs") / "workers"
"""Where each worker's output goes, relative to the results folder."""


def quiet_libraries() -> None:
    """Ignore the :data:`NOISY_LIBRARIES`' warnings and raise their loggers to ERROR, in this
    process (warnings raised by this project's own modules still show)."""
    pattern = r"(" + "|".join(NOISY_LIBRARIES) + r")(\..*)?$"
    warnings.filterwarnings("ignore", module=pattern)
    for name in NOISY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def captured_prints(verbose: bool) -> Iterator[None]:
    """Run the block with Python-level prints to stdout and stderr captured (and dropped), unless
    ``verbose``; for importing libraries that print banners at import time."""
    if verbose:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def redirect_process_output(results_dir: Path, name: str) -> Path:
    """Send this process's standard output and error (file descriptors 1 and 2, so C extensions
    and child processes follow) to ``results_dir/logs/workers/<name>.log``; returns the path."""
    folder = Path(results_dir) / WORKER_LOGS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.log"
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (the process's own fd)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    return path
