"""The ``attnbench`` command line: the one entry point of the project."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from attention_zoo import (
    AttentionConfigError,
    Pattern,
    attention_spec,
    list_attentions,
    parse_attention_args,
)
from runners.efficiency import PRESETS as EFFICIENCY_PRESETS
from runners.efficiency import (
    TIMERS,
    default_cells,
    efficiency_length,
    fla_cells,
    fla_unavailable,
    gpu_timer,
    run_efficiency,
    scaling_exponent,
)

DEFAULT_RESULTS = Path("results")

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


def _console() -> Console:
    # Rich wraps tables at 80 columns when output is not a terminal (logs, CI): widen it.
    return Console(width=None if sys.stdout.isatty() else 200)


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _lengths(text: str) -> list[int]:
    try:
        lengths = [int(part) for part in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"lengths must be integers, got {text!r}") from None
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"lengths must be positive integers, got {text!r}")
    return sorted(lengths)


def capability_rows() -> list[dict[str, Any]]:
    """One row per registered mechanism: patterns, decoding, complexity, hyperparameters."""
    rows = []
    for name in list_attentions():
        spec = attention_spec(name)
        rows.append({
            "name": name,
            **{p.value: p in spec.patterns for p in Pattern},
            "decoding": spec.decoding,
            "mixes_queries": spec.mixes_queries,
            "complexity": spec.complexity.value,
            "hyperparameters": {hp.name: {"type": hp.type_name, "default": hp.default}
                                for hp in spec.hyperparameters},
            "summary": spec.summary,
        })
    return rows


def capability_markdown() -> str:
    """The zoo's capability table in Markdown (the README embeds this, generated)."""
    header = ["attention", *(p.value for p in Pattern), "decoding", "cross mixes queries",
              "complexity", "hyperparameters (default)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in capability_rows():
        marks = ["yes" if row[p.value] else "-" for p in Pattern]
        hps = ", ".join(f"`{k}`={v['default']!r}" for k, v in row["hyperparameters"].items())
        lines.append("| " + " | ".join([
            f"`{row['name']}`", *marks, "yes" if row["decoding"] else "-",
            "yes" if row["mixes_queries"] else "-", row["complexity"],
            hps or "-",
        ]) + " |")
    return "\n".join(lines) + "\n"


def command_zoo(args: argparse.Namespace) -> int:
    if args.format == "markdown":
        sys.stdout.write(capability_markdown())
        return 0
    rows = capability_rows()
    if args.pattern:
        rows = [r for r in rows if r[Pattern.parse(args.pattern).value]]
    if args.format == "json":
        print(json.dumps(rows, indent=1, default=str))
        return 0
    table = Table(title="attention zoo")
    for column in ("attention", *(p.value for p in Pattern), "decoding", "complexity",
                   "hyperparameters"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["name"], *("yes" if row[p.value] else "-" for p in Pattern),
            "yes" if row["decoding"] else "-", row["complexity"],
            ", ".join(f"{k}={v['default']!r}" for k, v in row["hyperparameters"].items()),
        )
    _console().print(table)
    return 0


def _parse_per_attention_args(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["lavo:r=32,w=16", ...]`` -> {"lavo": {"r": 32, "w": 16}}, typed and checked."""
    parsed: dict[str, dict[str, Any]] = {}
    for item in items:
        name, sep, text = item.partition(":")
        if not sep:
            raise AttentionConfigError(
                f"--attention-args takes NAME:key=value,..., got {item!r}"
            )
        parsed[name] = parse_attention_args(name, text)
    return parsed


def command_efficiency(args: argparse.Namespace) -> int:
    console = _console()
    attentions = _csv(args.attention) if args.attention else list_attentions()
    for name in attentions:
        attention_spec(name)  # unknown names fail here, naming the valid ones
    preset = EFFICIENCY_PRESETS[args.preset]
    for name in ("batch", "heads", "head_dim", "lengths"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    patterns = [Pattern.parse(p).value
                for p in (_csv(args.patterns) if args.patterns else preset["patterns"])]
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("attnbench: --device cuda requested but torch.cuda.is_available() is False")
    if args.dtype not in ("float32", "float16", "bfloat16", "float64"):
        raise SystemExit(f"attnbench: unknown --dtype {args.dtype!r}; valid: float32, float16, "
                         "bfloat16, float64")
    cells = default_cells(
        attentions, patterns, args.lengths,
        attention_args=_parse_per_attention_args(args.attention_args),
        batch=args.batch, heads=args.heads, head_dim=args.head_dim, dtype=args.dtype,
        device=device, scope="layer" if args.layer else "core",
    )
    if args.compare_fla:
        reason = fla_unavailable(device)
        if reason:
            console.print(f"[yellow]flash-linear-attention comparison skipped[/]: {reason}")
        else:
            cells += fla_cells(patterns, args.lengths, batch=args.batch, heads=args.heads,
                               head_dim=args.head_dim, dtype=args.dtype, device=device)
    if args.threads:
        torch.set_num_threads(args.threads)
    timer = gpu_timer(args.timer) if device.startswith("cuda") else "perf_counter"
    console.print(
        f"[bold]attnbench efficiency[/] ({args.preset}): {len(cells)} cells on {device} ({args.dtype}), "
        f"batch {args.batch}, {args.heads} heads x {args.head_dim}, "
        f"{'whole MultiHeadAttention layer' if args.layer else 'attention core'}, "
        + ("triton do_bench (median)" if timer == "do_bench"
           else f"median of {args.repeats} after {args.warmup} warm-up, interleaved ({timer})")
    )

    def progress(record: dict[str, Any]) -> None:
        cell, status = record["cell"], record["status"]
        m = record.get("metrics", {})
        detail = (f"{m['forward_ms']:.2f} / {m['forward_backward_ms']:.2f} ms (median; min "
                  f"{m['forward_ms_min']:.2f} / {m['forward_backward_ms_min']:.2f}, IQR "
                  f"{m['forward_ms_iqr']:.2f} / {m['forward_backward_ms_iqr']:.2f}; load "
                  f"{m['load_average']['before'][0]:.1f}->{m['load_average']['after'][0]:.1f})"
                  if status == "ok" else record.get("error", "")[:80])
        console.print(f"  {cell['attention']:>10} {cell['pattern']:>15} L={cell['length']:<6} "
                      f"{status:>5} {detail}")

    records = run_efficiency(cells, results_dir=args.results_dir, warmup=args.warmup,
                             repeats=args.repeats, timer=args.timer, on_result=progress)
    console.print(summary_table(records, args.lengths))
    run_dir = args.results_dir / "efficiency" / records[0]["run_id"] if records else None
    console.print(f"records: {run_dir}")
    return 1 if any(r["status"] == "error" for r in records) else 0


def summary_table(records: list[dict[str, Any]], lengths: Sequence[int]) -> Table:
    """Forward / forward+backward ms and peak MiB per length, the fitted exponent k of
    time ~ n^k (forward+backward), and the efficiency length against softmax."""
    grouped: dict[tuple[str, str, str], dict[int, dict[str, Any]]] = defaultdict(dict)
    for record in records:
        cell = record["cell"]
        args = ",".join(f"{k}={v}" for k, v in sorted(cell["attention_args"].items()))
        name = cell["attention"] + (" [layer]" if cell.get("scope") == "layer" else "")
        grouped[(name, args, cell["pattern"])][cell["length"]] = record
    table = Table(title="forward / forward+backward: median ms, ± the IQR of forward+backward "
                        "(peak MiB of forward+backward)")
    for column in ("attention", "pattern", *(f"L={n}" for n in lengths), "k", "eff. length"):
        table.add_column(column, justify="right")
    for (name, args, pattern), by_length in sorted(grouped.items()):
        cells = []
        measured_lengths, times = [], []
        for n in lengths:
            record = by_length.get(n)
            if record is None:
                cells.append("")
            elif record["status"] != "ok":
                cells.append(record["status"].upper())
            else:
                m = record["metrics"]
                cells.append(f"{m['forward_ms']:.2f} / {m['forward_backward_ms']:.2f} "
                             f"±{m.get('forward_backward_ms_iqr', 0):.2f} "
                             f"({m['forward_backward_peak_mib']:.0f})")
                measured_lengths.append(n)
                times.append(m["forward_backward_ms"])
        exponent = scaling_exponent(measured_lengths, times)
        reference = grouped.get(("softmax" + (" [layer]" if name.endswith(" [layer]") else ""), "", pattern),
                                {})
        paired = [(n, t, reference[n]["metrics"]["forward_backward_ms"])
                  for n, t in zip(measured_lengths, times)
                  if n in reference and reference[n]["status"] == "ok"]
        crossing = (efficiency_length(*zip(*paired)) if paired and not name.startswith("softmax")
                    else None)
        label = name + (f" ({args})" if args else "")
        table.add_row(
            escape(label), pattern, *cells,
            f"{exponent:.2f}" if exponent is not None else "-",
            "-" if crossing is None else ("never" if crossing == float("inf")
                                          else f"{crossing:.0f}"),
        )
    return table


def command_data(args: argparse.Namespace) -> int:
    from tasks.base import data_root, get_fetcher, list_datasets

    if args.data_command == "list" or args.data_command is None:
        for name in list_datasets():
            print(name)
        return 0
    destination = args.dest or data_root() / args.name
    path = get_fetcher(args.name)(destination)
    print(f"{args.name}: {path}")
    return 0


def _submitit_parameters(items: Sequence[str]) -> dict[str, Any]:
    """``["slurm_partition=gpu", "gpus_per_node=2"]`` -> submitit parameters (numbers typed)."""
    parameters: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise AttentionConfigError(f"--slurm takes KEY=VALUE (a submitit parameter such as "
                                       f"slurm_partition=gpu or gpus_per_node=1), got {item!r}")
        for kind in (int, float):
            try:
                parameters[key] = kind(value)
                break
            except ValueError:
                continue
        else:
            parameters[key] = value
    return parameters


def command_run(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from runners.matrix import plan
    from runners.records import read_records
    from runners.summary import failures, parameter_flags, summary_tables
    from runners.sweep import KIND, is_finished, resolve_devices, run_local, run_submitit, submitted_job

    console = _console()
    if args.executor == "slurm" and shutil.which("sbatch") is None:
        raise SystemExit("attnbench: --executor slurm needs SLURM's sbatch on PATH, and this machine "
                         "has none; --executor submitit-local runs the same jobs here")
    expansion = plan(args.preset, args.overrides)
    preset = Path(args.preset).stem
    try:
        devices = resolve_devices(args.device, args.jobs)
    except ValueError as error:
        raise AttentionConfigError(str(error)) from None
    for notice in expansion.notices:
        console.print(f"[yellow]{notice}[/]")
    cells = expansion.cells
    todo = [c for c in cells if not is_finished(args.results_dir, c, retry_failed=args.retry_failed)]
    in_flight = {c.key: job for c in todo if (job := submitted_job(args.results_dir, c))}
    if in_flight and not args.resubmit:
        console.print(f"[yellow]{len(in_flight)} cells were submitted earlier and have no record yet "
                      f"(jobs {', '.join(sorted(set(in_flight.values()))[:10])}): not submitted again; "
                      "--resubmit submits them again (after those jobs died)[/]")
        todo = [c for c in todo if c.key not in in_flight]
    console.print(f"[bold]attnbench run {preset}[/]: {expansion.description}".rstrip(": "))
    console.print(f"{len(cells)} cells, {len(cells) - len(todo)} already finished in "
                  f"{args.results_dir / 'runs'}, {len(todo)} to run "
                  f"({args.executor}" + (f", {args.jobs} at once on {', '.join(devices)})"
                                         if args.executor == "local" else ")"))
    if args.dry_run:
        for cell in cells:
            console.print(f"  {'todo' if cell in todo else 'done'}  {cell.key}")
        return 0
    if not cells:
        console.print("nothing to run: no installed task in this preset (see `attnbench run --help`)")
        return 0

    counts = {"ok": 0, "failed": 0}
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[ok]} ok, [red]{task.fields[failed]} failed[/], "
                             "{task.fields[remaining]} remaining"),
                  TextColumn("ETA"), TimeRemainingColumn(), console=console,
                  disable=not todo) as progress:
        bar = progress.add_task(preset, total=len(todo), ok=0, failed=0, remaining=len(todo))

        def on_done(cell: Any, status: str, seconds: float) -> None:
            counts["ok" if status == "ok" else "failed"] += 1
            done = counts["ok"] + counts["failed"]
            progress.update(bar, advance=1, ok=counts["ok"], failed=counts["failed"],
                            remaining=len(todo) - done)
            colour = "green" if status == "ok" else "red"
            progress.console.print(f"  [{colour}]{status:>7}[/] {seconds:7.1f} s  {cell.key}")

        if args.executor == "local":
            try:
                run_local(todo, args.results_dir, jobs=args.jobs, devices=devices, preset=preset,
                          threads=args.threads, on_done=on_done)
            except KeyboardInterrupt:
                progress.stop()
                console.print(f"interrupted: {counts['ok'] + counts['failed']} cells finished and kept; "
                              "run the same command again to resume")
                return 130
        else:
            cluster = "slurm" if args.executor == "slurm" else "local"
            jobs = run_submitit(todo, args.results_dir, cluster=cluster, preset=preset,
                                parameters=_submitit_parameters(args.slurm), wait=not args.no_wait,
                                on_done=on_done)
            if args.no_wait:
                progress.stop()
                console.print(f"submitted {len(jobs)} jobs (first: {jobs[0].job_id if jobs else '-'}); "
                              "re-run the same command later to collect the table")
                return 0

    wanted = {c.key for c in cells}
    records = [r for r in read_records(args.results_dir / "runs", kind=KIND) if r.get("key") in wanted]
    for table in summary_tables(records):
        console.print(table)
    for line in parameter_flags(records):
        console.print(f"[yellow]parameter flag[/]: {line}")
    for line in failures(records):
        console.print(f"[red]failed[/]: {line}")
    console.print(f"{len(records)} records in {args.results_dir / 'runs'}")
    return 1 if any(r.get("status") != "ok" for r in records) else 0


def command_report(args: argparse.Namespace) -> int:
    try:
        from analysis.report import build_report
    except ImportError as error:
        raise SystemExit(f"attnbench report needs the analysis extra ({error.name} is missing): "
                         "pip install -c constraints/cpu.txt -e '.[analysis]'") from None
    if not args.results_dir.is_dir():
        raise SystemExit(f"attnbench: no results folder {args.results_dir}")
    out = args.out or args.results_dir / "report"
    report = build_report(args.results_dir, out, paper_layouts=args.paper)
    print(f"report: {out / 'index.html'} ({len(report.tables)} tables, {len(report.figures)} figures)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnbench",
        description="attnbench: an attention zoo and multi-task benchmark for efficient attention.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    zoo = commands.add_parser("zoo", help="list the registered attention mechanisms")
    zoo.add_argument("--pattern", help="only mechanisms supporting this pattern")
    zoo.add_argument("--format", choices=("table", "markdown", "json"), default="table")
    zoo.set_defaults(handler=command_zoo)

    efficiency = commands.add_parser(
        "efficiency", help="time and peak memory of each mechanism versus sequence length")
    efficiency.add_argument("--attention", help="comma-separated names (default: all registered)")
    efficiency.add_argument("--attention-args", action="append", default=[],
                            metavar="NAME:K=V,...", help="hyperparameters, e.g. lavo:r=32,w=16")
    efficiency.add_argument("--preset", choices=sorted(EFFICIENCY_PRESETS), default="default",
                            help="default: batch 1, 8 x 64, 256..4096, self patterns; cab: CAB's "
                                 "setting, batch 4, d 512 in 8 heads, 256..8192, every pattern. "
                                 "The flags below override it")
    efficiency.add_argument("--patterns", help="comma-separated patterns")
    efficiency.add_argument("--lengths", type=_lengths, help="comma-separated sequence lengths")
    efficiency.add_argument("--batch", type=int)
    efficiency.add_argument("--heads", type=int)
    efficiency.add_argument("--head-dim", type=int)
    efficiency.add_argument("--layer", action="store_true",
                            help="time the whole MultiHeadAttention layer (projections included) "
                                 "instead of the attention core")
    efficiency.add_argument("--compare-fla", action="store_true",
                            help="also time flash-linear-attention's kernels (fla-core, CUDA only)")
    efficiency.add_argument("--timer", choices=TIMERS, default="auto",
                            help="CUDA timer: auto (triton's do_bench when importable, else CUDA "
                                 "events), do_bench, cuda_events")
    efficiency.add_argument("--dtype", default="float32")
    efficiency.add_argument("--device", default="auto", help="cpu, cuda[:N] or auto")
    efficiency.add_argument("--warmup", type=int, default=2)
    efficiency.add_argument("--repeats", type=int, default=7)
    efficiency.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's)")
    efficiency.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS)
    efficiency.set_defaults(handler=command_efficiency)

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
    run.add_argument("--jobs", type=int, default=1, help="cells at once (local executor)")
    run.add_argument("--device", default="auto",
                     help="auto (every GPU round-robin, else CPU), cpu, or cuda:0,cuda:1")
    run.add_argument("--threads", type=int, default=0,
                     help="CPU threads per cell (default: cores / jobs)")
    run.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS)
    run.add_argument("--retry-failed", action="store_true",
                     help="re-run cells whose record says error, oom, timeout or crashed")
    run.add_argument("--dry-run", action="store_true", help="list the cells, run nothing")
    run.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                     help="a submitit parameter, e.g. slurm_partition=gpu, gpus_per_node=1, "
                          "cpus_per_task=8, mem_gb=64, timeout_min=600, slurm_array_parallelism=16")
    run.add_argument("--no-wait", action="store_true",
                     help="submit the jobs and return (slurm); re-run later to collect")
    run.add_argument("--resubmit", action="store_true",
                     help="run cells submitted earlier that never wrote a record (their jobs died)")
    run.set_defaults(handler=command_run)

    report = commands.add_parser(
        "report", help="tables and figures from the records in results/ (re-runs nothing)")
    report.add_argument("results_dir", nargs="?", type=Path, default=DEFAULT_RESULTS,
                        help="the results folder (default: results)")
    report.add_argument("--out", type=Path, help="the report folder (default: RESULTS_DIR/report)")
    report.add_argument("--paper", action="store_true",
                        help="also the LAVO paper's and CAB's table and figure layouts, n/a where "
                             "no result exists")
    report.set_defaults(handler=command_report)

    data = commands.add_parser("data", help="list or download the full datasets")
    data_commands = data.add_subparsers(dest="data_command", metavar="ACTION")
    data_commands.add_parser("list", help="datasets that can be fetched")
    fetch = data_commands.add_parser("fetch", help="download a dataset (needs internet)")
    fetch.add_argument("name", help="dataset name (see `attnbench data list`)")
    fetch.add_argument("--dest", type=Path, help="target folder (default: $ATTNBENCH_DATA/NAME "
                       "or ~/.cache/attnbench/data/NAME)")
    data.set_defaults(handler=command_data)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may follow options (`run smoke --jobs 2 seed=1`): argparse leaves those here.
    stray = [item for item in extra if item.startswith("-") or "=" not in item]
    if stray or (extra and args.command != "run"):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.command is None:
        parser.print_help()
        return 0
    from tasks.base import DatasetUnavailable

    try:
        return args.handler(args)
    except (AttentionConfigError, DatasetUnavailable) as error:
        print(f"attnbench: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
