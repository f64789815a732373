"""The ``attnbench`` command line: the one entry point of the project."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runners.checks import InputError, integer, is_input_error, writable_folder

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

# torch, the zoo and the tasks are imported by the commands that need them, so that
# `attnbench --help` answers at once.

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
    from rich.console import Console

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
    from attention_zoo import Pattern, attention_spec, list_attentions

    rows = []
    for name in list_attentions():
        spec = attention_spec(name)
        rows.append({
            "name": name,
            **{p.value: p in spec.patterns for p in Pattern},
            "decoding": spec.decoding,
            "uses_layer_input": spec.uses_layer_input,
            "complexity": spec.complexity.value,
            "hyperparameters": {hp.name: {"type": hp.type_name, "default": hp.default}
                                for hp in spec.hyperparameters},
            "summary": spec.summary,
        })
    return rows


def capability_markdown() -> str:
    """The zoo's capability table in Markdown (the README embeds this, generated)."""
    from attention_zoo import Pattern

    header = ["attention", *(p.value for p in Pattern), "decoding", "layer input",
              "complexity", "hyperparameters (default)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in capability_rows():
        marks = ["yes" if row[p.value] else "-" for p in Pattern]
        hps = ", ".join(f"`{k}`={v['default']!r}" for k, v in row["hyperparameters"].items())
        lines.append("| " + " | ".join([
            f"`{row['name']}`", *marks, "yes" if row["decoding"] else "-",
            "yes" if row["uses_layer_input"] else "-", row["complexity"],
            hps or "-",
        ]) + " |")
    return "\n".join(lines) + "\n"


def command_zoo(args: argparse.Namespace) -> int:
    from rich.table import Table

    from attention_zoo import Pattern

    if args.format == "markdown":
        sys.stdout.write(capability_markdown())
        return 0
    rows = capability_rows()
    if args.pattern:
        rows = [r for r in rows if r[_pattern(args.pattern)]]
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


def _pattern(name: str) -> str:
    """A pattern's name, checked (an :class:`InputError` names the valid ones)."""
    from attention_zoo import Pattern

    try:
        return Pattern.parse(name).value
    except ValueError as error:
        raise InputError(str(error)) from None


def _parse_per_attention_args(items: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """``["lavo:r=32,w=16", "lavo:r=8", ...]`` -> {"lavo": [{"r": 32, "w": 16}, {"r": 8}]}, typed
    and checked: a name given again is another variant of that mechanism."""
    from attention_zoo import AttentionConfigError, parse_attention_args

    parsed: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        name, sep, text = item.partition(":")
        if not sep:
            raise AttentionConfigError(
                f"--attention-args takes NAME:key=value,..., got {item!r}"
            )
        parsed.setdefault(name, []).append(parse_attention_args(name, text))
    return parsed


def _efficiency_cells(args: argparse.Namespace, device: str) -> list[Any]:
    """The cells ``attnbench efficiency`` measures, every input checked first: names, patterns,
    hyperparameters (for selected mechanisms only, and built at the timed shape)."""
    from attention_zoo import AttentionConfigError, attention_spec, build_attention, list_attentions
    from runners.efficiency import default_cells

    attentions = _csv(args.attention) if args.attention else list_attentions()
    for name in attentions:
        attention_spec(name)  # unknown names fail here, naming the valid ones
    patterns = [_pattern(p) for p in (_csv(args.patterns) if args.patterns else args.preset_patterns)]
    hyperparameters = _parse_per_attention_args(args.attention_args)
    unselected = sorted(set(hyperparameters) - set(attentions))
    if unselected:
        raise InputError(f"--attention-args for {', '.join(unselected)}, which --attention does not "
                         f"select ({', '.join(attentions)})")
    for name in attentions:
        supported = [p for p in patterns if attention_spec(name).supports(p)]
        if not supported:
            raise InputError(f"{name} supports none of the patterns {', '.join(patterns)} (it supports "
                             f"{', '.join(sorted(p.value for p in attention_spec(name).patterns))})")
        for pattern, variant in itertools.product(supported, hyperparameters.get(name) or [{}]):
            try:
                build_attention(name, pattern=pattern, heads=args.heads, head_dim=args.head_dim,
                                **variant)
            except AttentionConfigError as error:
                raise InputError(f"{name} at {args.heads} heads x {args.head_dim}, {pattern}: "
                                 f"{error}") from None
    return default_cells(
        attentions, patterns, args.lengths, attention_args=hyperparameters,
        batch=args.batch, heads=args.heads, head_dim=args.head_dim, dtype=args.dtype,
        device=device, scope="layer" if args.layer else "core",
    )


def _efficiency_settings(args: argparse.Namespace) -> str:
    """Fill ``args`` from the chosen preset, check preset, timer and dtype; the device."""
    import torch

    from runners.efficiency import PRESETS, TIMERS

    if args.preset not in PRESETS:
        raise InputError(f"unknown --preset {args.preset!r}; valid: {', '.join(sorted(PRESETS))}")
    if args.timer not in TIMERS:
        raise InputError(f"unknown --timer {args.timer!r}; valid: {', '.join(TIMERS)}")
    preset = PRESETS[args.preset]
    for name in ("batch", "heads", "head_dim", "lengths"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    args.preset_patterns = preset["patterns"]
    if args.dtype not in ("float32", "float16", "bfloat16", "float64"):
        raise InputError(f"unknown --dtype {args.dtype!r}; valid: float32, float16, bfloat16, float64")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not device.startswith("cuda"):
        raise InputError(f"unknown --device {device!r}; valid: auto, cpu, cuda, cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda requested but torch.cuda.is_available() is False")
    return device


def command_efficiency(args: argparse.Namespace) -> int:
    import torch

    from runners.efficiency import fla_cells, fla_unavailable, gpu_timer, run_efficiency

    console = _console()
    device = _efficiency_settings(args)
    cells = _efficiency_cells(args, device)
    writable_folder(args.results_dir, "--results-dir")
    if args.compare_fla:
        reason = fla_unavailable(device)
        if reason:
            console.print(f"[yellow]flash-linear-attention comparison skipped[/]: {reason}")
        else:
            patterns = sorted({c.pattern for c in cells})
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
    from rich.markup import escape
    from rich.table import Table

    from runners.efficiency import efficiency_length, scaling_exponent

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
    from tasks.base import DatasetUnavailable, data_root, get_fetcher, list_datasets

    if args.data_command == "list" or args.data_command is None:
        for name in list_datasets():
            print(name)
        return 0
    fetch = get_fetcher(args.name)  # an unknown name fails here, naming the known ones
    destination = Path(args.dest or data_root() / args.name).expanduser()
    existed = destination.exists()
    try:
        path = fetch(destination)
    except (OSError, DatasetUnavailable) as error:
        if not existed:  # leave no empty or half-written folder behind
            shutil.rmtree(destination, ignore_errors=True)
        if isinstance(error, DatasetUnavailable):
            raise
        raise InputError(f"could not fetch {args.name} into {destination}: {_os_reason(error)}"
                         + ("; nothing was kept" if not existed else "")) from None
    print(f"{args.name}: {path}")
    return 0


def _os_reason(error: BaseException) -> str:
    """An OS or network error in words (urllib wraps the cause in ``reason``)."""
    reason = getattr(error, "reason", None) or getattr(error, "strerror", None) or error
    return f"{type(error).__name__}: {reason}"


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
    from runners.sweep import is_finished, resolve_devices, submitted_job

    if args.executor == "slurm" and shutil.which("sbatch") is None:
        raise InputError("--executor slurm needs SLURM's sbatch on PATH, and this machine has none; "
                         "--executor submitit-local runs the same jobs here")
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

    console = _console()
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
            progress.console.print(f"  [{colour}]{status:>7}[/] {seconds:7.1f} s  "
                                   f"{escape(describe_cell(cell.to_json()))}  ({cell.key})")

        def on_notice(text: str) -> None:
            progress.console.print(f"  [yellow]{escape(text)}[/]")

        if args.executor == "local":
            previous = signal.signal(signal.SIGTERM, _terminate_as_interrupt)
            try:
                run_local(todo, args.results_dir, jobs=args.jobs, devices=devices, preset=preset,
                          threads=args.threads, on_done=on_done, on_notice=on_notice,
                          retry_failed=args.retry_failed)
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
    return _run_summary(console, args.results_dir, cells)


def _run_summary(console: Console, results_dir: Path, cells: Sequence[Any]) -> int:
    """The tables, parameter flags and failures of this sweep's records; the exit status."""
    from rich.markup import escape

    from runners.records import scan_records
    from runners.summary import failures, parameter_flags, summary_tables
    from runners.sweep import KIND

    wanted = {c.key for c in cells}
    records = [r for r in scan_records(results_dir / "runs", kind=KIND)[0] if r["key"] in wanted]
    for table in summary_tables(records):
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


def command_report(args: argparse.Namespace) -> int:
    try:
        from analysis.report import build_report
    except ImportError as error:
        raise SystemExit(f"attnbench report needs the analysis extra ({error.name} is missing): "
                         "pip install -c constraints/cpu.txt -e '.[analysis]'") from None
    if not args.results_dir.is_dir():
        raise InputError(f"no results folder {args.results_dir}")
    out = writable_folder(args.out or args.results_dir / "report", "--out")
    report = build_report(args.results_dir, out, paper_layouts=args.paper)
    print(f"report: {out / 'index.html'} ({len(report.tables)} tables, {len(report.figures)} figures)")
    for problem in report.problems:
        print(f"attnbench: ignored {problem} (listed under problems in the report)", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnbench",
        description="attnbench: an attention zoo and multi-task benchmark for efficient attention.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an input error, not only its message")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    zoo = commands.add_parser("zoo", help="list the registered attention mechanisms")
    zoo.add_argument("--pattern", help="only mechanisms supporting this pattern")
    zoo.add_argument("--format", choices=("table", "markdown", "json"), default="table")
    zoo.set_defaults(handler=command_zoo)

    efficiency = commands.add_parser(
        "efficiency", help="time and peak memory of each mechanism versus sequence length")
    efficiency.add_argument("--attention", help="comma-separated names (default: all registered)")
    efficiency.add_argument("--attention-args", action="append", default=[],
                            metavar="NAME:K=V,...",
                            help="hyperparameters, e.g. lavo:r=32,w=16; the same NAME again adds "
                                 "a variant, measured beside the first")
    efficiency.add_argument("--preset", default="default",
                            help="default: batch 1, 8 x 64, 256..4096, self patterns; cab: CAB's "
                                 "setting, batch 4, d 512 in 8 heads, 256..8192, every pattern. "
                                 "The flags below override it")
    efficiency.add_argument("--patterns", help="comma-separated patterns")
    efficiency.add_argument("--lengths", type=_lengths, help="comma-separated sequence lengths")
    efficiency.add_argument("--batch", type=integer(1))
    efficiency.add_argument("--heads", type=integer(1))
    efficiency.add_argument("--head-dim", type=integer(1))
    efficiency.add_argument("--layer", action="store_true",
                            help="time the whole MultiHeadAttention layer (projections included) "
                                 "instead of the attention core")
    efficiency.add_argument("--compare-fla", action="store_true",
                            help="also time flash-linear-attention's kernels (fla-core, CUDA only)")
    efficiency.add_argument("--timer", default="auto",
                            help="CUDA timer: auto (triton's do_bench when importable, else CUDA "
                                 "events), do_bench, cuda_events")
    efficiency.add_argument("--dtype", default="float32")
    efficiency.add_argument("--device", default="auto", help="cpu, cuda[:N] or auto")
    efficiency.add_argument("--warmup", type=integer(0), default=2)
    efficiency.add_argument("--repeats", type=integer(1), default=7)
    efficiency.add_argument("--threads", type=integer(0, "0: torch's default"), default=0,
                            help="CPU threads (0: torch's)")
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
    try:
        code = args.handler(args)
        sys.stdout.flush()  # here, so that a closed pipe is met inside the try
        return code
    except BrokenPipeError:
        # The reader went away (`attnbench zoo | head`): stop quietly, as other tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as error:
        if args.debug or not is_input_error(error):
            raise
        print(f"attnbench: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
