"""``guardian watch | run | status | logs | stop | service``: thin commands over guardian.daemon.

Only ``watch`` runs the supervisor. The others talk to it through its state
directory (``--home`` / ``GUARDIAN_HOME``): ``run`` writes jobs/NAME/job.json,
``stop`` writes jobs/NAME/stop.request, ``status``/``logs`` read what the daemon
wrote. So they work, and say so, whether or not a daemon is running.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from typing import Any, NoReturn

import click

from ..daemon import DaemonError
from ..daemon import knobs as knobs_mod
from ..daemon import registry as reg

home_option = click.option(
    "--home",
    envvar="GUARDIAN_HOME",
    type=click.Path(file_okay=False),
    default=None,
    help="The daemon's state directory (default: per user; env GUARDIAN_HOME).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def _home(home: str | None) -> reg.Home:
    return reg.Home(home or knobs_mod.default_home())


def _fail(e: Exception) -> NoReturn:
    raise click.ClickException(str(e)) from e


def daemon_pid(home: reg.Home) -> int | None:
    """The live daemon's pid for this home, or None (checked by pid *and* create time)."""
    from ..daemon import procs

    try:
        rec = reg.read_json(home.path("daemon.json"))
    except DaemonError:
        return None
    ident = procs.ProcId.from_dict(rec)
    try:
        return ident.pid if procs.is_alive(ident) else None
    except procs.Unknowable:
        return ident.pid if ident else None


# ---------------------------------------------------------------------------- watch


@click.command()
@home_option
@click.option("--poll", type=float, help="Seconds between checks (env GUARDIAN_DAEMON_POLL).")
@click.option("--backoff-base", type=float, help="First restart delay in seconds.")
@click.option("--max-failures", type=int, help="Failures without a new checkpoint before giving up.")
@click.option("--hang-min", type=float, help="Minimum heartbeat silence (s) before a job counts as hung.")
@click.option("--startup", type=float, help="Allowance (s) before a job's first heartbeat.")
@click.option("-v", "--verbose", is_flag=True)
def watch(
    home: str | None,
    poll: float | None,
    backoff_base: float | None,
    max_failures: int | None,
    hang_min: float | None,
    startup: float | None,
    verbose: bool,
) -> None:
    """Run the supervisor in the foreground (systemd runs this as a service).

    Stopping the daemon (SIGTERM, Ctrl-C) never stops the jobs; the next daemon adopts them.
    """
    from ..daemon.supervisor import Supervisor

    h = _home(home)
    try:
        k = knobs_mod.load(
            {
                "poll": poll,
                "backoff_base": backoff_base,
                "max_failures": max_failures,
                "hang_min": hang_min,
                "startup": startup,
            }
        )
        h.ensure()
    except (ValueError, DaemonError) as e:
        _fail(e)
    _setup_logging(h, verbose)
    sup = Supervisor(h, k)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: sup.stop_event.set())
    try:
        sup.serve()
    except DaemonError as e:
        _fail(e)


def _setup_logging(h: reg.Home, verbose: bool) -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger = logging.getLogger("guardian.daemon")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    for handler in (logging.FileHandler(h.path("daemon.log"), mode="a"), logging.StreamHandler(sys.stderr)):
        handler.setFormatter(fmt)
        logger.addHandler(handler)


