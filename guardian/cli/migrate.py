"""``guardian migrate``: plan → review → apply, the one-shot form, revert, signature.

    guardian migrate plan SRC --to TARGET [--rules FILE] [--auto] [-o PLAN] [--json]
    guardian migrate apply SRC --plan PLAN -o DST [--force]
    guardian migrate SRC -o DST --to TARGET [--rules FILE] [--auto]     (= migrate run)
    guardian migrate revert DST -o SRC2 [--force] [--force-lossy]
    guardian migrate signature TARGET -o FILE

``--auto`` applies only confident suggestions; ``--accept-guesses`` applies the rest
too and the report says GUESSED, never CLEAN (the exit code is 0: the user asked).
Exit codes: 0 clean, 10 blocked (something unresolved), 11 verification failed,
12 input rejected. torch is imported only inside the commands (``guardian --help``
stays torch-free).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click

from ..migrate.errors import EXIT_BLOCKED, EXIT_CLEAN, EXIT_REJECTED, EXIT_VERIFY_FAILED  # torch-free


class MigrateGroup(click.Group):
    """Routes ``guardian migrate SRC …`` (first argument not a subcommand) to ``run``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            args = ["run", *args]
        return super().parse_args(ctx, args)


def _emit(payload: dict[str, Any], text: str, as_json: bool) -> None:
    click.echo(json.dumps(payload, indent=1, sort_keys=True) if as_json else text)


def _guarded(as_json: bool, fn: Callable[[], int]) -> None:
    """Run a command body; map migrate errors to their exit codes and print them."""
    from guardian.errors import GuardianError
    from guardian.migrate import report
    from guardian.migrate.errors import PlanBlockedError

    try:
        code = fn()
    except PlanBlockedError as e:
        if e.plan is not None:
            _emit(report.to_json(e.plan) | {"error": str(e)}, report.render(e.plan), as_json)
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_BLOCKED)
    except GuardianError as e:
        code = getattr(e, "exit_code", 1)
        if isinstance(e, (ValueError, FileExistsError)) and code not in (EXIT_BLOCKED, EXIT_VERIFY_FAILED):
            code = EXIT_REJECTED  # corrupt/unsafe inputs from format/ are rejections here
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "schema": report.REPORT_SCHEMA,
                        "status": "error",
                        "exit_code": code,
                        "error": str(e),
                        "type": type(e).__name__,
                    },
                    indent=1,
                    sort_keys=True,
                )
            )
        click.echo(f"error: {e}", err=True)
        sys.exit(code)
    sys.exit(code)


@click.group(cls=MigrateGroup)
def migrate() -> None:
    """Carry a checkpoint over to a changed model (renamed layers, wrappers, new layouts).

    \b
    guardian migrate plan SRC --to TARGET [--rules FILE] [--auto]   report only
    guardian migrate apply SRC --plan PLAN -o DST                   execute a reviewed plan
    guardian migrate SRC -o DST --to TARGET [--rules FILE]          plan + apply + verify
    guardian migrate revert DST -o SRC2                             undo a migration
    guardian migrate signature TARGET -o FILE                       save keys/shapes/dtypes

    TARGET: package.module:factory (built on the meta device), a signature .json,
    or another checkpoint. Exit codes: 0 clean, 10 blocked, 11 verification failed,
    12 input rejected.
    """


_to = click.option(
    "--to", "target", required=True, help="package.module:factory, signature .json, or checkpoint"
)
_rules = click.option("--rules", "rules", type=click.Path(dir_okay=False), help="rules file (TOML or JSON)")
_auto = click.option("--auto", is_flag=True, help="apply suggestions at or above --threshold")
_threshold = click.option(
    "--threshold", type=float, default=0.8, show_default=True, help="minimum confidence for --auto"
)
_guesses = click.option(
    "--accept-guesses",
    is_flag=True,
    help="with --auto, also apply suggestions below --threshold and ties; the report marks them "
    "GUESSED (never CLEAN) and the output records them",
)
_component = click.option("--component", help="which model of a multi-model checkpoint to migrate")
_json = click.option("--json", "as_json", is_flag=True, help="machine-readable output (versioned schema)")


@migrate.command("plan")
@click.argument("src")
@_to
@_rules
@_auto
@_threshold
@_guesses
@_component
@click.option("-o", "--output", "plan_out", type=click.Path(dir_okay=False), help="write the plan file here")
@_json
def plan_cmd(
    src: str,
    target: str,
    rules: str | None,
    auto: bool,
    threshold: float,
    accept_guesses: bool,
    component: str | None,
    plan_out: str | None,
    as_json: bool,
) -> None:
    """Report what a migration would do; writes nothing but the optional plan file."""

    def body() -> int:
        from guardian.migrate import api, report

        p = api.plan(
            src,
            target,
            rules,
            auto=auto,
            threshold=threshold,
            component=component,
            accept_guesses=accept_guesses,
        )
        if plan_out:
            api.save_plan(p, plan_out)
        _emit(report.to_json(p), report.render(p, color=_color()), as_json)
        return EXIT_BLOCKED if p.blocked else EXIT_CLEAN

    _guarded(as_json, body)


