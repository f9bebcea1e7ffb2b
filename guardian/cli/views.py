"""``guardian status | logs | top``: how the jobs are going, read from the state directory.

They work with or without a running daemon and never write anything.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Any

import click

from ..daemon import DaemonError, safefiles, view
from ..daemon import registry as reg
from .daemon import _fail, _home, _state_or_none, daemon_pid, home_option, json_option


def _summaries(h: reg.Home, names: list[str], active: bool) -> list[dict[str, Any]]:
    from ..daemon.status import job_summary

    jobs = [job_summary(h, n) for n in names]
    return [j for j in jobs if j["state"] in view.ACTIVE] if active else jobs


# ---------------------------------------------------------------------------- status


@click.command()
@home_option
@click.argument("name", required=False)
@click.option("--active", is_flag=True, help="Only jobs running, stopping or waiting to start.")
@json_option
def status(home: str | None, name: str | None, active: bool, as_json: bool) -> None:
    """Jobs: state, queue, GPUs, epoch/step, progress and ETA, steps/s, checkpoint age."""
    h = _home(home)
    if name and name not in h.job_names():
        _fail(DaemonError(f"no job named {name!r} in {h.root}"))
    jobs = _summaries(h, [name] if name else h.job_names(), active)
    pid = daemon_pid(h)
    if as_json:
        click.echo(json.dumps({"home": h.root, "daemon_pid": pid, "jobs": jobs}, indent=2))
        return
    click.echo(f"daemon: {f'pid {pid}' if pid else 'not running'}  ({h.root})")
    for j in jobs:
        _print_job(j, detail=bool(name))


def _print_job(j: dict[str, Any], detail: bool) -> None:
    where = ""
    if j.get("devices"):
        where = f" gpus={','.join(j['devices'])}"
    elif j.get("wants_gpus"):
        where = f" wants {j['wants_gpus']} GPU(s)"
    click.echo(
        f"{j['name']:<20} {j['state']:<10} attempts={j['attempts']} pid={j['pid'] or '-'}"
        f"{' nproc=' + str(j['nproc']) if j.get('nproc') else ''}{where}"
    )
    eta = f" eta={view.human_age(j['eta'])}" if j.get("eta") is not None else ""
    click.echo(
        f"    epoch={'-' if j.get('epoch') is None else j['epoch']} "
        f"step={'-' if j['step'] is None else j['step']} done={view.fmt_progress(j)}{eta} "
        f"rate={view.fmt_rate(j)} heartbeat={view.human_age(j['heartbeat_age'])} ago "
        f"checkpoint={j['last_checkpoint'] or '-'} ({view.human_age(j.get('checkpoint_age'))} old)"
    )
    click.echo(f"    {j['reason']}")
    if remote := _remote_durable(j.get("run_dir")):
        click.echo(f"    remote: {remote}")
    if j.get("heartbeat_problem"):
        click.echo(f"    heartbeat: {j['heartbeat_problem']}")
    if j["stderr_tail"] and (detail or j["state"] in (reg.FAILED, reg.HELD, reg.INCOMPLETE)):
        click.echo("    last lines of stderr:")
        for line in j["stderr_tail"][-10:]:
            click.echo(f"      | {line}")


def _remote_durable(run_dir: str | None) -> str | None:
    """The newest remote-durable checkpoint (``RUN/remote.json``, written by a run with
    ``replicate_to``), shown beside the local one; read like every other run file."""
    if not run_dir:
        return None
    try:
        info = safefiles.read_json_object(os.path.join(run_dir, "remote.json"), 65536)
        if info is None:
            return None
        text = f"{info['newest_durable']} (step {int(info['step'])}) durable on {info['url']}"
    except (OSError, ValueError, KeyError, TypeError, DaemonError):
        return None
    return "".join(c if c.isprintable() else "?" for c in text)[:500]


# ---------------------------------------------------------------------------- logs


@click.command()
@home_option
@click.argument("name")
@click.option("--attempt", type=int, help="Attempt number (default: the latest).")
@click.option("--stdout", "which", flag_value="stdout", help="Show stdout instead of stderr.")
@click.option("--stderr", "which", flag_value="stderr", default=True, help="Show stderr (default).")
@click.option("--events", is_flag=True, help="Show the job's decisions (events.jsonl) instead.")
@click.option(
    "-f", "--follow", is_flag=True, help="Keep printing as the log grows, across restarts (Ctrl-C ends)."
)
@json_option
def logs(
    home: str | None, name: str, attempt: int | None, which: str, events: bool, follow: bool, as_json: bool
) -> None:
    """An attempt's log (kept across restarts), or the job's decisions with --events."""
    h = _home(home)
    if name not in h.job_names():
        _fail(DaemonError(f"no job named {name!r} in {h.root}"))
    if events:
        evs = reg.read_events(h, name)
        if as_json:
            click.echo(json.dumps(evs, indent=2))
        for e in [] if as_json else evs:
            click.echo(f"{time.strftime('%H:%M:%S', time.localtime(e['time']))} {e['event']}: {e['reason']}")
        return
    st = _state_or_none(h, name)
    n = attempt or (st.current.n if st and st.current else None) or (1 if follow else None)
    if n is None:
        _fail(DaemonError(f"job {name!r} has not started yet"))
    path = os.path.join(h.attempt_dir(name, n), f"{which}.log")
    if not os.path.exists(path) and not follow:
        _fail(DaemonError(f"{path}: no such log (attempts so far: {st.started if st else 0})"))
    if as_json:
        with open(path, encoding="utf-8", errors="replace") as f:
            click.echo(json.dumps({"name": name, "attempt": n, "path": path, "text": f.read()}))
        return
    if follow:
        _follow(h, name, n, which, fixed=attempt is not None)
        return
    with open(path, "rb") as f:
        sys.stdout.buffer.write(f.read())


def _follow(h: reg.Home, name: str, n: int, which: str, fixed: bool, poll: float = 0.5) -> None:
    """``tail -f`` that moves on to the next attempt when the daemon restarts the job,
    and starts over when the log is rotated (truncated)."""
    out = sys.stdout.buffer
    pos = 0
    try:
        while True:
            st = None if fixed else _state_or_none(h, name)
            pos = _copy_new(os.path.join(h.attempt_dir(name, n), f"{which}.log"), pos, out)
            if st and st.current and st.current.n > n:  # read to the end first, then move on
                n, pos = st.current.n, 0
                out.write(f"\n=== guardian: attempt {n} ===\n".encode())
                out.flush()
                continue
            time.sleep(poll)
    except KeyboardInterrupt:
        return


def _copy_new(path: str, pos: int, out: Any) -> int:
    """Write what ``path`` gained since ``pos``; returns the new position."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size < pos:
                pos = 0  # rotated
            f.seek(pos)
            chunk = f.read()
    except FileNotFoundError:
        return pos
    if chunk:
        out.write(chunk)
        out.flush()
    return pos + len(chunk)