# ---------------------------------------------------------------------------- run


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@home_option
@click.option("--name", help="Job name (default: from --dir or the command).")
@click.option(
    "--dir",
    "run_dir",
    type=click.Path(file_okay=False),
    help="The run's checkpoint directory (given to the job as GUARDIAN_RUN_DIR).",
)
@click.option("--replace", is_flag=True, help="Re-register a finished, failed, stopped or held job.")
@click.option(
    "--nproc-per-node",
    "nproc",
    type=click.IntRange(min=1),
    help="Run N ranks under torchrun (--standalone --max-restarts=0): guardian restarts the group.",
)
@click.option(
    "--env",
    "keep_env",
    multiple=True,
    metavar="NAME",
    help="Store this variable even if its name looks like a secret (*TOKEN*, *KEY*, ...). Repeatable.",
)
@click.option(
    "--replicate-to",
    metavar="URL",
    help="Replicate checkpoints to this remote prefix (s3://bucket/prefix/run): docs/remote.md.",
)
@json_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(
    home: str | None,
    name: str | None,
    run_dir: str | None,
    replace: bool,
    nproc: int | None,
    keep_env: tuple[str, ...],
    replicate_to: str | None,
    as_json: bool,
    command: tuple[str, ...],
) -> None:
    """Register a job with the daemon, which starts it:  guardian run --dir RUN -- python train.py

    With --nproc-per-node N the command is the training script (train.py ARGS) and the
    daemon runs it as `python -m torch.distributed.run --standalone --nproc-per-node N
    --max-restarts=0 train.py ARGS`; a rank that dies takes the group down and guardian
    restarts all of it from the newest checkpoint every rank completed.

    The job's environment is stored (mode 0600) without variables whose names look like
    secrets (TOKEN, SECRET, PASSWORD, KEY, CREDENTIAL); name one with --env to keep it.
    """
    from ..daemon.records import filter_env

    h = _home(home)
    try:
        h.ensure()
        name = reg.check_name(name or _default_name(run_dir, command))
        _check_replace(h, name, replace)
        rd = os.path.abspath(run_dir) if run_dir else os.path.join(h.job_dir(name), "run")
        spec = reg.JobSpec(
            name=name,
            argv=_job_argv(nproc, command),
            cwd=os.getcwd(),
            run_dir=rd,
            env=_with_replication(filter_env(dict(os.environ), keep_env), replicate_to),
            owner_uid=os.getuid(),
            nproc=nproc,
        )
        os.makedirs(os.path.dirname(rd), exist_ok=True)  # the daemon creates rd itself
        reg.save_spec(h, spec)
    except (DaemonError, OSError) as e:
        _fail(e)
    pid = daemon_pid(h)
    note = (
        f"the daemon (pid {pid}) will start it"
        if pid
        else "no daemon is running for this home; it will start when `guardian watch` runs"
    )
    _emit(
        as_json,
        {"name": name, "run_dir": rd, "argv": spec.argv, "nproc": nproc, "daemon_pid": pid},
        f"registered job {name!r} (run dir {rd}); {note}",
    )


def _with_replication(env: dict[str, str], url: str | None) -> dict[str, str]:
    """The job's environment with ``GUARDIAN_REPLICATE_TO``. A URL carrying user info or
    a query (where a secret could hide) is refused: it would be stored in the job files."""
    if not url:
        return env
    from ..remote.store import redact

    if redact(url) != url.rstrip("/"):
        raise DaemonError(
            "--replicate-to: give the URL without credentials or query (they would be stored in the "
            "job's files); credentials come from the environment or ~/.aws (docs/remote.md)"
        )
    return {**env, "GUARDIAN_REPLICATE_TO": url}


def _job_argv(nproc: int | None, command: tuple[str, ...]) -> list[str]:
    """The command the daemon will run: as given, or wrapped in torchrun for N ranks."""
    if nproc is None:
        return list(command)
    from ..daemon import launch

    try:
        return launch.torchrun_argv(nproc, list(command))
    except ValueError as e:
        raise DaemonError(f"guardian run --nproc-per-node: {e}") from e


def _default_name(run_dir: str | None, command: tuple[str, ...]) -> str:
    base = os.path.basename(os.path.abspath(run_dir)) if run_dir else os.path.basename(command[0])
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in base).strip(".-_") or "job"
    return cleaned[:64]


def _check_replace(h: reg.Home, name: str, replace: bool) -> None:
    if not os.path.exists(h.job_file(name, "job.json")):
        return
    try:
        st = reg.load_state(h, name)
        state = st.state if st else reg.PENDING
    except DaemonError:
        state = reg.HELD  # an unusable state.json: the daemon holds the job
        if replace:  # keep it as evidence, out of the way of the fresh start
            path = h.job_file(name, "state.json")
            os.replace(path, f"{path}.unreadable-{int(time.time())}")
    if not replace:
        raise DaemonError(
            f"job {name!r} already exists (state {state}); choose another --name, or "
            "--replace it once it is done, failed, stopped or held"
        )
    if state not in (*reg.TERMINAL, reg.HELD):
        raise DaemonError(f"job {name!r} is {state}; `guardian stop {name}` it before --replace")


# ---------------------------------------------------------------------------- status


@click.command()
@home_option
@click.argument("name", required=False)
@json_option
def status(home: str | None, name: str | None, as_json: bool) -> None:
    """Jobs, their state, attempts, pid, last verified checkpoint, heartbeat age."""
    h = _home(home)
    names = [name] if name else h.job_names()
    if name and name not in h.job_names():
        _fail(DaemonError(f"no job named {name!r} in {h.root}"))
    from ..daemon.status import job_summary

    jobs = [job_summary(h, n) for n in names]
    pid = daemon_pid(h)
    if as_json:
        click.echo(json.dumps({"home": h.root, "daemon_pid": pid, "jobs": jobs}, indent=2))
        return
    click.echo(f"daemon: {f'pid {pid}' if pid else 'not running'}  ({h.root})")
    for j in jobs:
        _print_job(j, detail=bool(name))


def _state_or_none(h: reg.Home, name: str) -> reg.JobState | None:
    try:
        return reg.load_state(h, name)
    except DaemonError:
        return None


