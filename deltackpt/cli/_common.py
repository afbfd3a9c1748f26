"""Shared pieces of the command line: formatting, JSON output, error handling."""

from __future__ import annotations

import datetime as _dt
import functools
import json
import sqlite3
import sys
from collections.abc import Callable
from typing import Any

import click

from .. import open_store
from ..errors import DeltackptError, StorageError, exit_code_for


def when(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def table(headers: list[str], rows: list[list[Any]], right: set[int] | None = None) -> str:
    right = right if right is not None else set(range(1, len(headers)))
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def fmt(row: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))
        ).rstrip()

    return "\n".join([fmt(headers), fmt(["-" * w for w in widths])] + [fmt(r) for r in cells])


def strict(value: Any) -> Any:
    """JSON has no NaN/Infinity: non-finite floats are printed as the strings
    "NaN", "Infinity" and "-Infinity" so strict parsers (jq, JSON.parse) accept the output."""
    if isinstance(value, float) and value != value:
        return "NaN"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def emit_json(data: Any) -> None:
    click.echo(json.dumps(strict(data), indent=2, default=str, allow_nan=False))


def handle_errors(fn: Callable) -> Callable:
    """Turn library errors into one line on stderr and the mapped exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DeltackptError as exc:
            click.echo(f"deltackpt: error: {exc}", err=True)
            sys.exit(exit_code_for(exc))
        except OSError as exc:
            # the filesystem's answer about a path the user gave (missing, a file where a
            # directory should be, permissions, a full disk): it names the path
            click.echo(f"deltackpt: error: {exc}", err=True)
            sys.exit(2)
        except sqlite3.Error as exc:  # the index on a full or failing disk
            path = kwargs.get("path") or (args[0] if args else "")
            click.echo(f"deltackpt: error: {path}: the index (SQLite): {exc}", err=True)
            sys.exit(exit_code_for(StorageError(str(exc))))

    return wrapper


#: a step number as the index holds it (SQLite INTEGER): click reports anything wider
STEP = click.IntRange(-(2**63), 2**63 - 1)

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
path_argument = click.argument("path", type=click.Path(file_okay=False))


def open_existing(path: str, **kw: Any):
    return open_store(path, create=False, **kw)
