"""The SLURM executor's decisions that need no cluster: job resources from the device and the
partition (sinfo's answer), sbatch refusals in one line naming the parameter, job-array ids, and
what a job that ended without its record leaves behind. tests/test_slurm.py runs the same
executor against a real SLURM."""

from __future__ import annotations

import dataclasses
import signal

import pytest

from runners import cluster
from runners.cluster import (
    ClusterError,
    Partition,
    job_device,
    job_resources,
    partition_info,
    record_end,
    refusal_message,
)
from runners.matrix import Cell
from runners.sweep import (
    CellTimeout,
    mark_submitted,
    read_record,
    record_failure,
    run_cell,
    submitted_path,
)
from tasks.registry import get_task

pytestmark = pytest.mark.runner

CPU_NODE = Partition(name="debug", cpus=2, memory_mib=21695, gpus=0)
GPU_NODE = Partition(name="gpu", cpus=64, memory_mib=512000, gpus=8)
CELL = Cell(task="time_series", attention="softmax", attention_args={}, overrides={}, settings={}, seed=0)


def test_a_cpu_run_asks_for_no_gpu_and_no_more_than_a_node_has():
    assert job_device("cpu", CPU_NODE) == job_device("auto", CPU_NODE) == "cpu"
    assert job_resources("cpu", CPU_NODE) == {"cpus_per_task": 2, "mem_gb": 16}
    small = Partition(name="tiny", cpus=1, memory_mib=3000, gpus=0)
    assert job_resources("cpu", small) == {"cpus_per_task": 1, "mem_gb": 2}


def test_a_cuda_run_asks_for_one_gpu_per_job():
    assert job_device("auto", GPU_NODE) == job_device("cuda:1", GPU_NODE) == "cuda"
    assert job_device("cpu", GPU_NODE) == "cpu"
    assert job_resources("cuda", GPU_NODE) == {"cpus_per_task": 8, "mem_gb": 64, "gpus_per_node": 1}
    with pytest.raises(ClusterError, match="unknown device 'tpu' for SLURM; valid: auto, cpu, cuda"):
        job_device("tpu", GPU_NODE)


def test_partitions_are_read_from_sinfo_smallest_node_first(monkeypatch):
    answer = ("debug*|2|21695|(null)|infinite\ngpu|64|512000|gpu:a100:8(S:0-1)|2-00:00:00\n"
              "gpu|32+|256000|gpu:4,gpu:v100:2|2-00:00:00\n")
    monkeypatch.setattr(cluster, "_slurm_command", lambda command: answer)
    assert partition_info(None) == Partition(name="debug", cpus=2, memory_mib=21695, gpus=0)
    # (Filtering by name is sinfo's own; here the canned answer lists every partition.)
    assert partition_info("gpu").gpus == 0
    monkeypatch.setattr(cluster, "_slurm_command", lambda command: answer.split("\n", 1)[1])
    assert partition_info("gpu") == Partition(name="gpu", cpus=32, memory_mib=256000, gpus=6,
                                              max_minutes=2880)
    monkeypatch.setattr(cluster, "_slurm_command", lambda command: "")
    with pytest.raises(ClusterError, match="sinfo lists no partition 'nope'"):
        partition_info("nope")


def test_time_limits_read_as_sinfo_prints_them():
    assert [cluster._minutes(text) for text in ("infinite", "45", "30:00", "12:30:00", "2-00:00:00",
                                                "1-06", "UNLIMITED")] == [None, 45, 30, 750, 2880, 1800, None]


def test_the_default_time_limit_fits_the_partition(monkeypatch):
    short = Partition("short", cpus=2, memory_mib=4096, gpus=0, max_minutes=60)
    monkeypatch.setattr(cluster, "partition_info", lambda name: short)
    week = [dataclasses.replace(CELL, timeout=7 * 86400)]
    parameters, kind = cluster.submission_parameters(week, device="auto", preset="paper", overrides={})
    assert kind == "cpu" and parameters["timeout_min"] == 60 and parameters["slurm_partition"] == "short"
    parameters, _ = cluster.submission_parameters(week, device="cpu", preset="paper",
                                                  overrides={"timeout_min": 30, "mem_gb": 1})
    assert parameters["timeout_min"] == 30 and parameters["mem_gb"] == 1


