"""``attnbench run``: a benchmark matrix, one record per cell, locally or on SLURM."""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runners.checks import InputError, integer, writable_folder
from runners.commands.common import (
    DEFAULT_RESULTS,
    TERMINAL_WIDTH,
    make_console,
)

if TYPE_CHECKING:
    from rich.console import Console


RUN_HELP = """\
Run every cell of a preset (task x attention x hyperparameters x settings x seed); each cell
writes results/runs/<task>/<cell>.json. Re-running the same command skips finished cells.

Overrides (KEY=V1,V2,... sweeps the values):
  task=lm,tts              the tasks to run (from those installed)
  attention=lavo,softmax   mechanisms, or `all` (every one supporting the task's roles)
  attention.r=16,32,64     a mechanism hyperparameter, for the mechanisms that declare it
  seed=1,2,3               seeds
  timeout=600              seconds a cell may run (one value)
  seq_len=1024,4096        a task setting (a field of the task's Config), for every task with it
  lm.seq_len=1024          a task setting for one task
"""


def _submitit_parameters(items: Sequence[str], cluster: str) -> dict[str, Any]:
    """``["slurm_partition=gpu", "gpus_per_node=2"]`` -> submitit parameters (numbers typed),
    each checked by submitit itself; an :class:`InputError` names an unknown key."""
    import tempfile

    import submitit

    parameters: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--slurm takes KEY=VALUE (a submitit parameter such as "
                             f"slurm_partition=gpu or gpus_per_node=1), got {item!r}")
        for kind in (int, float):
            try:
                parameters[key] = kind(value)
                break
            except ValueError:
                continue
        else:
            parameters[key] = value
    with tempfile.TemporaryDirectory() as folder:
        try:
            submitit.AutoExecutor(folder=folder, cluster=cluster).update_parameters(**parameters)
        except (NameError, ValueError, TypeError) as error:
            raise InputError(f"--slurm: {str(error).splitlines()[0]}") from None
    return parameters


def _record_problems(console: Console, results_dir: Path) -> None:
    """Name every file in ``results_dir/runs`` that is not a valid record (it is ignored, and
    a cell it stood for runs again)."""
    from rich.markup import escape

    from runners.records import scan_records

    folder = results_dir / "runs"
    if folder.is_dir():
        for problem in scan_records(folder, kind="run")[1]:
            console.print(f"[yellow]ignored {escape(str(problem))} "
                          "(not a valid record; its cell, if in this sweep, runs again)[/]")


def _plan_run(args: argparse.Namespace, console: Console) -> tuple[Any, list[Any], list[Any], list[str]]:
    """Everything ``attnbench run`` checks before any cell: the preset, the overrides, every
    cell's hyperparameters at its task's shapes, the devices, the results folder. Returns the
    expansion, its cells, those still to run, and the devices."""
    from rich.markup import escape

    from runners.matrix import plan
    from runners.quiet import captured_prints
    from runners.sweep import is_finished, resolve_devices, submitted_job

    if args.executor == "slurm" and shutil.which("sbatch") is None:
        raise InputError("--executor slurm needs SLURM's sbatch on PATH, and this machine has none; "
                         "--executor submitit-local runs the same jobs here")
    with captured_prints(args.verbose):  # importing the tasks prints fairseq's and ESPnet's banners
        expansion = plan(args.preset, args.overrides)
    try:
        # A SLURM job's device is decided against the partition (runners.cluster), not here.
        devices = resolve_devices(args.device, args.jobs) if args.executor != "slurm" else []
    except ValueError as error:
        raise InputError(str(error)) from None
    if args.executor != "local":
        cluster = "slurm" if args.executor == "slurm" else "local"
        args.slurm_parameters = _submitit_parameters(args.slurm, cluster)
    for notice in expansion.notices:
        console.print(f"[yellow]{escape(notice)}[/]")
    cells = expansion.cells
    if not cells:
        raise InputError(f"nothing to run: preset {args.preset!r} with these overrides gives no cell "
                         "(the notices above say why)")
    if not args.dry_run:
        writable_folder(args.results_dir, "--results-dir")
    elif args.results_dir.exists() and not args.results_dir.is_dir():
        raise InputError(f"--results-dir {args.results_dir} is a file, not a folder")
    _record_problems(console, args.results_dir)
    todo = [c for c in cells if not is_finished(args.results_dir, c, retry_failed=args.retry_failed)]
    in_flight = {c.key: job for c in todo if (job := submitted_job(args.results_dir, c))}
    # For a SLURM run, SLURM says what became of each earlier job (command_run asks it).
    if in_flight and not args.resubmit and (args.executor != "slurm" or args.dry_run):
        console.print(f"[yellow]{len(in_flight)} cells were submitted earlier and have no record yet "
                      f"(jobs {', '.join(sorted(set(in_flight.values()))[:10])}): not submitted again; "
                      "--resubmit submits them again (after those jobs died)[/]")
        todo = [c for c in todo if c.key not in in_flight]
    return expansion, cells, todo, devices


