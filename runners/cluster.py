"""The cells of a matrix as SLURM jobs, through submitit: resources that fit the partition and the
device, submission as one job array, and the bookkeeping that survives cancelled jobs, time limits
and lost nodes.

Each job runs one cell and writes the cell's record itself (:func:`runners.sweep.run_cell`); a
note beside the record (``<key>.submitted``) holds the job id until the record exists. SLURM
(``squeue``, then ``sacct`` for the jobs the scheduler has forgotten) says how a job without a
record ended: a time-out, an out-of-memory kill or a crash is the cell's outcome and is recorded; a job
cancelled, pre-empted or lost with its node is not, and the next run submits the cell again.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from runners.matrix import Cell
from runners.sweep import (
    FAILED,
    CellTimeout,
    mark_submitted,
    read_record,
    record_failure,
    record_path,
    run_cell,
    submitted_job,
    submitted_path,
)

# Resources of one job when the command line does not say: a CPU cell gets a few cores and
# memory enough for the shipped tasks; a CUDA cell one GPU and the cores to feed it. Both are
# capped by the partition's nodes (`sinfo`), so the defaults always fit the cluster.
PRESET_RESOURCES: dict[str, dict[str, int]] = {
    "cpu": {"cpus_per_task": 4, "mem_gb": 16},
    "cuda": {"gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 64},
}
# Minutes a job may run beyond its cell's `timeout` (start-up: imports, data preparation).
TIME_MARGIN_MIN = 5
# A job still in the queue or running; every other state is an end.
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED",
                 "REQUEUE_HOLD", "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT",
                 "RESV_DEL_HOLD", "SPECIAL_EXIT"}
# Ends that say nothing about the cell (someone cancelled it, a node or the scheduler lost it):
# no record, the cell is submitted again by the next run.
UNRECORDED_STATES = {"CANCELLED", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE", "REVOKED"}
# SLURM's message on a refused submission -> the parameter that asked for it.
REFUSAL_CAUSES = (
    (r"gres|generic resource|gpu", "gpus_per_node"),
    (r"memory", "mem_gb"),
    (r"partition", "slurm_partition"),
    (r"time limit", "timeout_min"),
    (r"account", "slurm_account"),
    (r"qos", "slurm_qos"),
    (r"constraint|feature", "slurm_constraint"),
    (r"cpu|processor|node configuration", "cpus_per_task"),
)


class ClusterError(Exception):
    """A submission that SLURM refused, or a cluster that cannot be asked; the message is one
    line, with SLURM's own words."""


@dataclass(frozen=True)
class Partition:
    """What every node of a partition offers (the smallest node where they differ)."""

    name: str
    cpus: int
    memory_mib: int
    gpus: int
    max_minutes: int | None = None  # the partition's time limit (None: none)


