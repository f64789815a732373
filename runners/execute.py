"""The run skeleton every task shares: the runner, not the task, seeds, sets CPU threads,
checks the roles, times training and evaluation, measures peak memory and counts parameters.

:func:`execute` calls a task's stages in order (``prepare``, ``build``, ``train``,
``evaluate``); a sweep cell (:func:`runners.sweep.run_cell`), the task contract
(:func:`tasks.testing.check_task_contract`) and a script all run a task through it.
"""

from __future__ import annotations

import contextlib
import random
import resource
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from attention_zoo import Attention
from tasks.base import AttentionChoice, RunContext, Task, TaskResult, resolve_attention, torch_threads


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and every CUDA device) generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def reset_peak_rss() -> None:
    """Reset this process's peak resident memory (Linux: VmHWM), so that a worker that runs
    several cells reports each cell's own peak."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mib() -> float:
    """Peak resident memory of this process since :func:`reset_peak_rss`, in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters of ``model``, trainable parameters inside its zoo mechanisms).

    A mechanism is any :class:`attention_zoo.Attention` module; its projections live in the
    layer around it and are not counted as attention parameters. Shared parameters count once.
    """
    def trainable(parameters: Any) -> int:
        unique = {id(p): p for p in parameters if p.requires_grad}
        return sum(p.numel() for p in unique.values())

    mechanisms = [m for m in model.modules() if isinstance(m, Attention)]
    return (trainable(model.parameters()),
            trainable(p for m in mechanisms for p in m.parameters()))


def _synchronize(device: str) -> None:
    """Wait for the GPU's queued work, so that a timer read next counts it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


class _PeakMemory:
    """Peak memory of the block: the CUDA allocator's on a GPU, else this process's peak RSS."""

    def __init__(self, device: str) -> None:
        self.device, self.mib, self.kind = device, 0.0, ""

    def __enter__(self) -> _PeakMemory:
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(self.device)
        reset_peak_rss()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.startswith("cuda"):
            self.mib, self.kind = torch.cuda.max_memory_allocated(self.device) / 2**20, "cuda allocator peak"
        else:
            self.mib, self.kind = peak_rss_mib(), "peak resident set size of the run's process"


def execute(task: type[Task], config: Any, attention: AttentionChoice | Mapping[str, AttentionChoice],
            *, seed: int, device: str, workdir: Path, threads: int = 0) -> TaskResult:
    """Run ``task`` once: check the roles, then prepare, build, train and evaluate.

    Args:
        config: an instance of ``task.Config``.
        attention: one choice for every role, or one per role (checked before anything is built).
        seed: seeds every generator before the first stage.
        threads: intra-op CPU threads (0: leave torch's setting); a ``threads`` setting of the
            task, when non-zero, wins.
    """
    roles = resolve_attention(task, attention)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with torch_threads(getattr(config, "threads", 0) or threads):
        run = RunContext(seed=seed, device=device, workdir=workdir, threads=torch.get_num_threads(),
                         attention=roles)
        seed_everything(seed)
        instance = task()
        data = instance.prepare(config, run)
        model = instance.build(config, roles, data, run)
        with _PeakMemory(device) as peak:
            started = time.perf_counter()
            trained = instance.train(model, config, data, run)
            _synchronize(device)
            train_seconds = time.perf_counter() - started
        model = trained if trained is not None else model
        if not isinstance(model, nn.Module):
            raise TypeError(f"task {task.name}: build or train must return the model (an nn.Module), "
                            f"got {type(model).__name__}")
        started = time.perf_counter()
        metrics = instance.evaluate(model, config, data, run)
        _synchronize(device)
        eval_seconds = time.perf_counter() - started
    _check_metrics(task, metrics)
    parameters, attention_parameters = count_parameters(model)
    child = run.child_peak_memory_mib is not None
    return TaskResult(
        metrics={name: float(value) for name, value in metrics.items()},
        parameters=parameters, attention_parameters=attention_parameters,
        train_seconds=train_seconds, eval_seconds=eval_seconds,
        peak_memory_mib=run.child_peak_memory_mib if child else peak.mib,
        peak_memory_kind=run.child_peak_memory_kind if child else peak.kind,
        extra=run.extra,
    )


def _check_metrics(task: type[Task], metrics: Mapping[str, Any]) -> None:
    declared = [m.name for m in task.metrics]
    missing = [name for name in declared if name not in metrics]
    if missing:
        raise RuntimeError(f"task {task.name} did not report declared metric(s) {missing}; "
                           f"reported: {sorted(metrics)}")
    for name in declared:
        value = metrics[name]
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise TypeError(f"task {task.name}: metric {name!r} is {type(value).__name__} {value!r}, "
                            "not a number")
