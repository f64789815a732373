"""The subcommands of ``attnbench``, one module each: ``add_parser(commands)`` registers the
command and its options (with ``handler`` set to the function that runs it)."""

from runners.commands import data, efficiency, report, run, study, tasks, zoo

COMMANDS = (zoo, tasks, efficiency, run, study, report, data)
"""In the order ``attnbench --help`` lists them."""
