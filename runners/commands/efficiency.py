"""``attnbench efficiency``: time and peak memory of each mechanism versus length."""

from __future__ import annotations

import argparse
import itertools
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runners.checks import InputError, integer, writable_folder
from runners.commands.common import (
    DEFAULT_RESULTS,
    TERMINAL_WIDTH,
    comma_list,
    make_console,
    pattern_value,
)

if TYPE_CHECKING:
    from rich.console import Group
    from rich.table import Table


def _lengths(text: str) -> list[int]:
    try:
        lengths = [int(part) for part in comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"lengths must be integers, got {text!r}") from None
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"lengths must be positive integers, got {text!r}")
    return sorted(lengths)


def _parse_per_attention_args(items: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """``["lavo:r=32,w=16", "lavo:r=8"]`` -> {"lavo": [{"r": 32, "w": 16}, {"r": 8}]}, typed and
    checked: a name given again is another variant of that mechanism."""
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

    attentions = comma_list(args.attention) if args.attention else list_attentions()
    for name in attentions:
        attention_spec(name)  # unknown names fail here, naming the valid ones
    names = comma_list(args.patterns) if args.patterns else args.preset_patterns
    patterns = [pattern_value(p) for p in names]
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

    console = make_console()
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
        f"{'whole layer' if args.layer else 'attention core'}")
    console.print("  timing: " + ("triton do_bench (median)" if timer == "do_bench" else
                                  f"median of {args.repeats} after {args.warmup} warm-up, "
                                  f"interleaved ({timer})"))

    def progress(record: dict[str, Any]) -> None:
        from rich.markup import escape

        console.print(escape(progress_line(record)))

    records = run_efficiency(cells, results_dir=args.results_dir, warmup=args.warmup,
                             repeats=args.repeats, timer=args.timer, on_result=progress)
    console.print(summary_table(records, args.lengths))
    run_dir = args.results_dir / "efficiency" / records[0]["run_id"] if records else None
    console.print(f"records: {run_dir}")
    return 1 if any(r["status"] == "error" for r in records) else 0


def progress_line(record: dict[str, Any]) -> str:
    """One finished cell within 100 columns: forward / forward+backward median ms, their IQR and
    the load average around it (the record keeps the minima too); the IQR and load are left
    out where the mechanism's name is too long for them."""
    cell, status = record["cell"], record["status"]
    m, load = record.get("metrics", {}), record.get("load_average") or {}
    head = f"  {cell['attention']} {cell['pattern']} L={cell['length']} {status}"
    if status != "ok":
        return f"{head} {record.get('error', '')}"[:TERMINAL_WIDTH]
    times = f" {m['forward_ms']:.2f} / {m['forward_backward_ms']:.2f} ms"
    detail = (f" (IQR {m['forward_ms_iqr']:.2f} / {m['forward_backward_ms_iqr']:.2f}, load "
              f"{load['before'][0]:.1f}->{load['after'][0]:.1f})" if load.get("before") else "")
    line = head + times + detail
    return line if len(line) <= TERMINAL_WIDTH else head + times


def _ms(value: float) -> str:
    """A time in ms with three or more significant digits: 1234, 56.7, 8.90."""
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


KEY = ("Each length: forward+backward median ms, ± its IQR, forward median ms (f), peak MiB of "
       "forward+backward. k: the exponent of time ~ n^k (forward+backward); eff. length: CAB's "
       "efficiency length, from which it is faster than softmax.")
"""The first line of the legend under the efficiency tables."""


@dataclass
class _Legend:
    """What the tables point to: variant labels ([1]), failures ([a]) and length-bound
    hyperparameters, printed under the tables."""

    variants: dict[str, str] = field(default_factory=dict)  # full label -> marker
    failures: list[str] = field(default_factory=list)
    follows: dict[str, tuple[str, ...]] = field(default_factory=dict)  # name -> hyperparameters

    def variant(self, name: str, label: str) -> str:
        """The row name: the mechanism's name, with a marker when it has hyperparameters."""
        if label == name:
            return name
        marker = self.variants.setdefault(label, f"[{len(self.variants) + 1}]")
        return f"{name} {marker}"

    def failure(self, label: str, record: dict[str, Any]) -> str:
        marker = f"[{chr(ord('a') + len(self.failures) % 26)}]"
        self.failures.append(f"{marker} {label} L={record['cell']['length']}: "
                             f"{record.get('error') or record['status']}")
        return f"{record['status'].upper()} {marker}"

    def renderable(self) -> Table:
        from rich.markup import escape
        from rich.table import Table

        grid = Table.grid(padding=(0, 1))
        grid.add_column(overflow="fold")
        lines = [KEY] + [f"{marker} {label}" for label, marker in self.variants.items()]
        lines += [f"{name}: {', '.join(names)} = the timed length L (it bounds the length)"
                  for name, names in sorted(self.follows.items())]
        for line in lines + self.failures:
            grid.add_row(escape(line))
        return grid