@migrate.command("apply")
@click.argument("src")
@click.option(
    "--plan", "plan_path", required=True, type=click.Path(dir_okay=False), help="plan file from `plan -o`"
)
@click.option("-o", "--output", "dst", required=True, help="output checkpoint directory")
@click.option("--force", is_flag=True, help="replace an existing output")
@_json
def apply_cmd(src: str, plan_path: str, dst: str, force: bool, as_json: bool) -> None:
    """Execute a reviewed plan (refused if blocked or if SRC changed since)."""

    def body() -> int:
        from guardian.migrate import api

        result = api.apply(src, plan_path, dst, force=force)
        _emit(
            {"status": "applied", "path": result.path, "notes": result.notes, "exit_code": EXIT_CLEAN},
            _done_text(result),
            as_json,
        )
        return EXIT_CLEAN

    _guarded(as_json, body)


@migrate.command("run")
@click.argument("src")
@click.option("-o", "--output", "dst", required=True, help="output checkpoint directory")
@_to
@_rules
@_auto
@_threshold
@_guesses
@_component
@click.option("--force", is_flag=True, help="replace an existing output")
@click.option("--numeric", "old_factory", help="also compare outputs: the OLD model's package.module:factory")
@click.option(
    "--input-shape", default="1,1,28,28", show_default=True, help="seeded input shape for --numeric"
)
@click.option("--atol", type=float, default=1e-6, show_default=True)
@click.option("--input-high", type=int, help="--numeric with integer inputs in [0, N) (token ids)")
@_json
def run_cmd(
    src: str,
    dst: str,
    target: str,
    rules: str | None,
    auto: bool,
    threshold: float,
    accept_guesses: bool,
    component: str | None,
    force: bool,
    old_factory: str | None,
    input_shape: str,
    atol: float,
    input_high: int | None,
    as_json: bool,
) -> None:
    """Plan, apply and verify in one go; refuses when anything is unresolved."""

    def body() -> int:
        from guardian.migrate import api, report

        numeric = None
        if old_factory:
            numeric = {
                "old": old_factory,
                "input_shape": [int(d) for d in input_shape.split(",")],
                "atol": atol,
                "input_high": input_high,
            }
        result = api.migrate(
            src,
            dst,
            target,
            rules,
            auto=auto,
            threshold=threshold,
            force=force,
            component=component,
            numeric=numeric,
            accept_guesses=accept_guesses,
        )
        payload = report.to_json(result.plan) | {
            "path": result.path,
            "notes": result.notes,
            "numeric_diff": result.numeric_diff,
        }
        _emit(payload, report.render(result.plan, color=_color()) + "\n" + _done_text(result), as_json)
        return EXIT_CLEAN

    _guarded(as_json, body)


@migrate.command("revert")
@click.argument("migrated")
@click.option("-o", "--output", "dst", required=True, help="where to write the restored checkpoint")
@click.option("--force", is_flag=True, help="replace an existing output")
@click.option("--force-lossy", is_flag=True, help="revert a lossy migration as far as possible")
@_json
def revert_cmd(migrated: str, dst: str, force: bool, force_lossy: bool, as_json: bool) -> None:
    """Undo a migration, restoring the original tensors exactly."""

    def body() -> int:
        from guardian.migrate import api

        result = api.revert(migrated, dst, force=force, force_lossy=force_lossy)
        _emit(
            {"status": "reverted", "path": result.path, "notes": result.notes, "exit_code": EXIT_CLEAN},
            _done_text(result),
            as_json,
        )
        return EXIT_CLEAN

    _guarded(as_json, body)


@migrate.command("signature")
@click.argument("target")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="signature .json")
@_json
def signature_cmd(target: str, out: str, as_json: bool) -> None:
    """Save TARGET's keys, shapes and dtypes, to plan where the model code is absent."""

    def body() -> int:
        from guardian.migrate import api

        t = api.signature(target, out)
        _emit(
            {"status": "written", "path": out, "tensors": len(t.specs), "exit_code": EXIT_CLEAN},
            f"wrote {out}: {len(t.specs)} tensors of {t.description}",
            as_json,
        )
        return EXIT_CLEAN

    _guarded(as_json, body)


def _color() -> bool:
    return sys.stdout.isatty()


def _done_text(result: Any) -> str:
    lines = [f"wrote {result.path}"]
    if result.plan.guesses:
        lines.append(
            f"GUESSED: {len(result.plan.guesses)} mapping(s) applied without confidence; "
            "listed in the output's migration record (extra.migration.accepted_guesses)"
        )
    lines += [f"note: {n}" for n in result.notes]
    if result.numeric_diff is not None:
        lines.append(f"numeric check: max |old - new| = {result.numeric_diff:g}")
    return "\n".join(lines)
