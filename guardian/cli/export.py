"""``guardian export slurm|torchrun|ray -- CMD``: write a launch configuration for another engine.

The engine restarts; guardian's library keeps checkpoints exact. Generators live in
guardian.export (pure templating); this module only maps options and writes the file.
"""

from __future__ import annotations

import json
import os
import stat

import click

from ..export import Export, ExportError

_CMD = {"ignore_unknown_options": True, "allow_interspersed_args": False}


def common(f):
    """Options every engine takes: where checkpoints go, the name, and the output."""
    for opt in reversed(
        [
            click.option("--name", required=True, help="Job / run name (also the rendezvous id)."),
            click.option(
                "--dir",
                "run_dir",
                required=True,
                help="GUARDIAN_RUN_DIR: guardian's checkpoints, on storage every node sees.",
            ),
            click.option("--output", "-o", type=click.Path(dir_okay=False), help="Write here (else stdout)."),
            click.option("--json", "as_json", is_flag=True, help="Print {engine, filename, text, ...}."),
            click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED),
        ]
    ):
        f = opt(f)
    return f


def emit(make, output: str | None, as_json: bool) -> None:
    """Render, then write the file (chmod +x for scripts) and/or print it."""
    try:
        exp: Export = make()
    except ExportError as e:
        raise click.UsageError(str(e)) from e
    if output:
        with open(output, "w", encoding="utf-8") as f:
            f.write(exp.text)
        if exp.executable:
            os.chmod(output, os.stat(output).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    if as_json:
        click.echo(
            json.dumps({**exp.to_dict(), "output": os.path.abspath(output) if output else None}, indent=2)
        )
    elif output:
        click.echo(f"wrote {output}\nnext:\n  " + "\n  ".join(exp.usage))
    else:
        click.echo(exp.text, nl=False)


@click.group()
def export() -> None:
    """Hand the job to Slurm, multi-node torchrun or Ray Train (they restart; guardian resumes)."""


@export.command("slurm", context_settings=_CMD)
@click.option("--nodes", type=int, default=1, show_default=True)
@click.option("--nproc-per-node", type=int, default=1, show_default=True, help=">1: torchrun per node.")
@click.option(
    "--signal-lead", type=int, default=120, show_default=True, help="USR2 this many s before the limit."
)
@click.option("--time", "time_limit", help="#SBATCH --time.")
@click.option("--partition", help="#SBATCH --partition.")
@click.option("--gpus-per-node", type=int, help="#SBATCH --gpus-per-node.")
@click.option("--cpus-per-task", type=int, help="#SBATCH --cpus-per-task.")
@click.option("--log", "log_path", help="#SBATCH --output (default NAME-%j.out).")
@click.option("--port", type=int, default=29500, show_default=True, help="c10d rendezvous port on node 1.")
@click.option("--python", default="python3", show_default=True, help="Interpreter on the nodes.")
@common
def slurm_cmd(command, name, run_dir, output, as_json, log_path, **opts) -> None:
    """An sbatch script: --requeue, USR2 before the limit, exit 75 → scontrol requeue."""
    from ..export import slurm

    emit(
        lambda: slurm.render(list(command), name=name, run_dir=run_dir, output=log_path, **opts),
        output,
        as_json,
    )


@export.command("torchrun", context_settings=_CMD)
@click.option("--rdzv-endpoint", "endpoint", required=True, help="HOST:PORT of the c10d rendezvous.")
@click.option("--nnodes", default="1", show_default=True, help="N or MIN:MAX.")
@click.option("--nproc-per-node", type=int, default=1, show_default=True)
@click.option("--max-restarts", type=int, default=3, show_default=True)
@click.option("--python", default="python3", show_default=True, help="Interpreter on the nodes.")
@common
def torchrun_cmd(command, name, run_dir, output, as_json, **opts) -> None:
    """A per-node torchrun wrapper with c10d rendezvous; the elastic agent restarts."""
    from ..export import torchrun

    emit(lambda: torchrun.render(list(command), name=name, run_dir=run_dir, **opts), output, as_json)


@export.command("ray", context_settings=_CMD)
@click.option("--storage-path", required=True, help="RunConfig(storage_path=...): shared, fixed.")
@click.option("--num-workers", type=int, default=2, show_default=True)
@click.option("--use-gpu/--no-gpu", default=False, show_default=True)
@click.option("--max-failures", type=int, default=3, show_default=True, help="FailureConfig; -1: forever.")
@common
def ray_cmd(command, name, run_dir, output, as_json, **opts) -> None:
    """A Ray Train driver (TorchTrainer) for -- MODULE:FUNCTION or FILE.py:FUNCTION."""
    from ..export import ray

    emit(lambda: ray.render(list(command), name=name, run_dir=run_dir, **opts), output, as_json)
