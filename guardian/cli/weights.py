"""``guardian export-weights``: a model's trained weights as a plain file.

A checkpoint directory mixes the model with optimizer state, RNG and loop position
under ``model/…`` keys; this command writes only the model's own ``state_dict`` keys
as a safetensors file anyone can load (``safetensors.torch.load_file`` +
``load_state_dict(strict=True)``), or a Hugging Face model directory. Read-only on
the run: safe while training continues in it.
"""

from __future__ import annotations

import sys

import click

from ..errors import EXIT_USAGE, GuardianError


@click.command("export-weights")
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    type=click.Path(),
    help="File to write (or directory with --hf-config).",
)
@click.option("--best", is_flag=True, help="The best checkpoint instead of the newest.")
@click.option("--checkpoint", "name", default=None, help="A checkpoint of the run by name (step-000000120).")
@click.option("--component", default=None, help="Which model, when the run protected several.")
@click.option(
    "--hf-config",
    default=None,
    type=click.Path(exists=True),
    help="A Hugging Face config.json (or its directory): write the layout from_pretrained reads. "
    "Automatic for runs trained through guardian's transformers integration.",
)
def export_weights(
    source: str, output: str, best: bool, name: str | None, component: str | None, hf_config: str | None
) -> None:
    """Write the weights of a run's newest verified checkpoint (or of SOURCE, a
    checkpoint directory) as a plain safetensors file."""
    from ..readonly import export_weights as export

    if best and name:
        click.echo("guardian: --best and --checkpoint choose differently; pass one of them", err=True)
        sys.exit(EXIT_USAGE)
    which = "best" if best else (name or "latest")
    try:
        written = export(source, output, which=which, component=component, hf_config=hf_config)
    except GuardianError as e:
        click.echo(f"guardian: {e}", err=True)
        sys.exit(e.exit_code)
    click.echo(f"wrote {written}")
