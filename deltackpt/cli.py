"""The ``deltackpt`` command line: a thin layer over the library.

Every command that prints data takes ``--json``. Library errors become one line
on stderr (``deltackpt: error: ...``) and the exit code of
:data:`deltackpt.errors.EXIT_CODES`; ``verify`` exits 1 when it finds damage.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from . import open_store
from .errors import DeltackptError, exit_code_for


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _when(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _table(headers: list[str], rows: list[list[Any]], right: set[int] | None = None) -> str:
    right = right if right is not None else set(range(1, len(headers)))
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def fmt(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return "\n".join([fmt(headers), fmt(["-" * w for w in widths])] + [fmt(r) for r in cells])


def _strict(value: Any) -> Any:
    """JSON has no NaN/Infinity: non-finite floats are printed as the strings
    "NaN", "Infinity" and "-Infinity" so strict parsers (jq, JSON.parse) accept the output."""
    if isinstance(value, float) and value != value:
        return "NaN"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(_strict(data), indent=2, default=str, allow_nan=False))


def handle_errors(fn: Callable) -> Callable:
    """Turn library errors into one line on stderr and the mapped exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DeltackptError as exc:
            click.echo(f"deltackpt: error: {exc}", err=True)
            sys.exit(exit_code_for(exc))
        except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
            click.echo(f"deltackpt: error: {exc}", err=True)
            sys.exit(2)

    return wrapper


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
path_argument = click.argument("path", type=click.Path(file_okay=False))


def _open_existing(path: str, **kw: Any):
    return open_store(path, create=False, **kw)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="deltackpt")
def main() -> None:
    """Incremental, content-addressed storage of PyTorch training checkpoints."""


@main.command("log")
@path_argument
@json_option
@handle_errors
def log_cmd(path: str, as_json: bool) -> None:
    """List the committed steps with their metrics and cost."""
    with _open_existing(path) as store:
        infos = store.log()
    if as_json:
        _emit_json([i.__dict__ for i in infos])
        return
    rows = []
    for i in infos:
        metrics = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in i.metrics.items())
        rows.append([i.step, _when(i.created_at), _human(i.logical_bytes),
                     _human(i.written_bytes), ",".join(i.tags), metrics])
    click.echo(_table(["step", "saved", "logical", "written", "tags", "metrics"], rows,
                      right={0, 2, 3}))


@main.command("show")
@path_argument
@click.argument("step", type=int, required=False)
@json_option
@handle_errors
def show_cmd(path: str, step: int | None, as_json: bool) -> None:
    """Show the entries (dtype, shape, bytes) of STEP (default: latest)."""
    with _open_existing(path) as store:
        if step is None:
            step = store.latest()
            if step is None:
                raise DeltackptError(f"{path}: the store has no steps")
        info = store.info(step)
        entries = store.entries(step)
    if as_json:
        _emit_json({"step": info.__dict__, "entries": [e.__dict__ for e in entries]})
        return
    click.echo(f"step {info.step}  saved {_when(info.created_at)}  "
               f"{len(entries)} entries  {_human(info.logical_bytes)} logical  "
               f"{_human(info.written_bytes)} written")
    if info.metrics:
        click.echo("metrics: " + json.dumps(info.metrics))
    rows = [[e.path, e.kind, e.dtype, "x".join(map(str, e.shape)) or "()", _human(e.nbytes),
             e.blocks] for e in entries]
    click.echo(_table(["path", "kind", "dtype", "shape", "bytes", "blocks"], rows,
                      right={4, 5}))


@main.command("restore")
@path_argument
@click.argument("step", type=int, required=False)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Output file: .safetensors (tensors only) or .pt (full structure).")
@click.option("--select", multiple=True, help="Restore only this subtree (repeatable).")
@handle_errors
def restore_cmd(path: str, step: int | None, output: str, select: tuple[str, ...]) -> None:
    """Write STEP (default: latest) to a .safetensors or .pt file."""
    from .export import write_pt, write_safetensors

    with _open_existing(path) as store:
        state = store.load(step, select=list(select) or None)
        step = step if step is not None else store.latest()
    if output.endswith(".safetensors"):
        n, skipped = write_safetensors(state, output, metadata={"deltackpt_step": str(step)})
        click.echo(f"wrote {n} tensors of step {step} to {output}"
                   + (f" ({skipped} non-tensor values left out)" if skipped else ""), err=True)
    elif output.endswith(".pt"):
        write_pt(state, output)
        click.echo(f"wrote step {step} to {output}", err=True)
    else:
        raise click.BadParameter("output must end in .safetensors or .pt", param_hint="-o")


