"""``attnbench data``: list, download or prepare the full datasets."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from runners.checks import InputError
from runners.commands.common import (
    os_reason,
)


def command_data(args: argparse.Namespace) -> int:
    from tasks.base import DatasetUnavailable, data_root
    from tasks.registry import get_data_tool, get_fetcher, list_data_tools, list_datasets

    if args.data_command == "list" or args.data_command is None:
        for name in list_datasets():
            print(name)
        for name in list_data_tools():
            print(f"{name} (attnbench data prepare {name} --help)")
        return 0
    if args.data_command == "prepare":
        result = get_data_tool(args.name)(list(args.tool_args))
        return result if isinstance(result, int) else 0
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
        raise InputError(f"could not fetch {args.name} into {destination}: {os_reason(error)}"
                         + ("; nothing was kept" if not existed else "")) from None
    print(f"{args.name}: {path}")
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``attnbench data`` and its options."""
    data = commands.add_parser("data", help="list, download or prepare the full datasets")
    data_commands = data.add_subparsers(dest="data_command", metavar="ACTION")
    data_commands.add_parser("list", help="datasets that can be fetched")
    fetch = data_commands.add_parser("fetch", help="download a dataset (needs internet)")
    fetch.add_argument("name", help="dataset name (see `attnbench data list`)")
    fetch.add_argument("--dest", type=Path, help="target folder (default: $ATTNBENCH_DATA/NAME "
                       "or ~/.cache/attnbench/data/NAME)")
    prepare = data_commands.add_parser(
        "prepare", help="run a data-preparation tool (PCN-style generation, LJSpeech durations)")
    prepare.add_argument("name", help="tool name (see `attnbench data list`)")
    prepare.add_argument("tool_args", nargs=argparse.REMAINDER, help="the tool's own arguments")
    data.set_defaults(handler=command_data)

