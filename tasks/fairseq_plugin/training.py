"""``fairseq-train`` in a child process, shared by the fairseq tasks (LM, summarization).

Each run trains in its own process (:mod:`tasks.fairseq_train`, given the arguments
``fairseq-train`` takes; the zoo arrives through ``--user-dir``): a separate process gives a
clean peak-memory figure per run. :func:`run_fairseq_train` starts it and parses fairseq's JSON
log.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_LOG_RECORD = re.compile(r"\| (train_inner|train|valid) \| (\{.*\})\s*$")
_ROOT = Path(__file__).resolve().parents[2]

TrainingLog = dict[str, list[dict[str, float]]]


def attention_args_text(args: Mapping[str, Any]) -> str:
    """Typed hyperparameters back to the ``key=value,...`` text of ``--attention-args``."""
    def text(value: Any) -> str:
        if value is None:
            return "none"
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)

    return ",".join(f"{key}={text(value)}" for key, value in sorted(args.items()))


def parse_training_log(lines: Sequence[str]) -> TrainingLog:
    """fairseq's JSON log records (``--log-format json``) by tag: train_inner, train, valid."""
    records: TrainingLog = {"train_inner": [], "train": [], "valid": []}
    for line in lines:
        match = _LOG_RECORD.search(line)
        if match:
            values = {}
            for key, value in json.loads(match.group(2)).items():
                try:
                    values[key] = float(value)
                except (TypeError, ValueError):
                    continue
            records[match.group(1)].append(values)
    return records


def train_command(arguments: Sequence[str]) -> list[str]:
    """The child process's command line for ``fairseq-train`` ``arguments``."""
    return [sys.executable, "-m", "tasks.fairseq_train", *arguments]


def run_fairseq_train(
    arguments: Sequence[str], *, workdir: Path, device: str, threads: int = 0
) -> tuple[TrainingLog, dict[str, Any]]:
    """Run ``fairseq-train arguments`` in a child process; its parsed log and peak memory.

    The command is written to ``workdir/train_command.txt`` and the output to
    ``workdir/train.log``; a failure raises ``RuntimeError`` with the log's tail.
    """
    command = train_command(arguments)
    report = workdir / "train_memory.json"
    environment = {**os.environ, "ATTNBENCH_TRAIN_REPORT": str(report)}
    if threads:
        environment["OMP_NUM_THREADS"] = str(threads)
    if device.startswith("cuda:"):
        environment["CUDA_VISIBLE_DEVICES"] = device.partition(":")[2]
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(_ROOT), environment.get("PYTHONPATH", "")]))
    (workdir / "train_command.txt").write_text(shlex.join(command) + "\n")
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    output = completed.stdout + completed.stderr
    (workdir / "train.log").write_text(output)
    if completed.returncode != 0:
        tail = "\n".join(output.splitlines()[-25:])
        raise RuntimeError(f"fairseq-train failed (exit {completed.returncode}); "
                           f"log: {workdir / 'train.log'}\n{tail}")
    memory = json.loads(report.read_text()) if report.exists() else {}
    return parse_training_log(output.splitlines()), memory
