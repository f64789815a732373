"""Running the cells of a matrix: one record per cell in ``results/runs/``, resumable, on local
processes or on SLURM through submitit.

A cell runs in a process of its own (a spawned child locally, a job on SLURM) and writes its own
record atomically, so a crash of the coordinator loses nothing that finished, and a re-run of the
same command skips every cell whose record exists. A cell that fails records its error; a cell
whose process dies, or that runs past its timeout, is recorded by the coordinator.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import resource
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from runners.matrix import Cell
from runners.provenance import provenance
from runners.records import write_record
from tasks.base import AttentionChoice, get_task, resolve_attention

SCHEMA = "attnbench.run/1"
KIND = "run"
FAILED = ("error", "oom", "timeout", "crashed")


def record_path(results_dir: Path, cell: Cell) -> Path:
    return Path(results_dir) / "runs" / f"{cell.key}.json"


def artifacts_dir(results_dir: Path, cell: Cell) -> Path:
    """The cell's private ``workdir`` (checkpoints, figures, audio), beside the records."""
    return Path(results_dir) / "artifacts" / cell.key


def read_record(results_dir: Path, cell: Cell) -> dict[str, Any] | None:
    path = record_path(results_dir, cell)
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def is_finished(results_dir: Path, cell: Cell, *, retry_failed: bool = False) -> bool:
    """A cell is finished when its record exists (and, with ``retry_failed``, says ok)."""
    record = read_record(results_dir, cell)
    return record is not None and (record.get("status") == "ok" or not retry_failed)


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _base_record(cell: Cell, *, preset: str, device: str) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "kind": KIND,
        "key": cell.key,
        "preset": preset,
        "cell": cell.to_json(),
        "seed": cell.seed,
        "device": device,
    }


