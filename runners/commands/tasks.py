"""``attnbench tasks``: every task with its roles, the mechanisms that fit each role, its metrics
and presets, read from the task registry without importing any backbone."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.table import Table

# rich and the registry (which imports torch) are imported by the command, so that
# `attnbench --help` answers at once.


def task_rows(names: list[str] | None = None) -> list[dict[str, Any]]:
    """The JSON form of every task's spec (``names``: only those)."""
    from tasks.registry import list_tasks, task_spec

    return [task_spec(name).to_json() for name in names or list_tasks()]


def tasks_table(rows: list[dict[str, Any]]) -> Table:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="attnbench tasks", show_lines=True)
    for column in ("task", "roles (pattern: fitting mechanisms)", "metrics", "presets"):
        table.add_column(column, overflow="fold")
    for row in rows:
        roles = "\n".join(f"{role} ({spec['pattern']}): {', '.join(spec['attentions']) or '-'}"
                          for role, spec in row["roles"].items())
        metrics = "\n".join(f"{m['name']} ({'↑' if m['better'] == 'higher' else '↓'})"
                            for m in row["metrics"])
        name = row["name"] + (f"\n[yellow]needs {', '.join(row['missing_requirements'])}[/]"
                              if row["missing_requirements"] else "")
        table.add_row(name, escape(roles), escape(metrics), ", ".join(row["presets"]))
    return table


def tasks_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| task | role | pattern | fitting mechanisms |", "|---|---|---|---|"]
    for row in rows:
        for role, spec in row["roles"].items():
            lines.append(f"| `{row['name']}` | `{role}` | {spec['pattern']} | "
                         f"{', '.join(spec['attentions']) or '-'} |")
    return "\n".join(lines) + "\n"


def command_tasks(args: argparse.Namespace) -> int:
    rows = task_rows(args.names)
    if args.format == "json":
        print(json.dumps(rows, indent=1, default=str))
    elif args.format == "markdown":
        print(tasks_markdown(rows), end="")
    else:
        from rich.console import Console

        Console(width=max(100, Console().width)).print(tasks_table(rows))
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``attnbench tasks`` on the CLI's subcommands."""
    parser = commands.add_parser(
        "tasks", help="list the tasks: roles, the mechanisms that fit them, metrics, presets")
    parser.add_argument("names", nargs="*", metavar="TASK", help="only these tasks")
    parser.add_argument("--format", choices=("table", "markdown", "json"), default="table")
    parser.set_defaults(handler=command_tasks)
