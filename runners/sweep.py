"""Running the cells of a matrix: one record per cell in ``results/runs/``, resumable, on local
processes or on SLURM through submitit.

A cell runs in a process of its own (a spawned child locally, a job on SLURM) and writes its own
record atomically, so a crash of the coordinator loses nothing that finished, and a re-run of the
same command skips every cell whose record exists. A cell that fails records its error; a cell
whose process dies, or that runs past its timeout, is recorded by the coordinator.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import torch

from runners.execute import execute, peak_rss_mib
from runners.locks import CellLock, describe_this_run, die_with_parent, holder, kill_group, lock_path
from runners.matrix import Cell
from runners.provenance import provenance
from runners.quiet import redirect_process_output
from runners.records import RUN_SCHEMA, RecordError, load_record, write_record
from tasks.base import AttentionChoice, resolve_attention
from tasks.registry import get_task

SCHEMA = RUN_SCHEMA
KIND = "run"
FAILED = ("error", "oom", "timeout", "crashed")
"""The statuses of a cell that ran and did not succeed (a cluster resubmits those)."""


class CellTimeout(Exception):
    """Raised inside a running cell whose time is up (a cluster job's time limit is near): the
    cell is recorded as ``timeout``, not ``error``."""


def record_path(results_dir: Path, cell: Cell) -> Path:
    return Path(results_dir) / "runs" / f"{cell.key}.json"


def submitted_path(results_dir: Path, cell: Cell) -> Path:
    return Path(results_dir) / "runs" / f"{cell.key}.submitted"


def mark_submitted(results_dir: Path, cell: Cell, job_id: str) -> None:
    """Note that a cluster job was submitted for ``cell`` (so that collecting the results later
    does not submit it twice); the cell's record, once written, supersedes the note."""
    write_record(submitted_path(results_dir, cell), {"job_id": job_id, "submitted_utc": _utc(time.time())})


def submitted_job(results_dir: Path, cell: Cell) -> str | None:
    """The job id of an earlier submission of ``cell`` that has not written its record yet."""
    if read_record(results_dir, cell) is not None:
        return None
    try:
        return str(json.loads(submitted_path(results_dir, cell).read_text())["job_id"])
    except (FileNotFoundError, ValueError, KeyError):
        return None


def artifacts_dir(results_dir: Path, cell: Cell) -> Path:
    """The cell's private ``workdir`` (checkpoints, figures, audio), beside the records."""
    return Path(results_dir) / "artifacts" / cell.key


def read_record(results_dir: Path, cell: Cell) -> dict[str, Any] | None:
    """The cell's record, or None when there is none or the file there is not a valid run
    record of this cell (a corrupt, empty or foreign file does not make a cell finished)."""
    path = record_path(results_dir, cell)
    if not path.exists():
        return None
    try:
        record = load_record(path, KIND)
    except RecordError:
        return None
    return record if record["key"] == cell.key else None


def is_finished(results_dir: Path, cell: Cell, *, retry_failed: bool = False) -> bool:
    """A cell is finished when its valid record exists (and, with ``retry_failed``, says ok).
    A cell stopped by a shorter timeout than this sweep allows is not finished: the limit,
    not the configuration, decided that result."""
    record = read_record(results_dir, cell)
    if record is None:
        return False
    if record["status"] == "timeout":
        limit = (record["cell"] or {}).get("timeout")
        if limit is not None and (cell.timeout is None or cell.timeout > float(limit)):
            return False
    return record["status"] == "ok" or not retry_failed


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


BUSY = "busy"
"""What :func:`run_cell` returns when another run holds the cell's lock (nothing was written)."""


def run_cell(cell: Cell | Mapping[str, Any], results_dir: str | Path, *, device: str = "cpu",
             preset: str = "", threads: int = 0, owner: str = "", retry_failed: bool = False) -> str:
    """Run one cell in this process and write its record; returns its status.

    This is what a local child process or a SLURM job executes. Any exception of the task is
    recorded (status ``error``, or ``oom`` for out-of-memory) rather than raised. The cell's lock
    is held while it runs: if another run holds it, nothing runs and :data:`BUSY` is returned;
    if another run finished the cell meanwhile (ok, or any status without ``retry_failed``), its
    record's status is returned.
    """
    cell = cell if isinstance(cell, Cell) else Cell.from_json(cell)
    results_dir = Path(results_dir)
    lock = CellLock(lock_path(results_dir, cell.key))
    deadline = time.time() + 2.0  # a coordinator's probe holds the lock for microseconds
    while not lock.acquire(owner or describe_this_run()):
        if time.time() > deadline:
            return BUSY
        time.sleep(0.05)
    try:
        if is_finished(results_dir, cell, retry_failed=retry_failed):
            return str(read_record(results_dir, cell)["status"])  # another run did it meanwhile
        return _compute_cell(cell, results_dir, device=device, preset=preset, threads=threads)
    finally:
        lock.release()


def _compute_cell(cell: Cell, results_dir: Path, *, device: str, preset: str, threads: int) -> str:
    record = _base_record(cell, preset=preset, device=device)
    started = time.time()
    try:
        task_class = get_task(cell.task)
        config = task_class.make_config(cell.overrides)
        roles = resolve_attention(task_class, AttentionChoice(cell.attention, cell.attention_args))
        record["roles"] = {role: choice.label() for role, choice in roles.items()}
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        result = execute(task_class, config, roles, seed=cell.seed, device=device,
                         workdir=artifacts_dir(results_dir, cell), threads=threads)
        check_metrics(task_class, result.metrics)
        record.update(
            status="ok",
            metrics=result.metrics,
            metric_directions={m.name: "higher" if m.higher_is_better else "lower"
                               for m in task_class.metrics},
            declared_metrics=[{"name": m.name, "kind": m.kind,
                               "direction": "higher" if m.higher_is_better else "lower"}
                              for m in task_class.metrics],
            parameters=int(result.parameters),
            attention_parameters=int(result.attention_parameters),
            peak_memory_mib=result.peak_memory_mib,
            peak_memory_kind=result.peak_memory_kind,
            extra=result.extra,
        )
        record["timings"] = {"train_seconds": result.train_seconds,
                             "eval_seconds": result.eval_seconds}
    except Exception as error:
        out_of_memory = isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()
        status = "timeout" if isinstance(error, CellTimeout) else "oom" if out_of_memory else "error"
        record.update(status=status,
                      error=f"{type(error).__name__}: {error}"[:4000],
                      traceback=traceback.format_exc()[-8000:])
    record.setdefault("timings", {})["total_seconds"] = time.time() - started
    record["timings"]["started_utc"] = _utc(started)
    record["timings"]["finished_utc"] = _utc(time.time())
    record["process_peak_rss_mib"] = peak_rss_mib()
    if device.startswith("cuda"):
        record["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    # The worker runs the next cell next: leave it nothing of this one.
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    record["provenance"] = provenance(torch.device(device))
    write_record(record_path(results_dir, cell), record)
    return record["status"]


def check_metrics(task_class: type, metrics: Mapping[str, Any]) -> None:
    """Raise unless ``metrics`` holds every metric the task declares and each is finite (a cell
    with a NaN or infinite metric is not ``ok``)."""
    declared = [m.name for m in task_class.metrics]
    missing = [name for name in declared if name not in metrics]
    if missing:
        raise RuntimeError(f"task {task_class.name} did not report declared metric(s) {missing}; "
                           f"reported: {sorted(metrics)}")
    bad = {name: value for name, value in metrics.items() if not _finite(value)}
    if bad:
        raise FloatingPointError(f"task {task_class.name} reported non-finite metric(s) "
                                 + ", ".join(f"{k}={v}" for k, v in sorted(bad.items())))


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


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


Callback = Callable[[Cell, str, float], None]


def default_threads(jobs: int) -> int:
    """CPU threads per cell: the cores shared among the cells running at once, and no more than
    ``OMP_NUM_THREADS`` when it is set (oversubscribed threads make small models crawl)."""
    threads = max(1, len(os.sched_getaffinity(0)) // max(1, jobs))
    limit = os.environ.get("OMP_NUM_THREADS", "")
    return min(threads, int(limit)) if limit.isdigit() and int(limit) > 0 else threads


def _worker(connection: Connection, results_dir: str, device: str, preset: str, threads: int,
            owner: str, retry_failed: bool, verbose: bool = False) -> None:
    """A local worker process: runs the cells it is sent, one at a time, until it gets None.
    It dies with its coordinator (see :func:`runners.locks.die_with_parent`). Unless ``verbose``,
    what the libraries print goes to the worker's log file, not the terminal
    (:mod:`runners.quiet`)."""
    die_with_parent()
    if not verbose:
        redirect_process_output(Path(results_dir), f"worker-{os.getpid()}")
    torch.set_num_threads(threads)
    try:
        while (cell := connection.recv()) is not None:
            # Libraries a task imports (fairseq, ESPnet) configure the root logger; the record
            # holds what a cell did, so keep the sweep's own output to progress and warnings.
            logging.getLogger().setLevel(logging.WARNING)
            connection.send(run_cell(cell, results_dir, device=device, preset=preset, owner=owner,
                                     retry_failed=retry_failed))
    except (KeyboardInterrupt, EOFError, BrokenPipeError):
        # A coordinator that died or stopped closes the pipe: the sweep is over, and the
        # unfinished cell has no record to resume from.
        return


@dataclass
class _Slot:
    """One of the ``jobs`` places a cell can run: a worker process on a device."""

    device: str
    process: Any = None
    connection: Connection | None = None
    cell: Cell | None = None
    started: float = 0.0

    def start(self, context: Any, arguments: tuple[Any, ...]) -> None:
        self.connection, child = context.Pipe()
        # Not a daemon: tasks start processes of their own (fairseq-train, data workers). A
        # worker exits when its pipe closes, and dies with the coordinator.
        self.process = context.Process(target=_worker, args=(child, *arguments),
                                       name="attnbench-worker", daemon=False)
        self.process.start()
        child.close()

    def stop(self, *, kill: bool) -> None:
        if self.process is not None:
            if kill:
                kill_group(self.process.pid)  # the worker and whatever it started
                self.process.kill()
            elif self.connection is not None:
                try:
                    self.connection.send(None)
                except (BrokenPipeError, OSError):
                    self.process.kill()
            self.process.join()
        self.process = self.connection = self.cell = None


def run_local(cells: Sequence[Cell], results_dir: Path, *, jobs: int = 1, devices: Sequence[str] = ("cpu",),
              preset: str = "", threads: int = 0, on_done: Callback | None = None,
              retry_failed: bool = False, on_notice: Callable[[str], None] | None = None,
              verbose: bool = False) -> None:
    """Run ``cells`` on ``jobs`` worker processes at once; worker i uses ``devices[i % n]`` (GPUs
    round-robin). Workers are spawned once and reused (PyTorch is imported once per worker, not
    per cell). A worker that dies, or whose cell runs past its timeout, is killed, its cell
    recorded here as ``crashed`` or ``timeout``, and a fresh worker takes its place.

    A cell that another run is computing (its lock is held) waits until every other cell is
    done; then this run waits for that lock, and counts the other run's record (``on_done``
    gets the record's status) or computes the cell if the other run left none."""
    context = multiprocessing.get_context("spawn")
    arguments = (str(results_dir), preset, threads or default_threads(jobs), describe_this_run(),
                 retry_failed, verbose)
    queue = _Queue(list(cells), results_dir, on_notice, retry_failed)
    slots = [_Slot(device=devices[i % len(devices)]) for i in range(max(1, jobs))]
    try:
        while queue or any(slot.cell for slot in slots):
            for slot in slots:
                if slot.cell is None and (cell := queue.next(on_done)) is not None:
                    if slot.process is None:
                        slot.start(context, (arguments[0], slot.device, *arguments[1:]))
                    slot.cell, slot.started = cell, time.time()
                    slot.connection.send(cell.to_json())
            busy = [slot for slot in slots if slot.cell is not None]
            if not busy:  # only cells that another run is computing are left
                time.sleep(0.5)
            ready = wait([slot.connection for slot in busy], timeout=0.2) if busy else []
            for slot in busy:
                _collect(slot, slot.connection in ready, results_dir, preset, queue, on_done)
    finally:
        interrupted = any(slot.cell for slot in slots)
        for slot in slots:
            slot.stop(kill=interrupted)


def _collect(slot: _Slot, ready: bool, results_dir: Path, preset: str, queue: _Queue,
             on_done: Callback | None) -> None:
    """Handle a busy slot: its result when ``ready``, its death, or its timeout."""
    cell, elapsed = slot.cell, time.time() - slot.started
    assert cell is not None
    if ready:
        try:
            status = slot.connection.recv()
            slot.cell = None
        except (EOFError, OSError):
            slot.process.join(5)
            code = slot.process.exitcode
            slot.stop(kill=True)
            status = record_failure(
                results_dir, cell, status="crashed", preset=preset, device=slot.device,
                seconds=elapsed, error=f"the cell's process died (exit code {code}) "
                                       "without writing its record")["status"]
        if status == BUSY:
            queue.defer(cell)
            return
    elif cell.timeout is not None and elapsed > cell.timeout:
        slot.stop(kill=True)
        status = record_failure(
            results_dir, cell, status="timeout", preset=preset, device=slot.device,
            seconds=elapsed, error=f"stopped after the cell's timeout of {cell.timeout:g} s",
        )["status"]
    else:
        return
    if on_done:
        on_done(cell, status, elapsed)


class _Queue:
    """The cells still to run, and those deferred because another run holds their lock."""

    def __init__(self, cells: list[Cell], results_dir: Path, on_notice: Callable[[str], None] | None,
                 retry_failed: bool) -> None:
        self.pending, self.deferred = cells, []
        self.results_dir, self.on_notice, self.retry_failed = Path(results_dir), on_notice, retry_failed

    def __bool__(self) -> bool:
        return bool(self.pending or self.deferred)

    def _holder(self, cell: Cell) -> str | None:
        return holder(lock_path(self.results_dir, cell.key))

    def defer(self, cell: Cell, owner: str | None = None) -> None:
        self.deferred.append(cell)
        if self.on_notice:
            self.on_notice(f"{cell.key} is being computed by another run "
                           f"({owner or self._holder(cell) or 'which has just finished'}); "
                           "this run takes its record when it is done")

    def next(self, on_done: Callback | None) -> Cell | None:
        """The next cell to send to a worker: a pending one whose lock is free; once none is
        pending, a deferred one whose lock came free. A deferred cell that the other run
        finished is reported to ``on_done`` with that record's status and not run again."""
        while self.pending:
            cell = self.pending.pop(0)
            owner = self._holder(cell)
            if owner is None:
                return cell
            self.defer(cell, owner)
        for cell in list(self.deferred):
            if self._holder(cell) is not None:
                continue
            self.deferred.remove(cell)
            if not is_finished(self.results_dir, cell, retry_failed=self.retry_failed):
                return cell
            record = read_record(self.results_dir, cell)
            if on_done:
                seconds = float((record.get("timings") or {}).get("total_seconds", 0.0))
                on_done(cell, str(record["status"]), seconds)
        return None


def _submitit_job(cell: dict[str, Any], results_dir: str, preset: str) -> str:
    """What a submitit job runs: the cell on the job's GPU if it has one."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    status = run_cell(cell, results_dir, device=device, preset=preset)
    submitted_path(Path(results_dir), Cell.from_json(cell)).unlink(missing_ok=True)
    return status


def run_submitit(cells: Sequence[Cell], results_dir: Path, *, cluster: str = "slurm",
                 parameters: Mapping[str, Any] | None = None, preset: str = "", wait: bool = True,
                 on_done: Callback | None = None) -> list[Any]:
    """Submit one job per cell (a job array) through submitit; ``cluster="local"`` runs the same
    jobs as local subprocesses (submitit's LocalExecutor). SLURM runs go through
    :mod:`runners.cluster`, which sizes the jobs to the partition and follows them through sacct.

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
    executor.update_parameters(**{**defaults, **(parameters or {})})
    jobs = executor.map_array(_submitit_job, [c.to_json() for c in cells],
                              [str(results_dir)] * len(cells), [preset] * len(cells))
    for job, cell in zip(jobs, cells):
        mark_submitted(results_dir, cell, job.job_id)
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