def partition_info(name: str | None) -> Partition:
    """The partition ``name`` (None: the cluster's default partition), from ``sinfo``."""
    output = _slurm_command(["sinfo", "--noheader", "--format=%P|%c|%m|%G|%l"]
                            + ([f"--partition={name}"] if name else []))
    rows = [line.split("|") for line in output.splitlines() if line.count("|") == 4]
    if not name:
        rows = [row for row in rows if row[0].endswith("*")]
    if not rows:
        raise ClusterError(f"sinfo lists no partition {name!r}" if name else
                           "sinfo lists no default partition; name one with --slurm slurm_partition=NAME")

    def number(text: str) -> int:
        digits = re.match(r"\d+", text)
        return int(digits.group()) if digits else 0

    gpus = [sum(int(n) for n in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", row[3])) for row in rows]
    return Partition(name=rows[0][0].rstrip("*"), cpus=min(number(row[1]) for row in rows),
                     memory_mib=min(number(row[2]) for row in rows), gpus=min(gpus),
                     max_minutes=_minutes(rows[0][4]))


def _minutes(limit: str) -> int | None:
    """SLURM's time limit in whole minutes: ``infinite`` -> None; ``45`` (minutes), ``30:00``
    (minutes:seconds), ``12:00:00``, ``2-00:00:00`` (days-hours[:minutes[:seconds]])."""
    days, dash, clock = limit.strip().rpartition("-")
    fields = clock.split(":")
    if (dash and not days.isdigit()) or len(fields) > 3 or not all(f.isdigit() for f in fields):
        return None
    numbers = [int(field) for field in fields]
    if dash:
        hours, minutes = [*numbers, 0, 0][:2]
    elif len(numbers) == 3:
        hours, minutes = numbers[:2]
    else:
        hours, minutes = 0, numbers[0]
    return int(days or 0) * 1440 + hours * 60 + minutes


def job_device(device: str, partition: Partition) -> str:
    """``cpu`` or ``cuda`` for the jobs: ``--device`` as given, and ``auto`` is CUDA where the
    partition's nodes have GPUs (the submitting machine may have none)."""
    kind = ("cuda" if partition.gpus else "cpu") if device == "auto" else device.split(":")[0]
    if kind not in PRESET_RESOURCES:
        raise ClusterError(f"unknown device {device!r} for SLURM; valid: auto, cpu, cuda")
    return kind


def job_resources(kind: str, partition: Partition) -> dict[str, Any]:
    """Default submitit parameters of a ``cpu`` or ``cuda`` job on ``partition``: no GPU request
    for a CPU run, one GPU per job for CUDA; CPUs and memory of the preset, within the nodes."""
    preset = PRESET_RESOURCES[kind]
    resources: dict[str, Any] = {
        "cpus_per_task": max(1, min(preset["cpus_per_task"], partition.cpus or preset["cpus_per_task"])),
        "mem_gb": max(1, min(preset["mem_gb"], partition.memory_mib // 1024 or preset["mem_gb"])),
    }
    if kind == "cuda":
        resources["gpus_per_node"] = preset["gpus_per_node"]
    return resources


def submission_parameters(cells: Sequence[Cell], *, device: str, preset: str,
                          overrides: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """Every submitit parameter of the job array, and the jobs' device (``cpu`` or ``cuda``):
    the defaults for the device and partition, the time limit from the cells' ``timeout``, then
    ``overrides`` (``--slurm KEY=VALUE``) on top."""
    partition = partition_info(overrides.get("slurm_partition"))
    kind = job_device(device, partition)
    longest = max((c.timeout for c in cells if c.timeout is not None), default=None)
    minutes = math.ceil(longest / 60) + TIME_MARGIN_MIN if longest else 24 * 60
    parameters: dict[str, Any] = {
        "name": f"attnbench-{preset or 'run'}",
        "slurm_partition": partition.name,
        "timeout_min": min(minutes, partition.max_minutes or minutes),
        "tasks_per_node": 1,
        "nodes": 1,
        **job_resources(kind, partition),
    }
    return {**parameters, **overrides}, kind


def submit(cells: Sequence[Cell], results_dir: Path, *, parameters: Mapping[str, Any],
           preset: str, device: str) -> dict[str, Cell]:
    """Submit one job per cell as a job array; returns job id -> cell, each noted beside its
    record. A refusal raises :class:`ClusterError` with SLURM's message and the parameter."""
    import submitit

    executor = submitit.AutoExecutor(folder=log_folder(results_dir) / "%j", cluster="slurm")
    executor.update_parameters(**parameters)
    stderr = io.StringIO()
    try:
        # submitit prints sbatch's error output before raising: keep it for the one-line report.
        with contextlib.redirect_stderr(stderr):
            jobs = executor.map_array(run_job, [c.to_json() for c in cells],
                                      [str(results_dir)] * len(cells), [preset] * len(cells),
                                      [device] * len(cells))
    except submitit.core.utils.FailedJobError as error:
        raise ClusterError(refusal_message(str(error) or stderr.getvalue(), parameters)) from None
    submitted = {}
    for job, cell in zip(jobs, cells):
        mark_submitted(results_dir, cell, job.job_id)
        submitted[job.job_id] = cell
    return submitted


def refusal_message(sbatch_output: str, parameters: Mapping[str, Any]) -> str:
    """One line: sbatch's error, the parameter that caused it (where SLURM's words say), and how
    to change it."""
    errors = [line.split("error:", 1)[1].strip() for line in sbatch_output.splitlines() if "error:" in line]
    reason = "; ".join(dict.fromkeys(errors)) or " ".join(sbatch_output.split())[:300]
    for pattern, key in REFUSAL_CAUSES:
        if re.search(pattern, reason, re.IGNORECASE):
            value = parameters.get(key, "unset")
            return (f"sbatch refused the jobs: {reason} (parameter {key}={value}; change it with "
                    f"--slurm {key}=VALUE)")
    asked = ", ".join(f"{k}={v}" for k, v in sorted(parameters.items()) if k != "name")
    return f"sbatch refused the jobs: {reason} (requested {asked})"


def log_folder(results_dir: Path) -> Path:
    return Path(results_dir) / "logs" / "submitit"


def run_job(cell: dict[str, Any], results_dir: str, preset: str, device: str) -> str:
    """What a SLURM job runs: one cell on ``device`` (``cpu`` or ``cuda``: the job's GPU) with as
    many threads as the job has CPUs (not the node's), then the cell's submission note removed."""
    threads = int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0)
    _stop_at_time_limit_warning()
    status = run_cell(cell, results_dir, device=device, preset=preset, threads=threads)
    submitted_path(Path(results_dir), Cell.from_json(cell)).unlink(missing_ok=True)
    return status


def _stop_at_time_limit_warning() -> None:
    """SLURM warns a job some time before its time limit (submitit asks for SIGUSR2, 90 s before).
    submitit's handler then requeues a pre-empted job, or raises on a time-out; a time-out is
    turned here into :class:`CellTimeout`, which the cell's record states as ``timeout``."""
    import submitit

    previous = signal.getsignal(signal.SIGUSR2)
    if not callable(previous):
        return

    def on_warning(signum: int, frame: FrameType | None) -> None:
        try:
            previous(signum, frame)
        except submitit.core.utils.UncompletedJobError as error:
            raise CellTimeout("stopped at SLURM's warning that the job's time limit is near (signal "
                              f"USR2, slurm_signal_delay_s before it; submitit: {error})") from None

    signal.signal(signal.SIGUSR2, on_warning)


def job_states(job_ids: Sequence[str]) -> dict[str, str]:
    """The SLURM state of each job (``123_4`` for an array task): ``RUNNING``, ``TIMEOUT``...
    from the scheduler (``squeue``: the live state, such as a job requeued after its node
    failed, and the end of a job for a few minutes), then from accounting (``sacct``) for the
    jobs the scheduler has forgotten. A job that neither knows is missing from the answer."""
    states: dict[str, str] = {}
    for command in (["squeue", "--noheader", "--states=all", "--format=%i|%T"],
                    ["sacct", "--allocations", "--parsable2", "--noheader", "--format=JobID,State"]):
        unknown = sorted({job_id.split("_")[0] for job_id in job_ids if job_id not in states})
        if not unknown:
            break
        try:
            output = _slurm_command([*command, "--jobs", ",".join(unknown)])
        except ClusterError:
            continue
        for line in output.splitlines():
            job, _, state = line.strip().partition("|")
            for expanded in _expand_array(job):
                states.setdefault(expanded, state.split()[0] if state else "UNKNOWN")
    return {job_id: states[job_id] for job_id in job_ids if job_id in states}


def _expand_array(job: str) -> list[str]:
    """``123_[0-2,5%4]`` -> 123_0, 123_1, 123_2, 123_5; ``123_4`` and ``123`` as they are."""
    match = re.fullmatch(r"(\d+)_\[([\d,\-]+)(?:%\d+)?\]", job)
    if not match:
        return [job]
    indices: list[int] = []
    for part in match.group(2).split(","):
        low, _, high = part.partition("-")
        indices.extend(range(int(low), int(high or low) + 1))
    return [f"{match.group(1)}_{index}" for index in indices]


def _slurm_command(command: list[str]) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ClusterError(f"{command[0]} failed: {error}") from None
    if result.returncode:
        message = " ".join((result.stderr or result.stdout).split())
        raise ClusterError(f"{command[0]} failed: {message}")
    return result.stdout


@dataclass
class Earlier:
    """The cells of a run that were submitted before: which are still queued or running (job id
    -> cell), which were submitted again because their job left no record that counts."""

    in_flight: dict[str, Cell] = field(default_factory=dict)
    ended: list[tuple[Cell, str]] = field(default_factory=list)
    unknown: dict[str, Cell] = field(default_factory=dict)


def reconcile(cells: Sequence[Cell], results_dir: Path, *, preset: str) -> Earlier:
    """Sort the ``cells`` without a record that have a submission note: jobs still active are
    followed, jobs that ended are recorded (or their note dropped, see :func:`record_end`), jobs
    SLURM no longer knows are reported as unknown."""
    noted = {job_id: cell for cell in cells if (job_id := submitted_job(results_dir, cell))}
    states = job_states(list(noted))
    earlier = Earlier()
    for job_id, cell in noted.items():
        state = states.get(job_id)
        if state is None:
            earlier.unknown[job_id] = cell
        elif state in ACTIVE_STATES:
            earlier.in_flight[job_id] = cell
        else:
            earlier.ended.append((cell, record_end(cell, job_id, state, results_dir, preset=preset)))
    return earlier


def record_end(cell: Cell, job_id: str, state: str, results_dir: Path, *, preset: str) -> str:
    """A job ended in ``state`` without the cell's record: record the cell's outcome (``timeout``,
    ``oom``, ``crashed``), or, for a job cancelled or lost with its node, drop its note so that
    the next run submits the cell again. Returns the status (the SLURM state, lower case, when
    nothing was recorded)."""
    record = read_record(results_dir, cell)
    if record is not None:
        submitted_path(results_dir, cell).unlink(missing_ok=True)
        return str(record.get("status"))
    if state in UNRECORDED_STATES:
        submitted_path(results_dir, cell).unlink(missing_ok=True)
        return state.lower()
    status = {"TIMEOUT": "timeout", "OUT_OF_MEMORY": "oom"}.get(state, "crashed")
    record_failure(results_dir, cell, status=status, preset=preset, device="slurm", seconds=0.0,
                   error=f"SLURM job {job_id} ended {state} without writing the cell's record; "
                         f"its log: {job_log(results_dir, job_id)}")
    submitted_path(results_dir, cell).unlink(missing_ok=True)
    return status


def job_log(results_dir: Path, job_id: str) -> Path:
    """The job's standard error, as submitit names it."""
    return log_folder(results_dir) / job_id / f"{job_id}_0_log.err"


Callback = Callable[[Cell, str, float], None]


def follow(jobs: Mapping[str, Cell], results_dir: Path, *, preset: str, on_done: Callback | None = None,
           poll_seconds: float = 1.0) -> None:
    """Wait until every job has ended: a record that appears is the cell's end; SLURM's state is
    asked for the others, less often as the wait grows (every 2 s at first, at most every 60 s)."""
    waiting = dict(jobs)
    # A cell run again (--retry-failed) has its earlier record until the job writes the new one.
    earlier = {job_id: _modified(record_path(results_dir, cell)) for job_id, cell in waiting.items()}
    started = last_asked = time.time()
    while waiting:
        time.sleep(poll_seconds)
        elapsed = time.time() - started
        for job_id, cell in list(waiting.items()):
            if _modified(record_path(results_dir, cell)) == earlier[job_id]:
                continue
            record = read_record(results_dir, cell)
            if record is not None:
                submitted_path(results_dir, cell).unlink(missing_ok=True)
                del waiting[job_id]
                if on_done:
                    on_done(cell, str(record.get("status")), elapsed)
        if not waiting or time.time() - last_asked < min(60.0, max(2.0, elapsed / 10)):
            continue
        last_asked = time.time()
        for job_id, state in job_states(list(waiting)).items():
            if state not in ACTIVE_STATES:
                cell = waiting.pop(job_id)
                status = record_end(cell, job_id, state, results_dir, preset=preset)
                if on_done:
                    on_done(cell, status, elapsed)


def _modified(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


Say = Callable[[str], None]


def earlier_submissions(todo: Sequence[Cell], results_dir: Path, *, preset: str, resubmit: bool,
                        say: Say) -> tuple[list[Cell], dict[str, Cell]]:
    """Split the cells without a record into those to submit now and the jobs of earlier
    submissions to follow (job id -> cell), recording the jobs that ended meanwhile. With
    ``resubmit`` every cell is submitted again, whatever its note says."""
    if resubmit:
        return list(todo), {}
    earlier = reconcile(todo, results_dir, preset=preset)
    for cell, status in earlier.ended:
        say(f"{cell.key}: its earlier job ended: {status}"
            + (" (submitted again)" if status not in FAILED and status != "ok" else ""))
    if earlier.unknown:
        say(f"{len(earlier.unknown)} cells were submitted earlier (jobs "
            f"{', '.join(sorted(earlier.unknown)[:10])}) and SLURM no longer knows their jobs: not "
            "submitted again; --resubmit submits them again")
    if earlier.in_flight:
        say(f"{len(earlier.in_flight)} cells submitted earlier are still queued or running "
            f"(jobs {', '.join(sorted(earlier.in_flight)[:10])}): following them")
    skip = {cell.key for cell in [*earlier.unknown.values(), *earlier.in_flight.values()]}
    skip |= {cell.key for cell, status in earlier.ended if status in FAILED or status == "ok"}
    return [cell for cell in todo if cell.key not in skip], earlier.in_flight


def run_on_slurm(todo: Sequence[Cell], following: Mapping[str, Cell], results_dir: Path, *,
                 device: str, preset: str, overrides: Mapping[str, Any], wait: bool, say: Say,
                 on_done: Callback | None = None) -> None:
    """Submit ``todo`` as one job array (sized by :func:`submission_parameters`), say the job ids
    and how to follow them, and with ``wait`` follow them and ``following`` to their end."""
    jobs = dict(following)
    if todo:
        parameters, kind = submission_parameters(todo, device=device, preset=preset, overrides=overrides)
        submitted = submit(todo, results_dir, parameters=parameters, preset=preset, device=kind)
        jobs.update(submitted)
        first = next(iter(submitted)).split("_")[0]
        say(f"submitted {_count(len(submitted), 'job')} ({'job array' if len(submitted) > 1 else 'job'} "
            f"{first}) on partition {parameters.get('slurm_partition')}, each "
            f"{_count(parameters.get('cpus_per_task'), 'CPU')}, {parameters.get('mem_gb')} GB, "
            f"{_count(parameters.get('gpus_per_node') or 0, 'GPU')}, a time limit of "
            f"{parameters.get('timeout_min')} min ({kind})")
    if not jobs:
        return
    main_ids = ",".join(sorted({job_id.split("_")[0] for job_id in jobs}))
    say(f"follow them: squeue --jobs {main_ids}; logs in {log_folder(results_dir)}/<job id>/")
    if not wait:
        say("run the same command again to collect them (it submits nothing that is queued, "
            "running or finished)")
        return
    follow(jobs, results_dir, preset=preset, on_done=on_done)


def _count(number: Any, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"
