"""The SLURM executor against a real single-node SLURM (munged, slurmdbd, slurmctld and slurmd on
this machine, started by scripts/slurm_local.sh): a submission that SLURM refuses; a sweep
submitted as a job array with the default resources and collected; a sweep submitted without
waiting and collected later, with a job that outlives its time limit; a job cancelled mid-run,
after which a re-run submits only that cell; a node lost mid-run and brought back.

The cells are the time-series task cut to 5 training steps and 16 evaluation windows; a "slow"
cell (a million steps) runs until it is cancelled or its time limit stops it. Skipped where SLURM
cannot be started (not root, packages missing: `scripts/slurm_local.sh install`)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from runners.cli import main

pytestmark = pytest.mark.slurm

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm_local.sh"
TINY = ["smoke", "task=time_series", "max_eval_windows=16"]
FAST = [*TINY, "steps=5"]
# Two cells: one of 5 steps, one that trains until SLURM stops it.
FAST_AND_SLOW = [*TINY, "attention=softmax", "steps=5,1000000", "epochs=1000",
                 "patience=1000"]
ONE_CPU = ["--executor", "slurm", "--slurm", "cpus_per_task=1", "--slurm", "mem_gb=2"]


def _script(command: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), command], capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A single-node SLURM for this module, stopped afterwards; SLURM_CONF points clients at it."""
    env = {**os.environ, "ATTNBENCH_SLURM_DIR": str(tmp_path_factory.mktemp("slurm"))}
    usable = _script("check", env)
    if usable.returncode:
        pytest.skip(f"no local SLURM: {usable.stderr.strip()}")
    started = _script("start", env)
    if started.returncode:
        _script("stop", env)
        pytest.skip(f"SLURM did not start: {started.stderr.strip()[-500:]}")
    conf = started.stdout.strip().rpartition("SLURM_CONF=")[2]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", conf)
        patch.setenv("PATH", f"{os.environ['PATH']}:/usr/sbin")
        yield env
    _script("stop", env)


def sacct(job_id: str, *fields: str) -> list[dict[str, str]]:
    """Every run of the job (``--duplicates``: a requeued job has one row per run)."""
    output = subprocess.run(["sacct", "--jobs", job_id, "--allocations", "--duplicates", "--parsable2",
                             f"--format={','.join(['JobID', 'State', *fields])}"],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    names = output[0].split("|")
    return [dict(zip(names, line.split("|"))) for line in output[1:]]


def records(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in (results / "runs").rglob("*.json")]


def by_steps(found: list[dict]) -> dict[int, dict]:
    """The records of the 5-step and the slow cell, by their ``steps``."""
    return {record["cell"]["overrides"]["steps"]: record for record in found}


def notes(results: Path) -> dict[str, str]:
    """Submission notes: file name -> job id."""
    return {p.name: json.loads(p.read_text())["job_id"] for p in (results / "runs").rglob("*.submitted")}


def wait_until(condition: Callable[[], object], seconds: float, what: str) -> object:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)
    raise AssertionError(f"waited {seconds:g} s for {what}")


