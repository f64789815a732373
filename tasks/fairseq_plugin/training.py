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
_EXCEPTION = re.compile(r"^[\w.]*(Error|Exception)\b: ")
"""A line of a Python traceback that names the exception (the last such line is the cause)."""

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


def attention_shapes(
    arch: str, fairseq_args: str, sides: Sequence[str], owner: str
) -> dict[str, tuple[int, int]]:
    """``{side: (heads, head_dim)}`` of the ``encoder``/``decoder`` attention of fairseq model
    ``arch`` with the width and head flags of ``fairseq_args``, as fairseq-train builds it (the
    architecture's own function fills in what the flags leave out). Imports fairseq."""
    import argparse

    from fairseq.models import ARCH_CONFIG_REGISTRY

    import tasks.fairseq_plugin  # noqa: F401  (registers the zoo architectures)
    from attention_zoo import AttentionConfigError
    from tasks.base import split_heads

    if arch not in ARCH_CONFIG_REGISTRY:
        zoo = ", ".join(sorted(name for name in ARCH_CONFIG_REGISTRY if name.startswith("zoo_")))
        raise AttentionConfigError(f"{owner}: unknown fairseq architecture {arch!r}; the zoo's: {zoo}")
    args = argparse.Namespace()
    tokens = shlex.split(fairseq_args)
    for side in sides:
        for name in ("embed_dim", "attention_heads"):
            flag = f"--{side}-{name.replace('_', '-')}"
            for value in _flag_values(tokens, flag):
                try:
                    setattr(args, f"{side}_{name}", int(value))
                except ValueError:
                    raise AttentionConfigError(f"{owner}: fairseq_args {flag} takes an integer, "
                                               f"got {value!r}") from None
    ARCH_CONFIG_REGISTRY[arch](args)
    return {side: split_heads(getattr(args, f"{side}_embed_dim"), getattr(args, f"{side}_attention_heads"),
                              f"{owner}: {arch} {side}_embed_dim / {side}_attention_heads")
            for side in sides}


def _flag_values(tokens: Sequence[str], flag: str) -> list[str]:
    """The values given to ``flag`` in ``tokens`` (``--flag V`` or ``--flag=V``), in order."""
    values = []
    for index, token in enumerate(tokens):
        if token.startswith(flag + "="):
            values.append(token.partition("=")[2])
        elif token == flag and index + 1 < len(tokens):
            values.append(tokens[index + 1])
    return values


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
        lines = output.splitlines()
        causes = [line.strip() for line in lines if _EXCEPTION.match(line.strip())]
        cause = f": {causes[-1]}" if causes else ""
        raise RuntimeError(f"fairseq-train failed (exit {completed.returncode}){cause}; "
                           f"log: {workdir / 'train.log'}\n" + "\n".join(lines[-25:]))
    memory = json.loads(report.read_text()) if report.exists() else {}
    return parse_training_log(output.splitlines()), memory