def _cell_text(record: dict[str, Any] | None, label: str, legend: _Legend) -> str:
    """A length's cell, one figure a line (narrow columns): forward+backward median, ± its IQR,
    forward median, peak MiB."""
    if record is None:
        return ""
    if record["status"] != "ok":
        return legend.failure(label, record)
    m = record["metrics"]
    return (f"{_ms(m['forward_backward_ms'])}\n±{_ms(m.get('forward_backward_ms_iqr', 0))}\n"
            f"f {_ms(m['forward_ms'])}\n{m['forward_backward_peak_mib']:.0f} MiB")


def _grouped(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, dict[int, Any]]]:
    """(pattern, scope) -> full label -> length -> record, in a stable order."""
    from tasks.base import attention_label

    grouped: dict[tuple[str, str], dict[str, dict[int, Any]]] = defaultdict(lambda: defaultdict(dict))
    for record in records:
        cell = record["cell"]
        label = attention_label(cell["attention"], cell["attention_args"])
        grouped[(cell["pattern"], cell.get("scope") or "core")][label][cell["length"]] = record
    return {key: dict(sorted(rows.items())) for key, rows in sorted(grouped.items())}


def _fit(by_length: dict[int, Any], reference: dict[int, Any], lengths: Sequence[int],
         is_reference: bool) -> tuple[str, str]:
    """The fitted exponent k of forward+backward time ~ n^k and the efficiency length against
    the reference (softmax) rows, as table text."""
    from runners.efficiency import efficiency_length, scaling_exponent

    ok = {n: r["metrics"]["forward_backward_ms"] for n, r in by_length.items()
          if n in lengths and r["status"] == "ok"}
    exponent = scaling_exponent(list(ok), list(ok.values()))
    paired = [(n, t, reference[n]["metrics"]["forward_backward_ms"]) for n, t in sorted(ok.items())
              if n in reference and reference[n]["status"] == "ok"]
    crossing = efficiency_length(*zip(*paired)) if paired and not is_reference else None
    return ("-" if exponent is None else f"{exponent:.2f}",
            "-" if crossing is None else "never" if crossing == float("inf") else f"{crossing:.0f}")


def summary_table(records: list[dict[str, Any]], lengths: Sequence[int]) -> Group:
    """One table per pattern and scope: per length the forward+backward median ms ± its IQR,
    the forward median ms and the peak MiB of forward+backward; the fitted exponent k of
    time ~ n^k (forward+backward) and the efficiency length against softmax. Every variant is
    named in full in the legend under the tables (the rows carry its marker), with each
    failure's reason and the hyperparameters that follow the timed length. Fits 100 columns
    for up to seven lengths."""
    from rich import box
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table

    legend = _Legend()
    tables = []
    for (pattern, scope), rows in _grouped(records).items():
        scope_text = "whole layer" if scope == "layer" else "attention core"
        table = Table(title=f"{pattern}, {scope_text}", box=box.SIMPLE_HEAD,
                      collapse_padding=True, pad_edge=False)
        names = {label: legend.variant(next(iter(by_length.values()))["cell"]["attention"], label)
                 for label, by_length in rows.items()}
        # names stay whole: the numbers wrap first
        table.add_column("attention", overflow="fold", min_width=max(map(len, names.values())))
        for column in (*(f"L={n}" for n in lengths), "k", "eff.\nlength"):
            table.add_column(column, justify="right")
        for label, by_length in rows.items():
            cell = next(iter(by_length.values()))["cell"]
            if cell.get("follows_length"):
                legend.follows[cell["attention"]] = tuple(cell["follows_length"])
            texts = [escape(_cell_text(by_length.get(n), label, legend)) for n in lengths]
            table.add_row(escape(names[label]), *texts,
                          *_fit(by_length, rows.get("softmax", {}), lengths, label == "softmax"))
        tables.append(table)
    return Group(*tables, legend.renderable())


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``attnbench efficiency`` and its options."""
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

