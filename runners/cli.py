"""The ``attnbench`` command line: the one entry point of the project.

Each subcommand lives in its own module under :mod:`runners.commands`; torch, the zoo and the tasks
are imported by the commands that need them, so that `attnbench --help` answers at once."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from runners.checks import is_input_error
from runners.commands import COMMANDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnbench",
        description="attnbench: an attention zoo and multi-task benchmark for efficient attention.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an input error, not only its message")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands)
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
    from runners.quiet import quiet_libraries

    if not getattr(args, "verbose", False):
        quiet_libraries()
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