def _terminate_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def command_run(args: argparse.Namespace) -> int:
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from runners.summary import describe_cell
    from runners.sweep import run_local, run_submitit

    console = make_console()
    expansion, cells, todo, devices = _plan_run(args, console)
    preset = Path(args.preset).stem
    following: dict[str, Any] = {}
    if args.executor == "slurm" and not args.dry_run:
        from runners.cluster import earlier_submissions

        todo, following = earlier_submissions(todo, args.results_dir, preset=preset,
                                              resubmit=args.resubmit,
                                              say=lambda line: console.print(f"[yellow]{escape(line)}[/]"))
    console.print(f"[bold]attnbench run {preset}[/]: {expansion.description}".rstrip(": "))
    console.print(f"{len(cells)} cells, {len(cells) - len(todo) - len(following)} already finished in "
                  f"{args.results_dir / 'runs'}, {len(todo)} to run "
                  f"({args.executor}" + (f", {args.jobs} at once on {', '.join(devices)})"
                                         if args.executor == "local" else ")"))
    if args.dry_run:
        console.print("every cell validated: settings, hyperparameters at each task's attention shapes, "
                      "seeds, timeouts, devices")
        for cell in cells:
            console.print(f"  {'todo' if cell in todo else 'done'}  {cell.key}")
        return 0

    counts = {"ok": 0, "failed": 0}
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[ok]} ok, [red]{task.fields[failed]} failed[/], "
                             "{task.fields[remaining]} remaining"),
                  TextColumn("ETA"), TimeRemainingColumn(), console=console,
                  disable=not todo and not following) as progress:
        total = len(todo) + len(following)
        bar = progress.add_task(preset, total=total, ok=0, failed=0, remaining=total)

        def on_done(cell: Any, status: str, seconds: float) -> None:
            counts["ok" if status == "ok" else "failed"] += 1
            done = counts["ok"] + counts["failed"]
            progress.update(bar, advance=1, ok=counts["ok"], failed=counts["failed"],
                            remaining=total - done)
            colour = "green" if status == "ok" else "red"
            text = f"{seconds:7.1f} s  {describe_cell(cell.to_json())}"
            if len(text) + len(cell.key) + 14 <= TERMINAL_WIDTH:  # the record's name, where it fits
                text += f"  ({cell.key})"
            progress.console.print(f"  [{colour}]{status:>7}[/] {escape(text)}")

        def on_notice(text: str) -> None:
            progress.console.print(f"  [yellow]{escape(text)}[/]")

        if args.executor == "local":
            previous = signal.signal(signal.SIGTERM, _terminate_as_interrupt)
            try:
                run_local(todo, args.results_dir, jobs=args.jobs, devices=devices, preset=preset,
                          threads=args.threads, on_done=on_done, on_notice=on_notice,
                          retry_failed=args.retry_failed, verbose=args.verbose)
            except KeyboardInterrupt:
                progress.stop()
                console.print(f"interrupted: {counts['ok'] + counts['failed']} cells finished and kept, "
                              "the unfinished ones stopped; run the same command again to resume")
                return 130
            finally:
                signal.signal(signal.SIGTERM, previous)
        elif args.executor == "slurm":
            code = _run_on_slurm(args, todo, following, preset=preset, on_done=on_done,
                                 say=progress.console.print)
            if code is not None:
                progress.stop()
                return code
        else:
            jobs = run_submitit(todo, args.results_dir, cluster="local", preset=preset,
                                parameters=args.slurm_parameters, wait=not args.no_wait,
                                on_done=on_done)
            if args.no_wait:
                progress.stop()
                console.print(f"submitted {len(jobs)} jobs (first: {jobs[0].job_id if jobs else '-'}); "
                              "re-run the same command later to collect the table")
                return 0
    return _run_summary(console, args.results_dir, cells, preset)


