"""The ``deltackpt`` command line: a thin layer over the library.

Every command that prints data takes ``--json``. Library errors become one line
on stderr (``deltackpt: error: ...``) and the exit code of
:data:`deltackpt.errors.EXIT_CODES`; ``verify`` exits 1 when it finds damage.
Each command group lives in its own module and lists its commands in ``COMMANDS``.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

# One module per group of commands; each exports COMMANDS (a list of click commands).
_COMMAND_MODULES = ("_store_cmds", "_hf", "_transfer", "_analysis")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="deltackpt")
def main() -> None:
    """Incremental, content-addressed storage of PyTorch training checkpoints."""


for _name in _COMMAND_MODULES:
    for _command in importlib.import_module(f"{__name__}.{_name}").COMMANDS:
        main.add_command(_command)


def run() -> None:  # pragma: no cover - entry point for python -m
    main(prog_name=os.path.basename(sys.argv[0]) or "deltackpt")
