"""The ``guardian`` command line: a thin layer over the library.

Subcommands are imported lazily (``guardian --help`` must not import torch), and
each lives in the module named in ``COMMANDS``.
"""

from __future__ import annotations

import importlib

import click

from .._version import __version__

# command name → "module:attribute" of its click command
COMMANDS: dict[str, str] = {
    "ls": "guardian.cli.checkpoints:ls",
    "verify": "guardian.cli.checkpoints:verify",
    "inspect": "guardian.cli.checkpoints:inspect_cmd",
    "export-weights": "guardian.cli.weights:export_weights",
    "history": "guardian.cli.history:history",
    "plot": "guardian.cli.history:plot",
    "watch": "guardian.cli.daemon:watch",
    "run": "guardian.cli.daemon:run",
    "status": "guardian.cli.views:status",
    "logs": "guardian.cli.views:logs",
    "stop": "guardian.cli.daemon:stop",
    "service": "guardian.cli.daemon:service",
    "adopt": "guardian.cli.jobs:adopt",
    "rm": "guardian.cli.jobs:rm",
    "resume": "guardian.cli.jobs:resume",
    "restart": "guardian.cli.jobs:restart",
    "top": "guardian.cli.views:top",
    "migrate": "guardian.cli.migrate:migrate",
    "export": "guardian.cli.export:export",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as e:
            import difflib

            close = difflib.get_close_matches(args[0], self.list_commands(ctx), n=1) if args else []
            if close:
                raise click.UsageError(f"{e.message}\nDid you mean {close[0]!r}?", ctx) from e
            raise


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="guardian")
def main() -> None:
    """guardian — crash-proof checkpoints for PyTorch training.

    \b
    Checkpoints:  ls, verify, inspect, export-weights
    History:      history, plot
    Supervisor:   watch, run, status, logs, stop, service
    Migration:    migrate
    Scale-out:    export
    """