@main.command("verify")
@path_argument
@click.option("--step", type=int, default=None, help="Check only this step.")
@json_option
@handle_errors
def verify_cmd(path: str, step: int | None, as_json: bool) -> None:
    """Re-read and re-hash every block; exit 1 on any problem."""
    with _open_existing(path) as store:
        result = store.verify(step)
    if as_json:
        _emit_json({"ok": result.ok, "steps_checked": result.steps_checked,
                    "blocks_checked": result.blocks_checked,
                    "bytes_checked": result.bytes_checked, "problems": result.problems,
                    "damaged_steps": result.damaged_steps})
    else:
        for p in result.problems:
            click.echo(p)
        status = "ok" if result.ok else f"{len(result.problems)} problem(s)"
        click.echo(f"checked {result.steps_checked} steps, {result.blocks_checked} blocks "
                   f"({_human(result.bytes_checked)}): {status}")
    if not result.ok:
        sys.exit(1)


@main.command("stats")
@path_argument
@json_option
@handle_errors
def stats_cmd(path: str, as_json: bool) -> None:
    """Logical vs stored bytes per step and in total, dedup and compression ratios."""
    from .stats import store_stats

    with _open_existing(path) as store:
        stats = store_stats(store)
    if as_json:
        _emit_json(stats)
        return
    rows = [[s["step"], _human(s["logical_bytes"]), _human(s["written_bytes"]),
             _human(s["cumulative_stored_bytes"]), f"{s['dedup_ratio']:.1%}",
             f"{s['compression_ratio']:.2f}x"] for s in stats["steps"]]
    click.echo(_table(["step", "logical", "written", "cumulative", "dedup", "compression"],
                      rows))
    t = stats["total"]
    click.echo(f"\n{t['steps']} steps, {_human(t['logical_bytes'])} logical, "
               f"{_human(t['stored_bytes'])} stored ({t['stored_fraction']:.1%} of full copies)")


@main.command("delete")
@path_argument
@click.argument("steps", type=int, nargs=-1, required=True)
@handle_errors
def delete_cmd(path: str, steps: tuple[int, ...]) -> None:
    """Delete STEPS (space is reclaimed by gc)."""
    with _open_existing(path) as store:
        for s in steps:
            store.delete(s)
            click.echo(f"deleted step {s}", err=True)


@main.command("gc")
@path_argument
@json_option
@handle_errors
def gc_cmd(path: str, as_json: bool) -> None:
    """Remove blocks no step needs and leftovers of interrupted saves."""
    with _open_existing(path) as store:
        r = store.gc()
    if as_json:
        _emit_json(r.__dict__)
        return
    click.echo(f"freed {_human(r.bytes_freed)}: {r.blocks_deleted} blocks, "
               f"{r.packs_deleted} packs deleted ({r.packs_rewritten} rewritten), "
               f"{r.objects_deleted} leftover objects")


@main.command("reindex")
@path_argument
@json_option
@handle_errors
def reindex_cmd(path: str, as_json: bool) -> None:
    """Rebuild a lost or damaged index from the packs and manifests."""
    from .reindex import reindex

    r = reindex(path)
    if as_json:
        _emit_json(r.__dict__)
        return
    for p in r.problems:
        click.echo(f"warning: {p}", err=True)
    for step, why in sorted(r.steps_lost.items()):
        click.echo(f"step {step} not recovered: {why}", err=True)
    click.echo(f"scanned {r.packs_scanned} packs, {r.blocks_found} blocks: recovered "
               f"{len(r.steps_recovered)} steps, lost {len(r.steps_lost)}"
               + (f"; old index kept as {r.old_index}" if r.old_index else ""))


def run() -> None:  # pragma: no cover - entry point for python -m
    main(prog_name=os.path.basename(sys.argv[0]) or "deltackpt")
