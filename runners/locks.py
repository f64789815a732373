"""Who is computing a cell: one lock file per cell, so that two runs on one results folder never
compute the same cell, and a worker orphaned by a dead coordinator dies with it.

A cell's lock is an advisory ``flock`` on ``results/.locks/<cell key>.lock``, held by the process
that runs the cell for as long as it runs; the kernel releases it when that process ends, however
it ends, so a lock never outlives its run. The file holds a line naming the run that holds it
(pid, host, start time, command), which the message to a second run quotes.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shlex
import signal
import socket
import sys
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1


def lock_path(results_dir: Path, key: str) -> Path:
    return Path(results_dir) / ".locks" / f"{key}.lock"


def describe_this_run() -> str:
    """``pid 123 on host, started 2026-01-01T10:00:00Z: attnbench run smoke``."""
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    command = shlex.join(["attnbench", *sys.argv[1:]]) if sys.argv else "attnbench"
    return f"pid {os.getpid()} on {socket.gethostname()}, started {started}: {command}"


class CellLock:
    """The lock of one cell: :meth:`acquire` (without waiting) and :meth:`release`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self, owner: str) -> bool:
        """Take the lock and write ``owner`` into it; False (at once) if another process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd, writable = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666), True
        except PermissionError:  # another user's lock file: lockable, not writable
            fd, writable = os.open(self.path, os.O_RDONLY), False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        if writable:
            os.ftruncate(fd, 0)
            os.write(fd, (owner.strip() + "\n").encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def holder(path: Path) -> str | None:
    """Who holds the lock at ``path`` (the line it wrote), or None when nobody does."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return None  # free (closing the descriptor below lets go of it again)
    except OSError:
        with contextlib.suppress(OSError):
            return Path(path).read_text().strip() or "another process"
        return "another process"
    finally:
        os.close(fd)


def die_with_parent() -> None:
    """Make this process (a worker) and everything it starts end when its parent ends.

    The worker leads a process group of its own, which its children (fairseq-train, data
    loaders) join; the kernel sends it SIGTERM when its parent dies (Linux ``PR_SET_PDEATHSIG``),
    and SIGTERM kills the whole group. Elsewhere than Linux only the group is set up.
    """
    parent = os.getppid()
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    signal.signal(signal.SIGTERM, _kill_own_group)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the signal was armed
        _kill_own_group(signal.SIGTERM, None)


def _kill_own_group(signum: int, frame: object) -> None:
    os.killpg(os.getpgid(0), signal.SIGKILL)


def kill_group(pid: int) -> None:
    """Kill the process group that worker ``pid`` leads (the worker and its children)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
