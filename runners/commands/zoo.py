"""``attnbench zoo``: the registered mechanisms and what each supports."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from runners.commands.common import (
    make_console,
    pattern_value,
)


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
    """The zoo's capability table in Markdown (docs/zoo.md embeds it, generated)."""
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
        rows = [r for r in rows if r[pattern_value(args.pattern)]]
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
    make_console().print(table)
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``attnbench zoo`` and its options."""
    zoo = commands.add_parser("zoo", help="list the registered attention mechanisms")
    zoo.add_argument("--pattern", help="only mechanisms supporting this pattern")
    zoo.add_argument("--format", choices=("table", "markdown", "json"), default="table")
    zoo.set_defaults(handler=command_zoo)

