"""``fairseq-train`` in a child process, shared by the fairseq tasks (LM, summarization): the
shared flags, the child, log parsing and :class:`FairseqTask`, the training stage both use.

Each run trains in its own process (:mod:`tasks.backends.fairseq_train`, given the arguments
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

from torch import nn

from tasks.base import AttentionChoice, RunContext, Task

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
    return [sys.executable, "-m", "tasks.backends.fairseq_train", *arguments]


def attention_shapes(
    arch: str, fairseq_args: str, sides: Sequence[str], owner: str
) -> dict[str, tuple[int, int]]:
    """``{side: (heads, head_dim)}`` of the ``encoder``/``decoder`` attention of fairseq model
    ``arch`` with the width and head flags of ``fairseq_args``, as fairseq-train builds it (the
    architecture's own function fills in what the flags leave out). Imports fairseq."""
    import argparse

    from fairseq.models import ARCH_CONFIG_REGISTRY

    import tasks.backends.fairseq_plugin  # noqa: F401  (registers the zoo architectures)
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


def common_arguments(config: Any, run: RunContext) -> list[str]:
    """The ``fairseq-train`` flags both fairseq tasks share: batches, the vocabulary's training
    settings (``steps``, ``lr``, ``warmup_steps``, ``clip_norm``, ``dropout``), Adam with
    fairseq's inverse-square-root schedule, the seed, logging, the device and precision; the
    task's ``fairseq_args`` last, so that they win."""
    arguments = [
        "--batch-size", str(config.batch_size), "--update-freq", str(config.update_freq),
        "--max-update", str(config.steps),
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", str(config.lr),
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(config.warmup_steps),
        "--warmup-init-lr", "1e-07", "--clip-norm", str(config.clip_norm),
        "--dropout", str(config.dropout), "--seed", str(run.seed),
        "--save-dir", str(run.workdir / "checkpoints"), "--no-epoch-checkpoints",
        "--log-format", "json", "--log-interval", str(max(1, config.steps // 20)),
        "--no-progress-bar", "--num-workers", "0",
    ]
    if not run.device.startswith("cuda"):
        arguments.append("--cpu")
    if config.precision in ("fp16", "bf16"):
        arguments.append(f"--{config.precision}")
    return arguments


class FairseqTask(Task):
    """The part of a task that trains with ``fairseq-train`` in a child process: ``build``
    leaves the model to fairseq, ``train`` runs the child (its command in
    :meth:`train_arguments`) and loads the last checkpoint back (:meth:`load_trained`);
    :func:`training_metrics` adds fairseq's logged losses to the metrics."""

    requires = ("fairseq", "tokenizers", "filelock")

    def build(self, config: Any, attention: Mapping[str, AttentionChoice], data: Any,
              run: RunContext) -> None:
        return None

    def train_arguments(self, config: Any, data: Any, run: RunContext) -> list[str]:
        """The task's ``fairseq-train`` arguments (data, task, architecture, attention)."""
        raise NotImplementedError

    def load_trained(self, checkpoint: Path, config: Any, data: Any, run: RunContext) -> nn.Module:
        """The trained model, loaded in this process for evaluation."""
        raise NotImplementedError

    def train(self, model: None, config: Any, data: Any, run: RunContext) -> nn.Module:
        arguments = [*self.train_arguments(config, data, run), *common_arguments(config, run),
                     *shlex.split(config.fairseq_args)]
        log, memory = run_fairseq_train(arguments, workdir=run.workdir, device=run.device,
                                        threads=run.threads)
        cuda = memory.get("cuda_peak_mib")
        run.report_child_peak_memory(cuda or memory.get("peak_rss_mib"),
                                     "cuda allocator peak of the training process" if cuda
                                     else "peak resident set size of the training process")
        run.extra["train_curve"] = [(r["num_updates"], r["loss"]) for r in log["train_inner"]]
        run.extra["training_log"] = {"train": log["train"][-1:], "valid": log["valid"][-1:]}
        checkpoint = run.workdir / "checkpoints" / "checkpoint_last.pt"
        run.extra["checkpoint"] = str(checkpoint)
        return self.load_trained(checkpoint, config, data, run)


def training_metrics(run: RunContext) -> dict[str, float]:
    """fairseq's logged losses (bits per token): first and last training, last validation."""
    curve = run.extra.get("train_curve") or []
    valid = run.extra.get("training_log", {}).get("valid") or []
    return {"train_loss_first": curve[0][1] if curve else float("nan"),
            "train_loss_last": curve[-1][1] if curve else float("nan"),
            "valid_loss": valid[-1]["valid_loss"] if valid else float("nan")}