def test_an_sbatch_refusal_names_slurms_message_and_the_parameter():
    parameters = {"slurm_partition": "debug", "gpus_per_node": 1, "mem_gb": 16, "cpus_per_task": 4}
    gres = "sbatch: error: Invalid generic resource (gres) specification\n"
    assert refusal_message(gres, parameters) == (
        "sbatch refused the jobs: Invalid generic resource (gres) specification "
        "(parameter gpus_per_node=1; change it with --slurm gpus_per_node=VALUE)")
    memory = ("sbatch: error: Memory specification can not be satisfied\n"
              "sbatch: error: Batch job submission failed: Requested node configuration is not available\n")
    assert "(parameter mem_gb=16;" in refusal_message(memory, parameters)
    odd = "sbatch: error: Batch job submission failed: Something new\n"
    message = refusal_message(odd, parameters)
    assert message.startswith("sbatch refused the jobs: Batch job submission failed: Something new")
    assert "requested cpus_per_task=4, gpus_per_node=1, mem_gb=16, slurm_partition=debug" in message
    assert "\n" not in message


def test_job_array_ids_expand_as_sacct_and_squeue_print_them():
    assert cluster._expand_array("123_[0-2,5%4]") == ["123_0", "123_1", "123_2", "123_5"]
    assert cluster._expand_array("123_[0-1%1]") == ["123_0", "123_1"]
    assert cluster._expand_array("123_4") == ["123_4"]
    assert cluster._expand_array("77") == ["77"]


@pytest.mark.parametrize(("state", "status"), [
    ("TIMEOUT", "timeout"), ("OUT_OF_MEMORY", "oom"), ("FAILED", "crashed"), ("COMPLETED", "crashed"),
])
def test_a_job_that_ended_without_its_record_records_the_cells_outcome(tmp_path, state, status):
    cell = CELL
    mark_submitted(tmp_path, cell, "41_3")
    assert record_end(cell, "41_3", state, tmp_path, preset="smoke") == status
    record = read_record(tmp_path, cell)
    assert record["status"] == status and f"SLURM job 41_3 ended {state}" in record["error"]
    assert "logs/submitit/41_3/41_3_0_log.err" in record["error"]
    assert not submitted_path(tmp_path, cell).exists()


@pytest.mark.parametrize("state", ["CANCELLED", "NODE_FAIL", "PREEMPTED"])
def test_a_job_cancelled_or_lost_leaves_no_record_and_no_note(tmp_path, state):
    cell = CELL
    mark_submitted(tmp_path, cell, "41_3")
    assert record_end(cell, "41_3", state, tmp_path, preset="smoke") == state.lower()
    assert read_record(tmp_path, cell) is None and not submitted_path(tmp_path, cell).exists()


def test_a_record_written_meanwhile_wins_over_the_jobs_state(tmp_path):
    cell = CELL
    mark_submitted(tmp_path, cell, "41_3")
    record_failure(tmp_path, cell, status="error", error="ValueError: raised by the task", preset="smoke",
                   device="cpu", seconds=1.0)
    assert record_end(cell, "41_3", "CANCELLED", tmp_path, preset="smoke") == "error"
    assert read_record(tmp_path, cell)["error"] == "ValueError: raised by the task"
    assert not submitted_path(tmp_path, cell).exists()


def test_slurms_time_limit_warning_stops_the_cell_as_a_timeout(monkeypatch):
    """submitit's handler of SIGUSR2 raises on a time-out (and requeues on a pre-emption); the
    job's handler turns the time-out into CellTimeout, which run_cell records as `timeout`."""
    import submitit

    def submitits_handler(signum, frame):
        raise submitit.core.utils.UncompletedJobError("timed-out and not checkpointable")

    previous = signal.signal(signal.SIGUSR2, submitits_handler)
    try:
        cluster._stop_at_time_limit_warning()
        with pytest.raises(CellTimeout, match="SLURM's warning that the job's time limit is near"):
            signal.raise_signal(signal.SIGUSR2)
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_a_cell_stopped_by_cell_timeout_is_recorded_as_timeout(tmp_path, monkeypatch):
    task = get_task("time_series")

    def run(*args, **kwargs):
        raise CellTimeout("the job's time limit is near")

    monkeypatch.setattr(task, "prepare", run)
    cell = Cell(task="time_series", attention="softmax", attention_args={}, overrides={},
                settings={}, seed=0)
    assert run_cell(cell, tmp_path) == "timeout"
    record = read_record(tmp_path, cell)
    assert record["status"] == "timeout" and "time limit is near" in record["error"]
