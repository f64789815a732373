"""Where and how a result was produced: recorded with every run so any number can be traced."""

from __future__ import annotations

import datetime as dt
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def git_state(root: Path = PROJECT_ROOT) -> dict[str, Any]:
    """Commit and dirtiness of the checkout the code runs from (None outside a git checkout)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                                  text=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def provenance(device: torch.device | None = None) -> dict[str, Any]:
    """A JSON-ready description of code, software, hardware and invocation."""
    try:
        version = metadata.version("attnbench")
    except metadata.PackageNotFoundError:
        version = None
    device = device or torch.device("cpu")
    return {
        "attnbench": version,
        "git": git_state(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "device_name": device_name(device),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "argv": sys.argv,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "time_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