def in_background(action: Callable[[], None]) -> threading.Thread:
    """Runs ``action`` beside a following ``attnbench run``; its failure fails the test."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            action()
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.errors = errors  # type: ignore[attr-defined]
    thread.start()
    return thread


def joined(thread: threading.Thread) -> None:
    thread.join(timeout=180)
    assert not thread.is_alive(), "the background action did not end"
    if thread.errors:  # type: ignore[attr-defined]
        raise thread.errors[0]  # type: ignore[attr-defined]


def test_a_refused_submission_is_one_line_with_slurms_message(slurm, tmp_path, capsys):
    results = tmp_path / "results"
    code = main(["run", *FAST, "attention=softmax", "--executor", "slurm", "--slurm", "gpus_per_node=1",
                 "--results-dir", str(results)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [
        "attnbench: sbatch refused the jobs: Invalid generic resource (gres) specification "
        "(parameter gpus_per_node=1; change it with --slurm gpus_per_node=VALUE)"]
    assert not notes(results) if (results / "runs").exists() else True


def test_a_sweep_runs_as_a_job_array_with_resources_that_fit_a_cpu_partition(slurm, tmp_path, capsys):
    """The issue's command with no resource flag: no GPU asked for, CPUs and memory capped by
    the node (2 CPUs here), one array of two jobs, both records written, no note left."""
    results = tmp_path / "results"
    code = main(["run", *FAST, "attention=softmax,lavo", "--executor", "slurm",
                 "--slurm", "slurm_partition=debug", "--results-dir", str(results)])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 0, out
    assert "submitted 2 jobs (job array" in out and "squeue --jobs" in out and "logs in" in out
    found = records(results)
    assert [r["status"] for r in found] == ["ok", "ok"]
    assert not notes(results)
    array = out.split("(job array ")[1].split(")")[0]
    runs = sacct(array, "AllocTRES", "Partition")
    assert sorted(run["JobID"] for run in runs) == [f"{array}_0", f"{array}_1"]
    cpus = int(subprocess.run(["sinfo", "--noheader", "--format=%c"], capture_output=True,
                              text=True).stdout.split()[0])
    wait_until(lambda: all(run["State"] == "COMPLETED" for run in sacct(array)), 60, "the jobs to end")
    for run in runs:
        assert run["Partition"] == "debug"
        assert f"cpu={min(4, cpus)}" in run["AllocTRES"] and "gpu" not in run["AllocTRES"]
    assert len({r["provenance"]["slurm_job_id"] for r in found} - {None}) == 2


@pytest.fixture(scope="module")
def over_time_limit(slurm, tmp_path_factory) -> dict:
    """A 5-step cell and a slow one with a one-minute time limit, submitted with --no-wait when
    first asked for; collected by a later test, so that the minute or more SLURM takes to stop
    the slow job is spent running other tests. No warning before the limit
    (slurm_signal_delay_s=0: SLURM may send it up to a minute early, which would stop the 5-step
    cell too): SLURM kills the slow job at its limit."""
    results = tmp_path_factory.mktemp("time_limit") / "results"
    command = ["run", *FAST_AND_SLOW, *ONE_CPU, "--slurm", "timeout_min=1",
               "--slurm", "slurm_signal_delay_s=0", "--results-dir", str(results)]
    started = time.time()
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = main([*command, "--no-wait"])
    return {"results": results, "command": command, "code": code, "out": " ".join(out.getvalue().split()),
            "seconds": time.time() - started, "notes": notes(results)}


def test_submitted_without_waiting_the_command_returns_with_the_job_ids(over_time_limit):
    assert over_time_limit["code"] == 0 and over_time_limit["seconds"] < 30
    out = over_time_limit["out"]
    assert "submitted 2 jobs (job array" in out and "squeue --jobs" in out and "logs in" in out
    assert len(over_time_limit["notes"]) == 2


def test_a_cancelled_job_is_submitted_again_and_nothing_else(slurm, tmp_path, capsys):
    results = tmp_path / "results"
    command = ["run", *FAST_AND_SLOW, *ONE_CPU, "--results-dir", str(results)]

    def cancel_the_slow_cell() -> None:
        wait_until(lambda: 5 in by_steps(records(results)), 120, "the 5-step cell's record")
        [job] = notes(results).values()
        subprocess.run(["scancel", job], check=True)

    canceller = in_background(cancel_the_slow_cell)
    assert main(command) == 1
    joined(canceller)
    out = " ".join(capsys.readouterr().out.split())
    assert "cancelled" in out and "1 cells of this sweep have none yet" in out
    assert set(by_steps(records(results))) == {5} and not notes(results)
    finished = {p: p.read_bytes() for p in (results / "runs").rglob("*.json")}

    assert main([*command, "--no-wait"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "1 already finished" in out and "1 to run" in out and "submitted 1 job (job" in out
    [job] = notes(results).values()
    subprocess.run(["scancel", job], check=True)
    assert {p: p.read_bytes() for p in (results / "runs").rglob("*.json")} == finished


def test_collected_later_with_the_job_beyond_its_time_limit_recorded_as_timeout(over_time_limit, capsys):
    """The same command again follows the jobs still queued or running (submitting nothing),
    records the 5-step cell, and the cell whose job SLURM killed at its limit as `timeout`."""
    results = over_time_limit["results"]
    assert main(over_time_limit["command"]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "cells submitted earlier are still queued or running" in out
    assert "0 to run" in out and "(job array" not in out
    found = by_steps(records(results))
    assert found[5]["status"] == "ok"
    assert found[1000000]["status"] == "timeout", found[1000000]
    assert "ended TIMEOUT without writing the cell's record" in found[1000000]["error"]
    assert not notes(results)


def test_a_node_lost_mid_run_comes_back_and_the_job_is_run_again(slurm, tmp_path, capsys):
    """slurmd and every process of the job killed at once (a node failure): SLURM marks the node
    down and requeues the job; once the node is back the job runs again and the following
    `attnbench run` collects its record as if nothing happened."""
    results = tmp_path / "results"

    def fail_and_resume_the_node() -> None:
        job = wait_until(lambda: next(iter(notes(results).values()), None), 60, "the submission")
        wait_until(lambda: [run["State"] for run in sacct(job)] == ["RUNNING"], 60, "the job to start")
        assert not records(results), "the cell finished before its node could fail"
        subprocess.run([str(SCRIPT), "node-down"], env=slurm, check=True, capture_output=True)
        wait_until(lambda: any(run["State"] == "NODE_FAIL" for run in sacct(job)), 60,
                   "SLURM to notice the lost node")
        subprocess.run([str(SCRIPT), "node-up"], env=slurm, check=True, capture_output=True)

    failer = in_background(fail_and_resume_the_node)
    code = main(["run", *FAST, "attention=softmax", *ONE_CPU, "--results-dir", str(results)])
    joined(failer)
    out = " ".join(capsys.readouterr().out.split())
    assert code == 0, out
    [record] = records(results)
    assert record["status"] == "ok" and not notes(results)
    job = record["provenance"]["slurm_job_id"]
    wait_until(lambda: [run["State"] for run in sacct(job)] == ["NODE_FAIL", "COMPLETED"], 60,
               "SLURM to account the failed run and the completed one")
