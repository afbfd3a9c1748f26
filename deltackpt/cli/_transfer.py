"""Commands that move weights in and out of a store: export, import, average."""

from __future__ import annotations

import click

from .. import open_store
from ..export import check_output_file
from ..units import human
from ._common import STEP, emit_json, handle_errors, json_option, open_existing, path_argument


def _selection(select: tuple[str, ...], whole: bool) -> list[str] | None:
    if whole and select:
        raise click.UsageError("--all and --select exclude each other")
    if whole:
        return None
    return list(select) or ["model"]


def _size(value: str | None) -> int | None:
    from ..export import parse_size

    if value is None:
        return None
    try:
        return parse_size(int(value) if value.strip().isdigit() else value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--max-shard-size") from None


def _check_output(output: str, max_shard_size: int | None) -> None:
    if max_shard_size is None and not output.endswith((".safetensors", ".pt", ".pth")):
        raise click.BadParameter("must end in .safetensors or .pt (or be a directory, with "
                                 "--max-shard-size)", param_hint="-o")
    if max_shard_size is None:
        check_output_file(output)


select_option = click.option(
    "--select", multiple=True,
    help="Subtree to write (repeatable; default: model). Keys are relative to it when one "
         "is given.")
all_option = click.option("--all", "whole", is_flag=True,
                          help="Write the whole state, keys being full paths.")
shard_option = click.option(
    "--max-shard-size", default=None,
    help="Write a transformers-style sharded directory with shards of at most this many "
         "tensor bytes (e.g. 2GB, 500MiB, 1000000).")


def _report(result, as_json: bool, what: str) -> None:
    if as_json:
        emit_json(result.__dict__)
        return
    extra = f" ({result.skipped} non-tensor values left out)" if result.skipped else ""
    click.echo(f"wrote {result.tensors} tensors ({human(result.nbytes)}) of {what} to "
               f"{len(result.files)} file(s) in {result.seconds:.2f}s{extra}", err=True)
    for f in result.files:
        click.echo(f)


@click.command("export")
@path_argument
@click.argument("step", type=STEP, required=False)
@click.option("-o", "--output", required=True, type=click.Path(),
              help="A .safetensors or .pt file, or a directory with --max-shard-size.")
@select_option
@all_option
@shard_option
@json_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@handle_errors
def export_cmd(path: str, step: int | None, output: str, select: tuple[str, ...], whole: bool,
               max_shard_size: str | None, as_json: bool, quiet: bool) -> None:
    """Write STEP (default: latest) as a deployment artifact (.safetensors, sharded, .pt)."""
    limit = _size(max_shard_size)
    _check_output(output, limit)
    sel = _selection(select, whole)
    with open_existing(path) as store:
        result = store.export(output, step, sel, max_shard_size=limit,
                              quiet=as_json or quiet)
    _report(result, as_json, f"step {result.step}")


@click.command("import")
@path_argument
@click.argument("source", type=click.Path(exists=True))
@click.option("--step", type=STEP, required=True, help="Step number to store it as.")
@click.option("--prefix", default=None,
              help="Place the content under this path, e.g. 'model' for a model checkpoint.")
@click.option("--flat", is_flag=True,
              help="Keep safetensors keys as one flat dict (do not nest on '/').")
@click.option("--tag", "tags", multiple=True, help="Tag the step (repeatable).")
@click.option("--note", default=None, help="Note stored with the step.")
@json_option
@handle_errors
def import_cmd(path: str, source: str, step: int, prefix: str | None, flat: bool,
               tags: tuple[str, ...], note: str | None, as_json: bool) -> None:
    """Store SOURCE (.safetensors, sharded directory or .pt) as a step; creates PATH if new.

    .pt files are read with torch.load(weights_only=True) only.
    """
    if step < 0:
        raise click.BadParameter("must be >= 0", param_hint="--step")
    from ..importer import read_source, save_imported

    # read (and check) the source first: a refused file must not leave a new store behind
    state = read_source(source, prefix=prefix, nest_keys=not flat)
    with open_store(path) as store:
        r = save_imported(store, state, source, step, tags=list(tags), note=note)
    if as_json:
        emit_json(r.__dict__)
        return
    click.echo(f"imported {source} as step {r.step}: {human(r.logical_bytes)} logical, "
               f"{human(r.written_bytes)} written ({r.new_chunks} new of {r.total_chunks} "
               f"blocks)")


def _steps(value: str) -> list[int]:
    try:
        steps = [int(s) for s in value.replace(" ", "").split(",") if s]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of steps",
                                 param_hint="--steps") from None
    if not steps:
        raise click.BadParameter("no steps given", param_hint="--steps")
    for step in steps:
        if not STEP.min <= step <= STEP.max:  # type: ignore[operator]
            raise click.BadParameter(f"step {step} does not fit in 64 bits",
                                     param_hint="--steps")
    return steps


@click.command("average")
@path_argument
@click.option("--steps", "steps_arg", required=True,
              help="Comma-separated steps, in order (e.g. 400,450,500).")
@select_option
@all_option
@click.option("--ema", type=float, default=None,
              help="Exponential moving average with this decay over the steps in order: "
                   "ema = ema*DECAY + x*(1-DECAY), starting from the first step.")
@click.option("-o", "--output", default=None, type=click.Path(),
              help="Write the result: .safetensors or .pt, or a directory with "
                   "--max-shard-size.")
@shard_option
@click.option("--save-step", type=STEP, default=None, help="Also save the result as this step.")
@json_option
@handle_errors
def average_cmd(path: str, steps_arg: str, select: tuple[str, ...], whole: bool,
                ema: float | None, output: str | None, max_shard_size: str | None,
                save_step: int | None, as_json: bool) -> None:
    """Element-wise mean (or EMA) of several steps' weights, accumulated in float64.

    --ema D applies the decay once per listed step, oldest first: the last step gets
    1 - D of the result, the first D^(n-1)."""
    from ..errors import StepExistsError
    from ..export import write_state

    steps = _steps(steps_arg)
    if output is None and save_step is None:
        raise click.UsageError("give -o OUT and/or --save-step N")
    if ema is not None and not 0.0 <= ema <= 1.0:
        raise click.BadParameter("must be in [0, 1]", param_hint="--ema")
    limit = _size(max_shard_size)
    if limit is not None and output is None:
        raise click.UsageError("--max-shard-size needs -o")
    if output is not None:
        _check_output(output, limit)
    sel = _selection(select, whole)
    what = ("EMA" if ema is not None else "mean") + f" of steps {','.join(map(str, steps))}"
    result = None
    with open_existing(path) as store:
        if save_step is not None and save_step in store:
            raise StepExistsError(f"{store.location}: step {save_step} already exists; delete "
                                  "it first or save the average under another step")
        state = store.average(steps, sel, ema=ema)
        # the file first: a command that fails must not leave a new step behind
        if output is not None:
            result = write_state(state, output, sel, max_shard_size=limit,
                                 metadata={"deltackpt_average": what})
        if save_step is not None:
            kind = f"EMA (decay {ema!r})" if ema is not None else "mean"
            store.save(state, save_step,
                       note=f"{kind} of steps {', '.join(map(str, steps))}")
    if as_json:
        emit_json({"steps": steps, "ema": ema, "saved_step": save_step,
                   "files": result.files if result else []})
        return
    if save_step is not None:
        click.echo(f"saved the {what} as step {save_step}", err=True)
    if result is not None:
        _report(result, False, f"the {what}")


COMMANDS = [export_cmd, import_cmd, average_cmd]
