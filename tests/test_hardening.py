"""Bad inputs and faults: each is a clear error before any work, or survived; nothing is counted
twice. One section per class: records, the report's failures, the dry run's shape checks, keys,
messages, processes (death of the coordinator, SIGTERM, two runs on one folder)."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_runners import task_installed  # noqa: F401  (the fixture: the test task, installed)

from runners.cli import main
from runners.matrix import MatrixConfigError, plan
from runners.records import check_record, scan_records, write_record
from runners.summary import error_line, failures
from runners.sweep import check_metrics, is_finished, record_path

pytestmark = pytest.mark.runner

SHAPED_SOURCE = '''
import os
import time

from attnbench_test_task import NextValue
from tasks.base import split_heads


class ShapedValue(NextValue):
    """The next-value task, declaring the shape its one attention role gets; it notes its
    process id when a cell starts, and holds still for ``hold`` seconds if asked."""

    name = "shaped_value"

    @classmethod
    def attention_shapes(cls, config):
        return {"self": split_heads(config.d_model, config.heads, "task shaped_value")}

    def prepare(self, config, run):
        log = os.environ.get("ATTNBENCH_TEST_LOG")
        if log:
            with open(log, "a") as stream:
                stream.write(f"start {os.getpid()} seed={run.seed}\\n")
        time.sleep(float(os.environ.get("ATTNBENCH_TEST_HOLD", "0")))
        return super().prepare(config, run)
'''


@pytest.fixture
def shaped(task_installed):  # noqa: F811  (the fixture imported above)
    """The test task of test_runners and a variant declaring its attention shapes, installed."""
    site = task_installed / "site"
    (site / "attnbench_shaped_task.py").write_text(SHAPED_SOURCE)
    points = site / "attnbench_test_task-0.1.dist-info" / "entry_points.txt"
    points.write_text(points.read_text() + "shaped_value = attnbench_shaped_task:ShapedValue\n")
    yield task_installed
    sys.modules.pop("attnbench_shaped_task", None)


def preset_file(folder: Path, **block) -> Path:
    path = folder / "h.yaml"
    path.write_text(yaml.safe_dump({"defaults": {"timeout": 120}, "blocks": [
        {"task": "shaped_value", "attention": "softmax", "settings": {"steps": 3}, **block}]}))
    return path


def run_command(preset: Path, results: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "runners.cli", "run", str(preset), "--results-dir", str(results), *extra]


def log_lines(folder: Path, prefix: str) -> list[str]:
    log = folder / "executions.log"
    return [line for line in log.read_text().splitlines() if line.startswith(prefix)] if log.exists() else []


def wait_for(condition, seconds: float = 90.0) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "State:\tZ" in status.read_text())


# Records ----------------------------------------------------------------------------------------


def test_unreadable_records_are_named_and_their_cells_recomputed(shaped, capsys):
    preset, results = preset_file(shaped), shaped / "results"
    (cell,) = plan(preset).cells
    record = record_path(results, cell)
    record.parent.mkdir(parents=True)
    record.write_text('{"schema": "attnbench.run/1", "kind": "run", "key": ')  # truncated
    (results / "runs" / "shaped_value" / "empty.json").write_text("")
    (results / "runs" / "other.json").write_text(json.dumps({"schema": "x/9", "kind": "run"}))
    assert main(["run", str(preset), "--results-dir", str(results)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"ignored {record}: not valid JSON" in out and "0 already finished" in out and "1 to run" in out
    assert "empty.json: empty file" in out and "other.json: schema 'x/9'" in out
    assert "shaped_value softmax [steps=3] seed 0" in out  # the cell, named by what it ran
    assert len(log_lines(shaped, "done ")) == 1  # computed, not counted as finished
    assert scan_records(results / "runs", kind="run")[0][0]["status"] == "ok"


def test_a_record_of_another_cell_or_with_a_nan_metric_is_not_finished(shaped):
    (cell,) = plan(preset_file(shaped)).cells
    results = shaped / "results"
    good = {"schema": "attnbench.run/1", "kind": "run", "key": cell.key, "cell": cell.to_json(),
            "status": "ok", "metrics": {"mse": 0.5}}
    write_record(record_path(results, cell), good)
    assert is_finished(results, cell)
    write_record(record_path(results, cell), {**good, "key": "shaped_value/other"})
    assert not is_finished(results, cell)
    write_record(record_path(results, cell), {**good, "metrics": {"mse": math.nan}})
    assert not is_finished(results, cell)
    assert check_record({**good, "metrics": {"mse": math.inf}}) == \
        "status ok but metric 'mse' is inf, not a finite number"
    # A cell stopped by a shorter timeout than this sweep's runs again; by the same one, not.
    write_record(record_path(results, cell), {**good, "status": "timeout", "cell": {**cell.to_json(),
                                                                                    "timeout": 60.0}})
    assert not is_finished(results, cell)  # this sweep allows 120 s
    write_record(record_path(results, cell), {**good, "status": "timeout"})
    assert is_finished(results, cell)


def test_records_follow_the_umask(tmp_path):
    for mask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        previous = os.umask(mask)
        try:
            path = write_record(tmp_path / f"r{mask:o}.json", {"a": 1})
        finally:
            os.umask(previous)
        assert stat.S_IMODE(path.stat().st_mode) == mode


def test_a_non_finite_metric_fails_the_cell():
    class Task:
        name = "t"
        metrics = (type("M", (), {"name": "mse"})(),)

    check_metrics(Task, {"mse": 0.1, "extra": 2})
    with pytest.raises(FloatingPointError, match=r"task t reported non-finite metric\(s\) mse=nan"):
        check_metrics(Task, {"mse": math.nan})
    with pytest.raises(RuntimeError, match=r"did not report declared metric\(s\) \['mse'\]"):
        check_metrics(Task, {"other": 1.0})


# The report shows failures --------------------------------------------------------------------


def _record(task: str, attention: str, seed: int, status: str, **fields) -> dict:
    key = f"{task}/{attention}-seed{seed}-0123456789ab"
    return {"schema": "attnbench.run/1", "kind": "run", "key": key, "status": status, "seed": seed,
            "cell": {"task": task, "attention": attention, "attention_args": fields.pop("args", {}),
                     "overrides": {"steps": 3}, "seed": seed},
            "metrics": {"mse": 0.25 + seed} if status == "ok" else None, **fields}


def test_the_report_counts_failed_cells_lists_them_and_names_bad_files(tmp_path, capsys):
    pytest.importorskip("pandas")
    results = tmp_path / "results"
    records = [_record("toy", "softmax", 0, "ok"), _record("toy", "softmax", 1, "timeout",
                                                            error="stopped after the cell's timeout of 5 s"),
               _record("toy", "lavo", 0, "error", args={"r": 4},
                       error="RuntimeError: fairseq-train failed (exit 1); log: x\n| INFO | step\n"
                             "ValueError: lavo: r=64 exceeds head_dim=32")]
    for record in records:
        write_record(results / "runs" / f"{record['key']}.json", record)
    (results / "runs" / "toy" / "broken.json").write_text("{")
    out = tmp_path / "report"
    assert main(["report", str(results), "--out", str(out)]) == 0
    assert "broken.json: not valid JSON" in capsys.readouterr().err
    index = (out / "index.md").read_text()
    table = (out / "tables" / "task_toy.md").read_text()
    assert "| lavo(r=4) | steps=3 | 0/1 (error) | n/a |" in table  # every run failed: still a row
    assert "| softmax | steps=3 | 1/2 (timeout) | 0.25 (1) |" in table
    failed = (out / "tables" / "failures.md").read_text()
    assert "| toy | lavo(r=4) | steps=3 | 0 | error | RuntimeError: fairseq-train failed (exit 1); log: x " \
           "... ValueError: lavo: r=64 exceeds head_dim=32 |" in failed
    assert "| toy | softmax | steps=3 | 1 | timeout | stopped after the cell's timeout of 5 s |" in failed
    assert "Problems: files that are not valid records" in index and "broken.json" in index
    # Only failed records: the tables still say what ran.
    only_failed = tmp_path / "failed"
    write_record(only_failed / "runs" / "toy" / "x.json", records[2])
    assert main(["report", str(only_failed)]) == 0
    table = (only_failed / "report" / "tables" / "task_toy.md").read_text()
    assert "| lavo(r=4) | steps=3 | 0/1 (error) |" in table


def test_failed_cells_are_named_by_what_they_ran():
    record = _record("toy", "lavo", 2, "error", args={"r": 8, "w": 4},
                     error="RuntimeError: fairseq-train failed (exit 1)\nTraceback\nKeyError: 'x'")
    (line,) = failures([record])
    assert line == ("toy lavo(r=8,w=4) [steps=3] seed 2: error: RuntimeError: fairseq-train failed "
                    "(exit 1) ... KeyError: 'x' (toy/lavo-seed2-0123456789ab)")
    assert error_line("one line") == "one line"


# The dry run checks each mechanism at its task's shapes -------------------------------------------


def test_hyperparameters_are_checked_against_the_task_shapes(shaped, capsys):
    preset = preset_file(shaped, attention="lavo")
    with pytest.raises(MatrixConfigError, match=r"task shaped_value steps=3: lavo cannot run in role 'self' "
                       r"\(2 heads of dimension 8\): lavo: r=32 exceeds the layer input width=16"):
        plan(preset, ["attention.r=4,32"])
    assert main(["run", str(preset), "attention.r=32", "--dry-run"]) == 2
    assert "r=32 exceeds the layer input width=16" in capsys.readouterr().err
    with pytest.raises(MatrixConfigError, match=r"lavo: r=16 exceeds head_dim=8 \(memory='kv'\)"):
        plan(preset, ["attention.r=16", "attention.memory=kv"])
    with pytest.raises(MatrixConfigError, match=r"a width of 16 does not split into 3 heads"):
        plan(preset, ["heads=3"])


def test_equal_models_get_equal_keys_however_spelled(shaped):
    preset = preset_file(shaped, attention="lavo")
    default, explicit, other = (plan(preset, extra).cells[0] for extra in
                                ([], ["attention.r=16"], ["attention.r=4"]))
    # r defaults to min(64, input width) = 16 at 2 heads x 8 (memory="input"): r=16 is the default.
    assert explicit.key == default.key and explicit.attention_args == {}
    assert other.key != default.key and other.attention_args == {"r": 4}


def test_misspelt_task_in_a_preset_is_an_error(shaped):
    with pytest.raises(MatrixConfigError, match=r"unknown task 'shaped_valu': not installed, and close to "
                       r"the installed 'shaped_value' \(a misspelling\?\)"):
        plan(preset_file(shaped, task="shaped_valu"))


def test_a_preset_with_nothing_to_run_is_an_error(shaped, capsys):
    preset = preset_file(shaped, task="some_uninstalled_benchmark")
    assert main(["run", str(preset)]) == 2
    captured = capsys.readouterr()
    assert "nothing to run" in captured.err and "not installed" in captured.out


# Messages instead of tracebacks ------------------------------------------------------------------


def test_malformed_yaml_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("blocks:\n  - task: lm\n    settings: {seq_len: [1, 2}\n")
    assert main(["run", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}, line 3, column" in err and "malformed YAML" in err and "Traceback" not in err
    with pytest.raises(Exception, match="malformed YAML"):  # --debug: the exception itself
        main(["--debug", "run", str(bad), "--dry-run"])


@pytest.mark.parametrize(("argv", "message"), [
    (["run", "smoke", "--threads", "-1"],
     r"--threads: expected an integer >= 0 \(0: cores / jobs\), got '-1'"),
    (["run", "smoke", "--jobs", "0"], r"--jobs: expected an integer >= 1, got '0'"),
    (["efficiency", "--batch", "0"], r"--batch: expected an integer >= 1, got '0'"),
    (["efficiency", "--warmup", "-3"], r"--warmup: expected an integer >= 0, got '-3'"),
    (["efficiency", "--repeats", "0"], r"--repeats: expected an integer >= 1, got '0'"),
])
def test_bad_numbers_are_refused_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize(("argv", "message"), [
    (["efficiency", "--patterns", "causal"],
     r"unknown attention pattern 'causal'; valid: noncausal_self, causal_self"),
    (["efficiency", "--attention", "softmax", "--attention-args", "lavo:r=8"],
     r"--attention-args for lavo, which --attention does not select \(softmax\)"),
    (["efficiency", "--attention", "s4d", "--patterns", "noncausal_cross"],
     r"s4d supports none of the patterns noncausal_cross"),
    (["efficiency", "--attention", "lavo", "--attention-args", "lavo:r=128,memory=kv", "--head-dim",
      "64"], r"lavo at 8 heads x 64, causal_self: lavo: r=128 exceeds head_dim=64"),
    (["efficiency", "--preset", "cabb"], r"unknown --preset 'cabb'; valid: cab, default"),
    (["zoo", "--pattern", "sideways"], r"unknown attention pattern 'sideways'"),
])
def test_bad_efficiency_and_zoo_inputs_are_sentences(argv, message, tmp_path, capsys):
    assert main([*argv, *(["--results-dir", str(tmp_path)] if argv[0] == "efficiency" else [])]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "efficiency").exists()


def test_results_and_report_folders_that_are_files(shaped, capsys):
    pytest.importorskip("pandas")
    preset, file = preset_file(shaped), shaped / "a_file"
    file.write_text("x")
    assert main(["run", str(preset), "--results-dir", str(file)]) == 2
    assert f"--results-dir {file} is a file, not a folder" in capsys.readouterr().err
    results = shaped / "results"
    results.mkdir()
    assert main(["report", str(results), "--out", str(file)]) == 2
    assert f"--out {file} is a file, not a folder" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_results_folder_is_named(shaped, capsys):
    locked = shaped / "locked"
    locked.mkdir(mode=0o500)
    assert main(["run", str(preset_file(shaped)), "--results-dir", str(locked)]) == 2
    assert f"--results-dir {locked} is not writable" in capsys.readouterr().err


def test_unknown_slurm_key_is_named(shaped, capsys):
    argv = ["run", str(preset_file(shaped)), "--executor", "submitit-local",
            "--slurm", "slurm_partitionn=gpu"]
    assert main(argv) == 2
    assert "--slurm: " in (err := capsys.readouterr().err) and "partitionn" in err


def test_a_failed_download_leaves_no_folder(tmp_path, monkeypatch, capsys):
    import urllib.error

    import tasks.registry

    def offline(destination: Path) -> Path:
        destination.mkdir(parents=True)
        (destination / "part").write_text("half")
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tasks.registry, "get_fetcher", lambda name: offline)
    target = tmp_path / "pg19"
    assert main(["data", "fetch", "pg19", "--dest", str(target)]) == 2
    assert not target.exists()
    assert "could not fetch pg19 into" in (err := capsys.readouterr().err)
    assert "Temporary failure in name resolution" in err and "nothing was kept" in err


def test_a_closed_pipe_ends_output_quietly():
    # `true` exits without reading: every write of attnbench meets a closed pipe.
    command = f"{sys.executable} -m runners.cli zoo --format markdown | true"
    done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=60)
    assert done.stderr == ""


def test_help_needs_neither_torch_nor_the_zoo():
    code = ("import sys, contextlib, io\nfrom runners.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "    main(['--help'])\n"
            "print(sorted(m for m in ('torch', 'attention_zoo', 'tasks.base') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr


# Processes ---------------------------------------------------------------------------------------


def test_a_killed_coordinator_takes_its_worker_along_and_a_rerun_trains_no_cell_twice(shaped):
    preset, results = preset_file(shaped), shaped / "results"
    environment = {**os.environ, "ATTNBENCH_TEST_HOLD": "5"}
    coordinator = subprocess.Popen(run_command(preset, results), env=environment,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: log_lines(shaped, "start "))
    finally:
        coordinator.kill()  # kill -9
        coordinator.wait()
    again = subprocess.run(run_command(preset, results), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    worker = int(log_lines(shaped, "start ")[0].split()[1])
    assert not alive(worker)
    assert len(log_lines(shaped, "done ")) == 1  # the killed worker never finished its cell


def test_sigterm_stops_like_ctrl_c_and_says_how_to_resume(shaped):
    environment = {**os.environ, "ATTNBENCH_TEST_HOLD": "60"}
    coordinator = subprocess.Popen(run_command(preset_file(shaped), shaped / "results"), env=environment,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: log_lines(shaped, "start "))
    coordinator.send_signal(signal.SIGTERM)
    out, _ = coordinator.communicate(timeout=30)
    assert coordinator.returncode == 130
    assert "interrupted" in out and "run the same command again to resume" in out
    worker = int(log_lines(shaped, "start ")[0].split()[1])
    wait_for(lambda: not alive(worker), seconds=10)


def test_two_runs_on_one_folder_compute_each_cell_once(shaped):
    preset, results = preset_file(shaped, seed=[0, 1]), shaped / "results"
    environment = {**os.environ, "ATTNBENCH_TEST_HOLD": "1"}
    runs = [subprocess.Popen(run_command(preset, results), env=environment, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=180)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    finished = log_lines(shaped, "done ")
    assert sorted(finished) == sorted(set(finished)) and len(finished) == 2  # each cell once
    both = " ".join(" ".join(outputs).split())
    assert "is being computed by another run (pid" in both
    assert all("2 records in" in " ".join(out.split()) for out in outputs)  # both have the table


# Data readers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "message"), [
    ("when,OT\n2016-07-01 00:00:00,1.0\n", r"no 'date' column \(columns: when, OT\)"),
    ("date,HUFL,OT\n2016-07-01 00:00:00,1.0,2.0\n2016-07-01 01:00:00,abc,2.0\n",
     r"line 3, column 'HUFL': 'abc' is not a finite number$"),
    ('date,HUFL,OT\n2016-07-01 00:00:00,"1,5",2.0\n', r"line 2, column 'HUFL': '1,5' is not a finite "
                                                      r"number \(a decimal comma\? numbers use '\.'\)"),
    ("date,HUFL,OT\n2016-07-01 00:00:00,1.0,2.0\n2016-07-01 01:00:00,1.0,nan\n",
     r"line 3, column 'OT': 'nan' is not a finite number"),
    ("date,HUFL,OT\n2016-07-01 00:00:00,1.0,2.0\n2016-07-01 01:00:00,inf,2.0\n",
     r"line 3, column 'HUFL': 'inf' is not a finite number"),
    ("date,HUFL,OT\n2016-07-01 00:00:00,1.0,2.0\n2016-07-01 01:00:00,1.0,\n",
     r"line 3, column 'OT': '' is not a finite number"),
    ("date,OT\n2016-07-01 00:00:00,1.0\nyesterday,2.0\n",
     r"line 3, column 'date': 'yesterday' is not a date"),
])
def test_time_series_files_are_checked_naming_file_line_and_column(tmp_path, body, message):
    pytest.importorskip("pandas")
    from tasks.base import DataError
    from tasks.time_series.data import read_series

    path = tmp_path / "ETTh1.csv"
    path.write_text(body)
    with pytest.raises(DataError, match=re.escape(str(path)) + ": .*" + message):
        read_series(path)


def test_lm_books_that_are_not_utf8_or_empty_are_named(tmp_path):
    pytest.importorskip("fairseq")
    from tasks.base import DataError
    from tasks.lm.data import book_lines, split_files

    latin = tmp_path / "train" / "latin.txt"
    latin.parent.mkdir()
    latin.write_bytes("first line\ncaf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(DataError, match=re.escape(str(latin)) + r": not UTF-8 text: byte 14 \(line 2\) is "
                       r"b'\\xe9' \(invalid continuation byte\)"):
        book_lines(latin)
    blank = tmp_path / "train" / "blank.txt"
    blank.write_text("\n \n")
    with pytest.raises(DataError, match=re.escape(str(blank)) + ": a book without text"):
        book_lines(blank)
    (tmp_path / "train" / "zero.txt").write_text("")
    with pytest.raises(DataError, match=r"zero.txt: an empty book \(1 of 3 in .*train are empty\)"):
        split_files(tmp_path, "train")


def test_point_clouds_without_finite_points_are_named(tmp_path):
    import numpy as np

    from tasks.base import DataError
    from tasks.point_cloud.data import PCNDataset
    from tasks.point_cloud.pcd import write_pcd

    cloud = np.random.default_rng(0).normal(size=(8, 3))
    holes = cloud.copy()
    holes[[2, 5]] = np.nan
    nothing = np.full((8, 3), np.nan)
    for name, points in (("holes", holes), ("nothing", nothing)):
        write_pcd(tmp_path / f"{name}.pcd", points)
    assert len(PCNDataset._read(tmp_path / "holes.pcd")) == 6  # a partial cloud drops its holes
    with pytest.raises(DataError, match=r"nothing.pcd: none of its 8 points is finite"):
        PCNDataset._read(tmp_path / "nothing.pcd")
    with pytest.raises(DataError, match=r"holes.pcd: point 2 of 8 has a NaN or infinite coordinate; "
                       r"a complete \(ground-truth\) cloud must be finite"):
        PCNDataset._read(tmp_path / "holes.pcd", complete=True)


def test_a_failed_fairseq_train_names_its_exception_first(tmp_path, monkeypatch):
    from tasks.backends import fairseq_training as training

    script = ("import sys; print('| INFO | epoch 001'); sys.stdout.flush(); "
              "raise ValueError('lavo: r=64 > 32')")
    monkeypatch.setattr(training, "train_command", lambda arguments: [sys.executable, "-c", script])
    with pytest.raises(RuntimeError) as error:
        training.run_fairseq_train([], workdir=tmp_path, device="cpu")
    first = str(error.value).splitlines()[0]
    log = tmp_path / "train.log"
    assert first == f"fairseq-train failed (exit 1): ValueError: lavo: r=64 > 32; log: {log}"


def test_the_lm_sweep_of_the_readme_is_checked_at_the_fairseq_model_shape():
    pytest.importorskip("fairseq")
    # The smoke LM is 128 wide in 4 heads: the memory=kv ablation's r=64 cannot fit its head
    # dimension of 32.
    with pytest.raises(MatrixConfigError, match=r"task lm .*: lavo cannot run in role 'self' \(4 heads of "
                       r"dimension 32\): lavo: r=64 exceeds head_dim=32"):
        plan("smoke", ["task=lm", "attention=lavo", "attention.r=16,32,64", "attention.memory=kv"])
    # Made wider through fairseq's own flags, it fits.
    wide = plan("smoke", ["task=lm", "attention=lavo", "attention.r=64", "attention.memory=kv",
                          "lm.fairseq_args=--decoder-embed-dim 256"]).cells
    assert [c.attention_args for c in wide] == [{"memory": "kv"}]  # r=64: the default at d = 64


def test_a_cell_lock_names_its_holder_and_is_free_once_released(tmp_path):
    from runners.locks import CellLock, holder

    path = tmp_path / ".locks" / "t" / "cell.lock"
    assert holder(path) is None
    first, second = CellLock(path), CellLock(path)
    assert first.acquire("pid 1 on host, started now: attnbench run smoke")
    assert not second.acquire("pid 2")  # flock is per open file: a second holder is refused
    assert holder(path) == "pid 1 on host, started now: attnbench run smoke"
    first.release()
    assert holder(path) is None and second.acquire("pid 2") and holder(path) == "pid 2"
    second.release()


def test_time_series_settings_are_checked_against_the_file_size():
    with pytest.raises(MatrixConfigError, match=r"task time_series: .*ETTh1.csv: seq_len=9000 is longer than "
                       r"the training split \(8640 rows\)"):
        plan("smoke", ["task=time_series", "seq_len=9000"])
    with pytest.raises(MatrixConfigError, match=r"ETTh1.csv: the val split has 2976 rows, fewer than "
                       r"seq_len \+ pred_len = 3096"):
        plan("smoke", ["task=time_series", "pred_len=3000"])
    with pytest.raises(MatrixConfigError, match=r"label_len=200 must not exceed seq_len=96"):
        plan("smoke", ["task=time_series", "label_len=200"])


def test_tts_settings_are_checked_against_the_clips_at_hand():
    pytest.importorskip("espnet2")
    with pytest.raises(MatrixConfigError, match=r"task tts_transformer: .*ljspeech_mini: 24 training and "
                       r"4 test clips; eval_clips=9 asks for more"):
        plan("smoke", ["task=tts_transformer", "eval_clips=9"])
