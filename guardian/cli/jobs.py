"""``guardian adopt | rm | resume | restart | top``: managing jobs the daemon watches.

Like the other daemon commands they talk to the daemon through its state directory
only, so they work (and say so) whether or not ``guardian watch`` runs.
"""

from __future__ import annotations

import os
import shutil
import time

import click

from ..daemon import DaemonError
from ..daemon import registry as reg
from .daemon import _emit, _fail, _home, daemon_pid, home_option, json_option


def _known(h: reg.Home, name: str) -> None:
    if name not in h.job_names():
        _fail(DaemonError(f"no job named {name!r} in {h.root}"))


@click.command()
@home_option
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--name", help="Job name (default: the run directory's name).")
@json_option
def adopt(home: str | None, run_dir: str, name: str | None, as_json: bool) -> None:
    """Watch a run that is already going (started by hand): restart it if it dies.

    The process is the one RUN_DIR/run.json names; its command line, working directory
    and environment (without secret-looking variables) are registered as the job.
    """
    from ..daemon.adoption import register_process
    from ..daemon.safefiles import BadFileError, read_run_status

    h = _home(home)
    try:
        from ..daemon.adoption import check_owner

        check_owner(os.path.abspath(run_dir))
        status = read_run_status(run_dir) or {}
        pid = status.get("pid")
        if status.get("state") != "running" or not isinstance(pid, int):
            raise DaemonError(
                f"{run_dir}: run.json says {status.get('state') or 'nothing'}; no running protect()ed "
                "process to adopt (start it with `guardian run`)"
            )
        spec, note = register_process(run_dir, pid, name=name, home=h.root)
    except (DaemonError, BadFileError, OSError) as e:
        _fail(e)
    _emit(
        as_json,
        {"name": spec.name, "pid": pid, "argv": spec.argv, "run_dir": spec.run_dir},
        f"adopted pid {pid} as job {spec.name!r}; {note}",
    )


@click.command()
@home_option
@click.argument("name")
@json_option
def rm(home: str | None, name: str, as_json: bool) -> None:
    """Forget a job that is not running (its run directory and checkpoints are kept)."""
    h = _home(home)
    _known(h, name)
    try:
        st = reg.load_state(h, name)
    except DaemonError:
        st = None
    if st is not None and st.state in (reg.RUNNING, reg.STOPPING):
        _fail(DaemonError(f"job {name!r} is {st.state}; `guardian stop {name} --wait` first"))
    shutil.rmtree(h.job_dir(name))
    _emit(as_json, {"name": name, "removed": True}, f"removed job {name!r} (its run directory is untouched)")


@click.command()
@home_option
@click.argument("name")
@json_option
def resume(home: str | None, name: str, as_json: bool) -> None:
    """Start a stopped, failed, held or finished job again with its registered command."""
    h = _home(home)
    _known(h, name)
    try:
        spec = reg.load_spec(h, name)
        st = reg.load_state(h, name)
    except (DaemonError, OSError) as e:
        _fail(e)
    if st is not None and st.state not in (*reg.TERMINAL, reg.HELD):
        _fail(DaemonError(f"job {name!r} is {st.state}; nothing to resume"))
    spec.created, spec.adopt = time.time(), None  # a newer definition resets the job's state
    reg.save_spec(h, spec)
    pid = daemon_pid(h)
    _emit(
        as_json,
        {"name": name, "daemon_pid": pid},
        f"job {name!r} queued to start again" + ("" if pid else " (no daemon running)"),
    )


@click.command()
@home_option
@click.argument("name")
@click.option("--timeout", type=float, default=600.0, help="Seconds to wait for the stop.")
@json_option
def restart(home: str | None, name: str, timeout: float, as_json: bool) -> None:
    """Checkpoint and stop a running job, then start it again (same command)."""
    from .daemon import _wait_stopped

    h = _home(home)
    _known(h, name)
    st = reg.load_state(h, name)
    if st is not None and st.state in (reg.RUNNING, reg.STOPPING):
        if not daemon_pid(h):
            _fail(DaemonError("no daemon is running to stop the job; start `guardian watch`"))
        reg.write_json(h.job_file(name, "stop.request"), {"time": time.time(), "grace": None})
        _wait_stopped(h, name, timeout)
    ctx = click.get_current_context()
    ctx.invoke(resume, home=h.root, name=name, as_json=as_json)
