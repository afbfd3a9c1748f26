"""Commands over one store: log, show, restore, verify, delete, gc, reindex."""

from __future__ import annotations

import json
import sys

import click

from ..errors import DeltackptError
from ..progress import bar
from ..units import human
from ._common import (
    STEP,
    emit_json,
    handle_errors,
    json_option,
    open_existing,
    path_argument,
    table,
    when,
)

quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bar.")


@click.command("log")
@path_argument
@json_option
@handle_errors
def log_cmd(path: str, as_json: bool) -> None:
    """List the committed steps with their metrics and cost."""
    with open_existing(path) as store:
        infos = store.log()
    if as_json:
        emit_json([i.__dict__ for i in infos])
        return
    rows = []
    for i in infos:
        metrics = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in i.metrics.items()
        )
        rows.append(
            [
                i.step,
                when(i.created_at),
                human(i.logical_bytes),
                human(i.written_bytes),
                ",".join(i.tags),
                metrics,
            ]
        )
    click.echo(
        table(["step", "saved", "logical", "written", "tags", "metrics"], rows, right={0, 2, 3})
    )


@click.command("show")
@path_argument
@click.argument("step", type=STEP, required=False)
@json_option
@handle_errors
def show_cmd(path: str, step: int | None, as_json: bool) -> None:
    """Show the entries (dtype, shape, bytes) of STEP (default: latest)."""
    with open_existing(path) as store:
        if step is None:
            step = store.latest()
            if step is None:
                raise DeltackptError(f"{path}: the store has no steps")
        info = store.info(step)
        entries = store.entries(step)
    if as_json:
        emit_json({"step": info.__dict__, "entries": [e.__dict__ for e in entries]})
        return
    click.echo(
        f"step {info.step}  saved {when(info.created_at)}  "
        f"{len(entries)} entries  {human(info.logical_bytes)} logical  "
        f"{human(info.written_bytes)} written"
    )
    if info.metrics:
        click.echo("metrics: " + json.dumps(info.metrics))
    rows = [
        [e.path, e.kind, e.dtype, "x".join(map(str, e.shape)) or "()", human(e.nbytes), e.blocks]
        for e in entries
    ]
    click.echo(table(["path", "kind", "dtype", "shape", "bytes", "blocks"], rows, right={4, 5}))


def _load_cpu(store, step: int | None, select: list[str] | None, quiet: bool):
    """(step, ``store.load(step, "cpu", select)``) decoded entry by entry under a progress
    bar; re-planned like ``load`` when a concurrent gc moves frames."""
    from ..errors import CorruptionError
    from ..export import StepReader
    from ..flatten import unflatten
    from ..tensors import finish_output

    for attempt in range(3):
        packs_before = store._packs_state()
        try:
            reader = StepReader(store, [step], select)
            s = reader.steps[0]
            values = {}
            with bar(sum(e.nbytes for e in reader.entries[s]), f"restore step {s}",
                     quiet=quiet) as pbar:
                for e, out in reader.iter_raw(s):
                    values[e.idx] = finish_output(e.kind, out, e.attrs,
                                                  f"{store.location}: step {s}, entry '{e.path}'")
                    pbar.update(e.nbytes)
            return s, unflatten(reader.trees[s], values)
        except (FileNotFoundError, CorruptionError):
            if step is not None and step not in store:
                raise store._not_found(step) from None
            if attempt == 2 or not store._worth_replanning(packs_before):
                raise
    raise AssertionError("unreachable")


@click.command("restore")
@path_argument
@click.argument("step", type=STEP, required=False)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="Output file: .safetensors (tensors only) or .pt (full structure).",
)
@click.option("--select", multiple=True, help="Restore only this subtree (repeatable).")
@quiet_option
@handle_errors
def restore_cmd(path: str, step: int | None, output: str, select: tuple[str, ...],
                quiet: bool) -> None:
    """Write STEP (default: latest) to a .safetensors or .pt file.

    A step saved through torch.distributed.checkpoint is written as full tensors under
    their fully qualified names (--select takes name prefixes such as 'model')."""
    from ..export import (
        check_output_file,
        check_weights_only,
        dcp_state,
        is_dcp_step,
        write_pt,
        write_safetensors,
    )

    if not output.endswith((".safetensors", ".pt")):
        raise click.BadParameter("output must end in .safetensors or .pt", param_hint="-o")
    check_output_file(output)
    with open_existing(path) as store:
        step = store.latest() if step is None else step  # one step for the check and the load
        if step is not None and is_dcp_step(store, step):  # shards reassembled, DCP's names
            state = dcp_state(store, step, list(select) or None)
        else:
            step, state = _load_cpu(store, step, list(select) or None, quiet)
    if output.endswith(".pt"):
        check_weights_only(state)  # no file that only loads with pickle's full powers
    if output.endswith(".safetensors"):
        n, skipped = write_safetensors(state, output, metadata={"deltackpt_step": str(step)})
        click.echo(
            f"wrote {n} tensors of step {step} to {output}"
            + (f" ({skipped} non-tensor values left out)" if skipped else ""),
            err=True,
        )
    elif output.endswith(".pt"):
        write_pt(state, output)
        click.echo(f"wrote step {step} to {output}", err=True)
    else:
        raise click.BadParameter("output must end in .safetensors or .pt", param_hint="-o")