def _print_job(j: dict[str, Any], detail: bool) -> None:
    hb = f"{j['heartbeat_age']:.0f}s ago" if j["heartbeat_age"] is not None else "-"
    click.echo(
        f"{j['name']:<20} {j['state']:<10} attempts={j['attempts']} pid={j['pid'] or '-'} "
        f"{'nproc=' + str(j['nproc']) + ' ' if j.get('nproc') else ''}"
        f"step={j['step'] if j['step'] is not None else '-'} heartbeat={hb} "
        f"checkpoint={j['last_checkpoint'] or '-'} gpus={','.join(j['gpus']) or '-'}"
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
    """The newest remote-durable checkpoint (``RUN/remote.json``), for ``status``."""
    if not run_dir:
        return None
    try:
        with open(os.path.join(run_dir, "remote.json"), "rb") as f:
            info = json.loads(f.read(65536))
        text = f"{info['newest_durable']} (step {int(info['step'])}) durable on {info['url']}"
    except (OSError, ValueError, KeyError, TypeError):
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
@json_option
def logs(home: str | None, name: str, attempt: int | None, which: str, events: bool, as_json: bool) -> None:
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
    n = attempt or (st.current.n if st and st.current else None)
    if n is None:
        _fail(DaemonError(f"job {name!r} has not started yet"))
    path = os.path.join(h.attempt_dir(name, n), f"{which}.log")
    if not os.path.exists(path):
        _fail(DaemonError(f"{path}: no such log (attempts so far: {len(st.attempts) if st else 0})"))
    if as_json:
        with open(path, encoding="utf-8", errors="replace") as f:
            click.echo(json.dumps({"name": name, "attempt": n, "path": path, "text": f.read()}))
        return
    with open(path, "rb") as f:
        sys.stdout.buffer.write(f.read())


# ---------------------------------------------------------------------------- stop


@click.command()
@home_option
@click.argument("name")
@click.option("--grace", type=float, help="Seconds to wait for the checkpoint before SIGTERM.")
@click.option("--wait/--no-wait", default=False, help="Wait until the job has stopped.")
@click.option("--timeout", type=float, default=600.0, help="With --wait: give up after this many seconds.")
@json_option
def stop(home: str | None, name: str, grace: float | None, wait: bool, timeout: float, as_json: bool) -> None:
    """Ask a job to checkpoint and stop (SIGUSR2, then SIGTERM, then SIGKILL of its tree)."""
    h = _home(home)
    if name not in h.job_names():
        _fail(DaemonError(f"no job named {name!r} in {h.root}"))
    reg.write_json(h.job_file(name, "stop.request"), {"time": time.time(), "grace": grace})
    pid = daemon_pid(h)
    if wait and pid:
        _wait_stopped(h, name, timeout)
    st = _state_or_none(h, name)
    note = "" if pid else "; no daemon is running — the job stops when `guardian watch` next runs"
    _emit(
        as_json,
        {"name": name, "requested": True, "state": st.state if st else None, "daemon_pid": pid},
        f"stop requested for {name!r} (state {st.state if st else 'pending'}){note}",
    )


def _wait_stopped(h: reg.Home, name: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = _state_or_none(h, name)
        if (
            st
            and st.state not in (reg.RUNNING, reg.STOPPING)
            and not os.path.exists(h.job_file(name, "stop.request"))
        ):
            return
        time.sleep(0.2)
    _fail(DaemonError(f"job {name!r} did not stop within {timeout:.0f} s"))


# ---------------------------------------------------------------------------- service


@click.group()
def service() -> None:
    """Run the daemon under systemd."""


@service.command("install")
@home_option
@click.option(
    "--user", "user_mode", is_flag=True, help="A user unit (~/.config/systemd/user) with lingering."
)
@click.option("--unit-dir", type=click.Path(file_okay=False), help="Write the unit here instead.")
@click.option("--print", "print_only", is_flag=True, help="Print the unit; write nothing.")
@json_option
def install(home: str | None, user_mode: bool, unit_dir: str | None, print_only: bool, as_json: bool) -> None:
    """Write a systemd unit that runs `guardian watch` at boot (Restart=always)."""
    from ..daemon import service as svc

    h = _home(home)
    text = svc.unit_text(h.root, user_mode)
    if print_only:
        click.echo(text)
        return
    path = svc.unit_path(user_mode, unit_dir)
    try:
        svc.write_unit(path, text)
    except OSError as e:
        _fail(e)
    _emit(
        as_json,
        {"unit": path, "home": h.root, "next": svc.next_steps(user_mode)},
        f"wrote {path}\nnext:\n  " + "\n  ".join(svc.next_steps(user_mode)),
    )


def _emit(as_json: bool, record: dict[str, Any], text: str) -> None:
    click.echo(json.dumps(record, indent=2) if as_json else text)