def run_cell(cell: Cell | Mapping[str, Any], results_dir: str | Path, *, device: str = "cpu",
             preset: str = "", threads: int = 0) -> str:
    """Run one cell in this process and write its record; returns its status.

    This is what a local child process or a SLURM job executes. Any exception of the task is
    recorded (status ``error``, or ``oom`` for out-of-memory) rather than raised.
    """
    cell = cell if isinstance(cell, Cell) else Cell.from_json(cell)
    results_dir = Path(results_dir)
    if threads:
        torch.set_num_threads(threads)
    record = _base_record(cell, preset=preset, device=device)
    started = time.time()
    try:
        task_class = get_task(cell.task)
        config = task_class.make_config(cell.overrides)
        roles = resolve_attention(task_class, AttentionChoice(cell.attention, cell.attention_args))
        record["roles"] = {role: choice.label() for role, choice in roles.items()}
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
            torch.cuda.reset_peak_memory_stats()
        seed_everything(cell.seed)
        workdir = artifacts_dir(results_dir, cell)
        workdir.mkdir(parents=True, exist_ok=True)
        result = task_class().run(config, roles, seed=cell.seed, device=device, workdir=workdir)
        declared = [m.name for m in task_class.metrics]
        missing = [name for name in declared if name not in result.metrics]
        if missing:
            raise RuntimeError(f"task {cell.task} did not report declared metric(s) {missing}; "
                               f"reported: {sorted(result.metrics)}")
        record.update(
            status="ok",
            metrics={k: float(v) for k, v in result.metrics.items()},
            metric_directions={m.name: "higher" if m.higher_is_better else "lower"
                               for m in task_class.metrics},
            parameters=int(result.parameters),
            attention_parameters=int(result.attention_parameters),
            peak_memory_mib=result.peak_memory_mib,
            extra=result.extra,
        )
        record["timings"] = {"train_seconds": result.train_seconds,
                             "eval_seconds": result.eval_seconds}
    except Exception as error:
        out_of_memory = isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()
        record.update(status="oom" if out_of_memory else "error",
                      error=f"{type(error).__name__}: {error}"[:4000],
                      traceback=traceback.format_exc()[-8000:])
    record.setdefault("timings", {})["total_seconds"] = time.time() - started
    record["timings"]["started_utc"] = _utc(started)
    record["timings"]["finished_utc"] = _utc(time.time())
    record["process_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.startswith("cuda"):
        record["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    record["provenance"] = provenance(torch.device(device))
    write_record(record_path(results_dir, cell), record)
    return record["status"]


def record_failure(results_dir: Path, cell: Cell, *, status: str, error: str, preset: str,
                   device: str, seconds: float) -> dict[str, Any]:
    """The record of a cell whose process never wrote one (it died or ran past its timeout)."""
    record = _base_record(cell, preset=preset, device=device)
    record.update(status=status, error=error, timings={"total_seconds": seconds},
                  provenance=provenance())
    write_record(record_path(results_dir, cell), record)
    return record


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


@dataclass
class SweepState:
    """Counts for the progress display."""

    total: int
    skipped: int = 0
    ok: int = 0
    failed: int = 0
    events: list[tuple[Cell, str, float]] = field(default_factory=list)

    @property
    def remaining(self) -> int:
        return self.total - self.skipped - self.ok - self.failed


Callback = Callable[[Cell, str, float], None]


def _child_entry(cell: dict[str, Any], results_dir: str, device: str, preset: str, threads: int) -> None:
    run_cell(cell, results_dir, device=device, preset=preset, threads=threads)


def run_local(cells: Sequence[Cell], results_dir: Path, *, jobs: int = 1, devices: Sequence[str] = ("cpu",),
              preset: str = "", threads: int = 0, on_done: Callback | None = None) -> None:
    """Run ``cells`` in up to ``jobs`` spawned processes at once; slot i uses ``devices[i % n]``
    (GPUs round-robin). A child that dies or exceeds its cell's timeout is recorded here."""
    context = multiprocessing.get_context("spawn")
    if not threads:
        threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    pending = list(cells)
    running: dict[int, tuple[Any, Cell, float]] = {}  # slot -> (process, cell, start time)
    try:
        while pending or running:
            for slot in range(jobs):
                if slot not in running and pending:
                    cell = pending.pop(0)
                    device = devices[slot % len(devices)]
                    process = context.Process(
                        target=_child_entry, name=f"attnbench-{cell.key}",
                        args=(cell.to_json(), str(results_dir), device, preset, threads))
                    process.start()
                    running[slot] = (process, cell, time.time())
            time.sleep(0.05)
            for slot, (process, cell, started) in list(running.items()):
                elapsed = time.time() - started
                device = devices[slot % len(devices)]
                if process.is_alive():
                    if cell.timeout is not None and elapsed > cell.timeout:
                        process.terminate()
                        process.join(10)
                        if process.is_alive():
                            process.kill()
                            process.join()
                        record_failure(results_dir, cell, status="timeout", preset=preset,
                                       device=device, seconds=elapsed,
                                       error=f"stopped after the cell's timeout of {cell.timeout:g} s")
                        del running[slot]
                        if on_done:
                            on_done(cell, "timeout", elapsed)
                    continue
                process.join()
                del running[slot]
                record = read_record(results_dir, cell)
                if record is None:
                    record = record_failure(
                        results_dir, cell, status="crashed", preset=preset, device=device,
                        seconds=elapsed, error=f"the cell's process exited with code {process.exitcode} "
                                              "without writing its record")
                if on_done:
                    on_done(cell, record["status"], elapsed)
    finally:
        for process, _, _ in running.values():
            process.kill()
            process.join()


def _submitit_job(cell: dict[str, Any], results_dir: str, preset: str) -> str:
    """What a submitit job runs: the cell on the job's GPU if it has one."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return run_cell(cell, results_dir, device=device, preset=preset)


def run_submitit(cells: Sequence[Cell], results_dir: Path, *, cluster: str = "slurm",
                 parameters: Mapping[str, Any] | None = None, preset: str = "", wait: bool = True,
                 on_done: Callback | None = None) -> list[Any]:
    """Submit one job per cell (a job array) through submitit; ``cluster="local"`` runs the same
    jobs as local subprocesses (submitit's LocalExecutor), ``"slurm"`` on a SLURM cluster.

    ``parameters`` go to ``AutoExecutor.update_parameters`` (``slurm_partition``,
    ``gpus_per_node``, ``cpus_per_task``, ``mem_gb``, ``timeout_min``, ``slurm_array_parallelism``
    ...). With ``wait`` the call follows the jobs until they end; otherwise it returns the jobs
    and the records appear as they finish (a later ``attnbench run`` collects them).
    """
    import submitit

    if not cells:
        return []
    executor = submitit.AutoExecutor(folder=Path(results_dir) / "logs" / "submitit" / "%j", cluster=cluster)
    longest = max((c.timeout for c in cells if c.timeout is not None), default=None)
    defaults: dict[str, Any] = {"name": f"attnbench-{preset or 'run'}",
                                "timeout_min": math.ceil(longest / 60) + 5 if longest else 24 * 60}
    if cluster == "slurm":
        defaults.update(gpus_per_node=1, cpus_per_task=8, tasks_per_node=1, nodes=1)
    executor.update_parameters(**{**defaults, **(parameters or {})})
    jobs = executor.map_array(_submitit_job, [c.to_json() for c in cells],
                              [str(results_dir)] * len(cells), [preset] * len(cells))
    if not wait:
        return jobs
    started = time.time()
    waiting = dict(zip(range(len(cells)), zip(jobs, cells)))
    while waiting:
        time.sleep(0.5)
        for index, (job, cell) in list(waiting.items()):
            if not job.done():
                continue
            del waiting[index]
            record = read_record(results_dir, cell)
            if record is None:
                try:
                    job.result()
                    problem = "the job ended without writing its record"
                except Exception as error:
                    problem = f"{type(error).__name__}: {error}"[:4000]
                status = "timeout" if "timed-out" in problem or "TIMEOUT" in problem else "crashed"
                record = record_failure(results_dir, cell, status=status, preset=preset,
                                        device="slurm" if cluster == "slurm" else "cpu",
                                        seconds=time.time() - started,
                                        error=f"job {job.job_id}: {problem}")
            if on_done:
                on_done(cell, record["status"], time.time() - started)
    return jobs


def resolve_devices(device: str, jobs: int) -> list[str]:
    """``auto`` -> every visible GPU (round-robin over the job slots), else the CPU."""
    if device == "auto":
        count = torch.cuda.device_count()
        return [f"cuda:{i}" for i in range(count)] if count else ["cpu"]
    devices = [d.strip() for d in device.split(",") if d.strip()]
    for d in devices:
        if d != "cpu" and not d.startswith("cuda"):
            raise ValueError(f"unknown device {d!r}; valid: auto, cpu, cuda, cuda:N (comma-separated)")
        if d.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {d!r} requested but torch.cuda.is_available() is False")
    return devices or ["cpu"]

