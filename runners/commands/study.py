"""``attnbench study``: a study's stages in order, resumable, one record per cell."""

from __future__ import annotations

import argparse
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runners.checks import InputError, integer, writable_folder
from runners.commands.common import make_console

if TYPE_CHECKING:
    from rich.console import Console

DEFAULT_STUDY_RESULTS = Path("results/study")

STUDY_HELP = """\
Run a study: stages of benchmark matrices, in order. A tuned stage sweeps one setting (the
learning rate) on one seed, chooses its value per mechanism on a validation metric, then runs
more seeds at that value. Records go to --results-dir (results/study); running the same command
again skips finished cells and makes the same choices. `attnbench report results/study` turns
the records into the study's tables and figures.
"""


def short_label(cell: Any, varying: Sequence[str]) -> str:
    """``mqar lavo(w=64) d_model=64 lr=0.00215 seed 1``: the cell by what varies in its stage."""
    from tasks.base import attention_label

    settings = " ".join(f"{k}={cell.settings[k]}" for k in varying if k in cell.settings)
    label = attention_label(cell.attention, cell.attention_args)
    return f"{cell.task} {label} {settings} seed {cell.seed}".replace("  ", " ")


def varying_settings(cells: Sequence[Any]) -> list[str]:
    """The task settings whose values differ between ``cells`` (what a line needs to show)."""
    keys = sorted({k for c in cells for k in c.settings})
    return [k for k in keys if len({repr(c.settings.get(k)) for c in cells}) > 1]


def _make_runner(args: argparse.Namespace, console: Console, varying: list[str]):
    """The function that runs a list of cells (skipping finished ones) and prints each."""
    from rich.markup import escape

    from runners.sweep import is_finished, run_local

    def run(cells: Sequence[Any], preset: str) -> None:
        todo = [c for c in cells if not is_finished(args.results_dir, c)]
        console.print(f"{preset}: {len(cells)} cells, {len(cells) - len(todo)} finished, "
                      f"{len(todo)} to run")
        if args.dry_run or not todo:
            return

        def on_done(cell: Any, status: str, seconds: float) -> None:
            colour = "green" if status == "ok" else "red"
            console.print(f"  [{colour}]{status:>7}[/] {seconds:7.1f} s  "
                          f"{escape(short_label(cell, varying))}")

        run_local(todo, args.results_dir, jobs=args.jobs, devices=[args.device], preset=preset,
                  threads=args.threads, on_done=on_done,
                  on_notice=lambda text: console.print(f"  [yellow]{escape(text)}[/]"))

    return run


def command_study(args: argparse.Namespace) -> int:
    from runners.matrix import MatrixConfigError
    from runners.quiet import captured_prints
    from runners.study import load_study, run_stage, stage_cells

    console = make_console()
    with captured_prints(False):  # importing the tasks prints fairseq's and ESPnet's banners
        study = load_study(args.study)
        stages = [s for s in study.stages if not args.stage or s.name in args.stage]
        unknown = sorted(set(args.stage or ()) - {s.name for s in study.stages})
        if unknown:
            raise InputError(f"unknown stage {', '.join(unknown)} of study {study.name}; "
                             f"stages: {', '.join(s.name for s in study.stages)}")
        try:
            varying = varying_settings([c for s in stages for c in stage_cells(s)])
        except MatrixConfigError as error:
            raise InputError(str(error)) from None
    if not args.dry_run:
        writable_folder(args.results_dir, "--results-dir")
    console.print(f"[bold]attnbench study {study.name}[/]: {study.description}")
    run = _make_runner(args, console, varying)
    previous = signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    try:
        for stage in stages:
            console.print(f"[bold]stage {stage.name}[/]: {stage.description}")
            run_stage(stage, study.name, args.results_dir, run)
    except KeyboardInterrupt:
        console.print("interrupted: finished cells are kept; run the same command to resume")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return _closing(console, args.results_dir)


def _terminate_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _closing(console: Console, results_dir: Path) -> int:
    """The closing line: how many records, how many failed; exit 1 if any failed."""
    from runners.records import scan_records
    from runners.sweep import KIND

    records = scan_records(results_dir / "runs", kind=KIND)[0]
    failed = [r for r in records if r.get("status") != "ok"]
    console.print(f"{len(records)} records in {results_dir / 'runs'}, {len(failed)} not ok; "
                  f"`attnbench report {results_dir}` builds the study's tables")
    return 1 if failed else 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``attnbench study`` and its options."""
    study = commands.add_parser(
        "study", help="run a study: staged matrices, tuned on a validation metric, resumable",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=STUDY_HELP)
    study.add_argument("study", help="a shipped study (mqar, lm, lstf) or the path of a YAML file")
    study.add_argument("--stage", action="append", metavar="NAME",
                       help="run only this stage (repeat for several); default: all, in order")
    study.add_argument("--jobs", type=integer(1), default=1, help="cells at once")
    study.add_argument("--device", default="cpu", help="cpu or one CUDA device (cuda:0)")
    study.add_argument("--threads", type=integer(0, "0: cores / jobs"), default=0,
                       help="CPU threads per cell (default: cores / jobs)")
    study.add_argument("--results-dir", type=Path, default=DEFAULT_STUDY_RESULTS)
    study.add_argument("--dry-run", action="store_true",
                       help="count the cells of each stage (and of the choices made so far)")
    study.set_defaults(handler=command_study)
