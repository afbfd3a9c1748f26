"""``materialize``: write a stored Hugging Face ``checkpoint-N`` directory back to disk."""

from __future__ import annotations

import click

from ._common import STEP, emit_json, handle_errors, json_option, open_existing, path_argument


@click.command("materialize")
@path_argument
@click.argument("step", type=STEP)
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Directory to create, e.g. out/checkpoint-200.")
@click.option("--force", is_flag=True, help="Replace OUTPUT when it exists.")
@json_option
@handle_errors
def materialize_cmd(path: str, step: int, output: str, force: bool, as_json: bool) -> None:
    """Rebuild the checkpoint directory stored as STEP (by deltackpt.hf), byte-identical,
    for trainer.train(resume_from_checkpoint=OUTPUT) or from_pretrained(OUTPUT)."""
    from ..hf import materialize_files

    with open_existing(path) as store:
        files = materialize_files(store, step, output, overwrite=force)
    if as_json:
        emit_json({"step": step, "output": output, "files": files})
    else:
        click.echo(f"wrote step {step} ({len(files)} files) to {output}", err=True)


COMMANDS = [materialize_cmd]