# ---------------------------------------------------------------------------- top


@click.command()
@home_option
@click.option("--interval", type=float, default=2.0, help="Seconds between refreshes.")
@click.option("--once", is_flag=True, help="Print one frame and exit (for scripts).")
@click.option("--active", is_flag=True, help="Only jobs running, stopping or waiting to start.")
def top(home: str | None, interval: float, once: bool, active: bool) -> None:
    """A live view of every job: state, attempt, epoch, step, progress, ETA, rate, GPUs.

    Fits the terminal's width (every column but the reason fits in 80); q or Ctrl-C quits.
    """
    h = _home(home)
    try:
        while True:
            width, height = shutil.get_terminal_size((80, 24))
            frame = _frame(h, width, active)
            if once:
                click.echo("\n".join(frame))
                return
            sys.stdout.write("\x1b[H\x1b[2J" + "\n".join(frame[: max(1, height - 1)]) + "\n")
            sys.stdout.flush()
            if _quit_pressed(interval):
                return
    except KeyboardInterrupt:
        return


def _frame(h: reg.Home, width: int, active: bool) -> list[str]:
    pid = daemon_pid(h)
    jobs = _summaries(h, h.job_names(), active)
    counts: dict[str, int] = {}
    for j in jobs:
        counts[j["state"]] = counts.get(j["state"], 0) + 1
    head = (
        f"guardian top  {time.strftime('%H:%M:%S')}  daemon {'pid ' + str(pid) if pid else 'NOT RUNNING'}  "
        + " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
    )
    return [head[:width], *view.table(jobs, width)]


def _quit_pressed(timeout: float) -> bool:
    """Wait ``timeout`` seconds for a 'q' on a terminal (no echo, no Enter needed)."""
    if not sys.stdin.isatty():
        time.sleep(timeout)
        return False
    import select
    import termios
    import tty

    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        ready, _, _ = select.select([fd], [], [], timeout)
        return bool(ready) and os.read(fd, 1) in (b"q", b"Q")
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)