@click.command("verify")
@path_argument
@click.option("--step", type=STEP, default=None, help="Check only this step.")
@json_option
@quiet_option
@handle_errors
def verify_cmd(path: str, step: int | None, as_json: bool, quiet: bool) -> None:
    """Re-read and re-hash every block; exit 1 on any problem."""
    with open_existing(path) as store, bar(0, "verify", quiet=quiet or as_json) as pbar:
        result = store.verify(step, progress=pbar)
    if as_json:
        emit_json(
            {
                "ok": result.ok,
                "steps_checked": result.steps_checked,
                "blocks_checked": result.blocks_checked,
                "bytes_checked": result.bytes_checked,
                "problems": result.problems,
                "damaged_steps": result.damaged_steps,
            }
        )
    else:
        for p in result.problems:
            click.echo(p)
        status = "ok" if result.ok else f"{len(result.problems)} problem(s)"
        click.echo(
            f"checked {result.steps_checked} steps, {result.blocks_checked} blocks "
            f"({human(result.bytes_checked)}): {status}"
        )
    if not result.ok:
        sys.exit(1)


@click.command("delete")
@path_argument
@click.argument("steps", type=STEP, nargs=-1, required=True)
@handle_errors
def delete_cmd(path: str, steps: tuple[int, ...]) -> None:
    """Delete STEPS (space is reclaimed by gc)."""
    with open_existing(path) as store:
        for s in steps:
            store.delete(s)
            click.echo(f"deleted step {s}", err=True)


@click.command("gc")
@path_argument
@click.option("--repack-threshold", type=click.FloatRange(0.0, 1.0), default=0.5,
              show_default=True, help="Rewrite packs whose live fraction is below this "
              "(higher: more space back, more bytes rewritten).")
@json_option
@quiet_option
@handle_errors
def gc_cmd(path: str, repack_threshold: float, as_json: bool, quiet: bool) -> None:
    """Remove blocks no step needs and leftovers of interrupted saves."""
    with open_existing(path) as store, bar(0, "gc: repack", quiet=quiet or as_json) as pbar:
        r = store.gc(repack_threshold=repack_threshold, progress=pbar)
    if as_json:
        emit_json(r.__dict__)
        return
    click.echo(
        f"freed {human(r.bytes_freed)}: {r.blocks_deleted} blocks, "
        f"{r.packs_deleted} packs deleted ({r.packs_rewritten} rewritten), "
        f"{r.objects_deleted} leftover objects"
    )


@click.command("reindex")
@path_argument
@json_option
@handle_errors
def reindex_cmd(path: str, as_json: bool) -> None:
    """Rebuild a lost or damaged index from the packs and manifests.

    For an object-storage URL, rebuilds this machine's index cache of the store."""
    from ..reindex import reindex
    from ..remote import is_remote_url

    if is_remote_url(path):
        with open_existing(path) as store:
            r = store.rebuild_cache()
    else:
        r = reindex(path)
    if as_json:
        emit_json(r.__dict__)
        return
    for p in r.problems:
        click.echo(f"warning: {p}", err=True)
    for step, why in sorted(r.steps_lost.items()):
        click.echo(f"step {step} not recovered: {why}", err=True)
    click.echo(
        f"scanned {r.packs_scanned} packs, {r.blocks_found} blocks: recovered "
        f"{len(r.steps_recovered)} steps, lost {len(r.steps_lost)}"
        + (f"; old index kept as {r.old_index}" if r.old_index else "")
    )


COMMANDS = [log_cmd, show_cmd, restore_cmd, verify_cmd, delete_cmd, gc_cmd, reindex_cmd]
