"""``guardian ls``, ``verify`` and ``inspect``: reading checkpoints from a terminal.

Torch-free (they use the format module's reader only), so they work on a machine
without a GPU stack and start in well under a second.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, NoReturn

import click

from ..errors import EXIT_INVALID, EXIT_NOT_FOUND, GuardianError
from ..format import reader
from ..progress_bar import progress_bar
from ..remote.fetch import is_remote, remote_infos


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"guardian: {printable(message)}", err=True)
    sys.exit(code)


def printable(text: object) -> str:
    """``text`` safe for a terminal: control characters (ESC and friends), format
    characters (bidi overrides) and undecodable bytes of file names are shown as
    escapes, so a hostile file name can neither move the cursor nor fake a line."""
    out = []
    for ch in str(text):
        if ch.isprintable() or ch in "\n\t":
            out.append(ch)
        elif 0xDC80 <= ord(ch) <= 0xDCFF:  # a non-UTF-8 byte of a file name (surrogateescape)
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(ch.encode("unicode_escape", "backslashreplace").decode("ascii"))
    return "".join(out)


def _line(text: object) -> str:
    """One output line: like ``printable``, and newlines escaped too."""
    return printable(text).replace("\n", "\\n").replace("\t", "\\t")


def _read_failure(path: str, e: BaseException) -> NoReturn:
    """A reader that failed on something other than a checkpoint problem (the
    directory vanished, permissions, a hostile structure) still ends cleanly."""
    _fail(f"cannot read {path}: {getattr(e, 'strerror', None) or e}", EXIT_INVALID)


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return str(size)


def _row(info: reader.CheckpointInfo) -> dict[str, Any]:
    m = info.manifest
    return {
        "name": info.name,
        "path": info.path,
        "step": m.step if m else None,
        "epoch": m.epoch if m else None,
        "seq": m.seq if m else None,
        "metrics": m.metrics if m else {},
        "reason": m.reason if m else [],
        "valid": info.valid,
        "verified": info.verified,
        "bytes": m.total_bytes if m else None,
        "created": m.created_unix if m else None,
        "problems": info.problems,
    }


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per checkpoint (a JSON list).")
@click.option("--verify/--no-verify", default=False, help="Re-hash every file (slower, exact).")
def ls(run_dir: str, as_json: bool, verify: bool) -> None:
    """List the checkpoints of a run directory, oldest first."""
    try:
        if is_remote(run_dir):  # s3://bucket/prefix/run: manifests listed, objects hashed with --verify
            infos = remote_infos(run_dir, verify=verify)
        else:
            infos = reader.list_checkpoints(run_dir, verify=verify)
    except GuardianError as e:
        _fail(str(e), e.exit_code)
    except (OSError, RecursionError, MemoryError) as e:
        _read_failure(run_dir, e)
    if as_json:
        _echo_json_list(_row(i) for i in infos)
        return
    rows = [_row(i) for i in infos]
    if not rows:
        click.echo(f"no checkpoints in {_line(run_dir)}")
        return
    _print_table(rows, verify)


def _echo_json_list(rows: Any) -> None:
    """A JSON list written row by row: a run directory of 50 000 entries is listed
    without building the whole document in memory."""
    click.echo("[", nl=False)
    for n, row in enumerate(rows):
        click.echo(("," if n else "") + "\n" + json.dumps(row, indent=1), nl=False)
    click.echo("\n]")


def _print_table(rows: list[dict[str, Any]], verified: bool) -> None:
    headers = ["NAME", "STEP", "EPOCH", "REASON", "METRICS", "SIZE", "AGE", "STATUS"]
    now = time.time()
    table = [
        [
            _line(r["name"]),
            str(r["step"] if r["step"] is not None else "?"),
            str(r["epoch"] if r["epoch"] is not None else "?"),
            _line(",".join(r["reason"])) or "-",
            _line(
                " ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in sorted(r["metrics"].items())
                )
            )
            or "-",
            _human_bytes(r["bytes"]) if r["bytes"] is not None else "?",
            _age(now - r["created"]) if r["created"] else "?",
            ("ok" if verified else "ok (manifest)") if r["valid"] else "INVALID",
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(headers)]
    color = sys.stdout.isatty()
    click.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    for row, r in zip(table, rows):
        line = "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
        click.echo(click.style(line, fg="red") if (color and not r["valid"]) else line)
        for p in r["problems"]:
            click.echo(f"    ! {_line(p)}")


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{max(seconds, 0):.0f}s ago"


@click.command(name="verify")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result.")
def verify(path: str, as_json: bool) -> None:
    """Re-hash every file of a checkpoint, or of every checkpoint of a run directory.

    Exits 0 when all are valid; otherwise 3, naming each bad file.
    """
    if is_remote(path):
        try:
            remote = remote_infos(path, verify=True)
        except GuardianError as e:
            _fail(str(e), e.exit_code)
        _report_verified(remote, path, as_json)
        return
    try:
        path, is_ckpt = reader.resolve(path)
        listed = [reader.inspect_checkpoint(path, verify=False)] if is_ckpt else reader.list_checkpoints(path)
        total = sum(i.manifest.total_bytes for i in listed if i.manifest)
        with progress_bar(total, "verifying", enabled=not as_json) as advance:
            infos = [reader.inspect_checkpoint(i.path, progress=advance) for i in listed]
    except GuardianError as e:
        _fail(str(e), e.exit_code)
    except (OSError, RecursionError, MemoryError) as e:
        _read_failure(path, e)
    _report_verified(infos, path, as_json)


def _report_verified(infos: list[reader.CheckpointInfo], path: str, as_json: bool) -> None:
    if not infos:
        _fail(f"no checkpoints in {path}", EXIT_NOT_FOUND)
    bad = [i for i in infos if not i.valid]
    if as_json:
        click.echo(
            json.dumps(
                {
                    "valid": not bad,
                    "checkpoints": [
                        {"name": i.name, "path": i.path, "valid": i.valid, "problems": i.problems}
                        for i in infos
                    ],
                },
                indent=1,
            )
        )
    else:
        for i in infos:
            click.echo(f"{'ok     ' if i.valid else 'INVALID'} {_line(i.path)}")
            for p in i.problems:
                click.echo(f"  ! {_line(p)}")
        click.echo(f"{len(infos) - len(bad)} of {len(infos)} checkpoint(s) valid")
    if bad:
        sys.exit(EXIT_INVALID)


@click.command(name="inspect")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary with digests.")
def inspect_cmd(path: str, as_json: bool) -> None:
    """Summarize a checkpoint: components, tensors, bytes and content digests.

    Given a run directory, uses its newest valid checkpoint. Two runs whose states
    are bit-for-bit equal have equal digests.
    """
    try:
        path, is_ckpt = reader.resolve(path)
        info = reader.inspect_checkpoint(path) if is_ckpt else reader.newest_valid(path)
        if info is None:
            _fail(f"no valid checkpoint in {path}", EXIT_NOT_FOUND)
        m = info.manifest
        if m is None or not info.valid:  # valid implies a manifest; the check says so to mypy
            _fail(
                f"{path} is not a valid checkpoint:\n  " + "\n  ".join(map(_line, info.problems)),
                EXIT_INVALID,
            )
        components = reader.component_summaries(info.path, m)
    except GuardianError as e:
        _fail(str(e), e.exit_code)
    except (OSError, RecursionError, MemoryError, ValueError) as e:
        _read_failure(path, e)
    out = {
        "name": info.name,
        "path": os.path.abspath(info.path),
        "step": m.step,
        "epoch": m.epoch,
        "batch_in_epoch": m.batch_in_epoch,
        "reason": m.reason,
        "metrics": m.metrics,
        "bytes": m.total_bytes,
        "format_version": m.version,
        "guardian_version": m.guardian_version,
        "tensors": sum(c["tensors"] for c in components.values()),
        "digest": reader.checkpoint_digest(components),
        "components": components,
    }
    if as_json:
        click.echo(json.dumps(out, indent=1))
        return
    click.echo(
        f"{_line(out['path'])}\n  step {m.step}, epoch {m.epoch}, reason {_line('+'.join(m.reason))}, "
        f"{_human_bytes(m.total_bytes)}, digest {out['digest']}"
    )
    for name, c in components.items():
        click.echo(
            f"  {_line(name):<24} {_line(c['kind']):<10} {c['tensors']:>5} tensors {_human_bytes(c['bytes']):>10}  {c['digest']}"
        )