def _run_summary(console: Console, results_dir: Path, cells: Sequence[Any], preset: str) -> int:
    """The tables, parameter flags and failures of this sweep's records; the exit status."""
    from rich.markup import escape

    from runners.records import scan_records
    from runners.summary import failures, parameter_flags, summary_tables
    from runners.sweep import KIND

    wanted = {c.key for c in cells}
    records = [r for r in scan_records(results_dir / "runs", kind=KIND)[0] if r["key"] in wanted]
    pipeline_check = _pipeline_check_tasks(preset, {r["cell"]["task"] for r in records})
    for table in summary_tables(records, pipeline_check=pipeline_check):
        console.print(table)
    for line in parameter_flags(records):
        console.print(f"[yellow]parameter flag[/]: {escape(line)}")
    for line in failures(records):
        console.print(f"[red]failed[/]: {escape(line)}")
    missing = len(wanted) - len(records)
    console.print(f"{len(records)} records in {results_dir / 'runs'}"
                  + (f"; {missing} cells of this sweep have none yet (run the same command again "
                     "to run them)" if missing else ""))
    return 1 if missing or any(r.get("status") != "ok" for r in records) else 0


def _run_on_slurm(args: argparse.Namespace, todo: list[Any], following: dict[str, Any], *, preset: str,
                  on_done: Any, say: Any) -> int | None:
    """The SLURM executor (runners.cluster); an exit code where the command ends here."""
    from rich.markup import escape

    from runners.cluster import ClusterError, run_on_slurm

    try:
        run_on_slurm(todo, following, args.results_dir, device=args.device, preset=preset,
                     overrides=args.slurm_parameters, wait=not args.no_wait,
                     say=lambda line: say(escape(line)), on_done=on_done)
    except ClusterError as error:
        print(f"attnbench: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        say("stopped following: the jobs go on; run the same command again to collect them")
        return 130
    return 0 if args.no_wait else None


def _pipeline_check_tasks(preset: str, tasks: set[str]) -> list[str]:
    """The tasks whose smoke-preset numbers check the pipeline rather than rank mechanisms."""
    from tasks.registry import get_task

    if preset != "smoke":
        return []
    return sorted(task for task in tasks if not get_task(task).smoke_ranks)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``attnbench run`` and its options."""
    run = commands.add_parser(
        "run", help="run a benchmark matrix: a preset with overrides, one record per cell",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=RUN_HELP)
    run.add_argument("preset", help="a shipped preset (smoke, paper) or the path of a YAML file")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUES",
                     help="sweeps, e.g. attention=lavo,softmax attention.r=16,32 seed=1,2,3")
    run.add_argument("--executor", choices=("local", "slurm", "submitit-local"), default="local",
                     help="local processes (default), SLURM through submitit, or submitit's "
                          "local executor (the SLURM path on this machine)")
    run.add_argument("--jobs", type=integer(1), default=1, help="cells at once (local executor)")
    run.add_argument("--device", default="auto",
                     help="auto (every GPU round-robin, else CPU), cpu, or cuda:0,cuda:1; with "
                          "--executor slurm: cpu (no GPU asked for) or cuda (one GPU per job), and "
                          "auto is cuda where the partition has GPUs (see docs/cluster.md)")
    run.add_argument("--threads", type=integer(0, "0: cores / jobs"), default=0,
                     help="CPU threads per cell (default: cores / jobs)")
    run.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS)
    run.add_argument("--retry-failed", action="store_true",
                     help="re-run cells whose record says error, oom, timeout or crashed")
    run.add_argument("--dry-run", action="store_true", help="list the cells, run nothing")
    run.add_argument("--verbose", action="store_true",
                     help="show the libraries' warnings and log lines (fairseq, ESPnet, hydra, "
                          "torch), which the workers otherwise keep quiet")
    run.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                     help="a submitit parameter, e.g. slurm_partition=gpu, gpus_per_node=1, "
                          "cpus_per_task=8, mem_gb=64, timeout_min=600, slurm_array_parallelism=16")
    run.add_argument("--no-wait", action="store_true",
                     help="submit the jobs and return (slurm); re-run later to collect")
    run.add_argument("--resubmit", action="store_true",
                     help="run cells submitted earlier that never wrote a record (their jobs died)")
    run.set_defaults(handler=command_run)

