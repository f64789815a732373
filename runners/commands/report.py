"""``attnbench report``: tables and figures from the records (re-runs nothing)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runners.checks import InputError, writable_folder
from runners.commands.common import (
    DEFAULT_RESULTS,
)

STUDY_DOCS = Path("docs/study")
"""Where a study's report goes by default: it is committed, so that a reader sees the evidence
without running anything."""


def command_report(args: argparse.Namespace) -> int:
    from runners.quiet import captured_prints

    try:
        from analysis.data import efficiency_records, run_records
        from analysis.report import build_report
        from analysis.study import build_study_report, studies_in
    except ImportError as error:
        raise SystemExit(f"attnbench report needs the analysis extra ({error.name} is missing): "
                         "pip install -c constraints/cpu.txt -e '.[analysis]'") from None
    if not args.results_dir.is_dir():
        raise InputError(f"no results folder {args.results_dir}")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out} is a file, not a folder; give a folder")
    records = run_records(args.results_dir)
    if not records and not efficiency_records(args.results_dir):
        raise InputError(f"{args.results_dir} holds no records (runs/ or efficiency/): give the "
                         "folder that `attnbench run`, `study` or `efficiency` wrote (results, "
                         "results/study)")
    with captured_prints(verbose=False):  # the tasks' libraries print banners when imported
        if studies_in(records):
            out = writable_folder(args.out or STUDY_DOCS, "--out")
            page = build_study_report(records, out, command=f"attnbench report {args.results_dir}")
            print(f"study report: {page}")
            return 0
        out = writable_folder(args.out or args.results_dir / "report", "--out")
        report = build_report(args.results_dir, out, paper_layouts=args.paper)
    print(f"report: {out / 'index.html'} ({len(report.tables)} tables, {len(report.figures)} figures)")
    for problem in report.problems:
        print(f"attnbench: ignored {problem} (listed under problems in the report)", file=sys.stderr)
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``attnbench report`` and its options."""
    report = commands.add_parser(
        "report", help="tables and figures from the records in results/ (re-runs nothing)")
    report.add_argument("results_dir", nargs="?", type=Path, default=DEFAULT_RESULTS,
                        help="the results folder (default: results)")
    report.add_argument("--out", type=Path, help="the report folder (default: RESULTS_DIR/report; "
                                                 "docs/study for a study's records)")
    report.add_argument("--paper", action="store_true",
                        help="also the LAVO paper's and CAB's table and figure layouts, n/a where "
                             "no result exists")
    report.set_defaults(handler=command_report)

