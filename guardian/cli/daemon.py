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
@click.option(
    "--devices",
    help="The GPUs to hand out, e.g. 0,1 or GPU-UUIDs (default: NVML, else CUDA_VISIBLE_DEVICES).",
)
@click.option("--max-concurrent", type=click.IntRange(min=0), help="Jobs running at once (0: no limit).")
@click.option(
    "--keep-attempts",
    type=click.IntRange(min=1),
    help="Attempt directories kept per job (plus the first and the latest failure).",
)
@click.option("--notify", metavar="CMD", help="Run CMD (sh -c) with every job's events as JSON on stdin.")
@click.option("--webhook", metavar="URL", help="POST every job's events as JSON to URL.")
@click.option("-v", "--verbose", is_flag=True)
def watch(
    home: str | None,
    poll: float | None,
    backoff_base: float | None,
    max_failures: int | None,
    hang_min: float | None,
    startup: float | None,
    devices: str | None,
    max_concurrent: int | None,
    keep_attempts: int | None,
    notify: str | None,
    webhook: str | None,
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
                "devices": devices,
                "max_concurrent": max_concurrent,
                "keep_attempts": keep_attempts,
                "notify": notify,
                "webhook": webhook,
            }
        )
        h.ensure()
    except (ValueError, DaemonError) as e:
        _fail(e)
    _setup_logging(h, verbose, k.log_max_bytes)
    sup = Supervisor(h, k)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: sup.stop_event.set())
    try:
        sup.serve()
    except DaemonError as e:
        _fail(e)


def _setup_logging(h: reg.Home, verbose: bool, max_bytes: int) -> None:
    """daemon.log rotates by size (one old copy kept), so a looping job cannot fill the disk."""
    from logging.handlers import RotatingFileHandler

    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger = logging.getLogger("guardian.daemon")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    rotating = RotatingFileHandler(h.path("daemon.log"), mode="a", maxBytes=max_bytes, backupCount=1)
    for handler in (rotating, logging.StreamHandler(sys.stderr)):
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
    "--gpus",
    type=click.IntRange(min=1),
    help="Whole GPUs to allocate (CUDA_VISIBLE_DEVICES); queued until free.",
)
@click.option("--cpu-only", is_flag=True, help="Run with CUDA_VISIBLE_DEVICES='' (the job sees no GPU).")
@click.option(
    "--priority", type=int, default=0, help="Higher starts first (default 0; equal: first registered first)."
)
@click.option("--notify", metavar="CMD", help="Run CMD (sh -c) with each event as JSON on stdin.")
@click.option("--webhook", metavar="URL", help="POST each event as JSON to URL.")
@click.option(
    "--replicate-to",
    metavar="URL",
    help="Replicate checkpoints to this remote prefix (s3://bucket/prefix/run): docs/remote.md.",
)
@json_option
@click.argument("command", nargs=-1, required=False, type=click.UNPROCESSED)
def run(
    home: str | None,
    name: str | None,
    run_dir: str | None,
    replace: bool,
    nproc: int | None,
    keep_env: tuple[str, ...],
    gpus: int | None,
    cpu_only: bool,
    priority: int,
    notify: str | None,
    webhook: str | None,
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
    from ..daemon import jobctl
    from ..daemon.records import filter_env

    h = _home(home)
    try:
        h.ensure()
        if gpus and cpu_only:
            raise DaemonError("--gpus and --cpu-only contradict each other; give one")
        name = reg.check_name(name or _default_name(run_dir, command or ("job",)))
        kept = _check_replace(h, name, replace, bool(command))
        if kept is None and not command:
            raise DaemonError("give the command after --, e.g. guardian run --dir RUN -- python train.py")
        argv = _job_argv(nproc, command) if command else kept.argv  # type: ignore[union-attr]
        rd = (
            os.path.abspath(run_dir)
            if run_dir
            else kept.run_dir
            if kept
            else os.path.join(h.job_dir(name), "run")
        )
        if gpus:
            jobctl.check_gpus_fit(h, gpus)
        jobctl.check_command(argv, os.getcwd())
        spec = reg.JobSpec(
            name=name,
            argv=argv,
            cwd=kept.cwd if kept is not None and not command else os.getcwd(),
            run_dir=rd,
            env=_with_replication(filter_env(dict(os.environ), keep_env), replicate_to),
            owner_uid=os.getuid(),
            nproc=nproc,
            gpus=gpus,
            cpu_only=cpu_only,
            priority=priority,
            notify=notify,
            webhook=jobctl.check_webhook(webhook),
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
    from ..daemon.adoption import job_name

    return job_name(os.path.abspath(run_dir) if run_dir else command[0])


def _check_replace(h: reg.Home, name: str, replace: bool, new_command: bool) -> reg.JobSpec | None:
    """Refuse to overwrite a live job; on --replace return the registered spec (its command is kept
    unless a new one is given)."""
    if not os.path.exists(h.job_file(name, "job.json")):
        return None
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
    try:
        return reg.load_spec(h, name)
    except (DaemonError, OSError) as e:
        if new_command:
            return None
        raise DaemonError(
            f"job {name!r}: its registered command cannot be reused ({e}); give one after --"
        ) from e


def _state_or_none(h: reg.Home, name: str) -> reg.JobState | None:
    try:
        return reg.load_state(h, name)
    except DaemonError:
        return None


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


@service.command("uninstall")
@click.option("--user", "user_mode", is_flag=True, help="The user unit (~/.config/systemd/user).")
@click.option("--unit-dir", type=click.Path(file_okay=False), help="The unit is here instead.")
@json_option
def uninstall(user_mode: bool, unit_dir: str | None, as_json: bool) -> None:
    """Remove the unit `service install` wrote (running jobs are not touched)."""
    from ..daemon import service as svc

    path = svc.unit_path(user_mode, unit_dir)
    try:
        removed = svc.remove_unit(path)
    except OSError as e:
        _fail(e)
    steps = svc.uninstall_steps(user_mode) if removed else []
    text = (
        f"removed {path}\nnext:\n  " + "\n  ".join(steps) if removed else f"no unit at {path}; nothing to do"
    )
    _emit(as_json, {"unit": path, "removed": removed, "next": steps}, text)


@service.command("status")
@home_option
@click.option("--user", "user_mode", is_flag=True, help="The user unit (~/.config/systemd/user).")
@click.option("--unit-dir", type=click.Path(file_okay=False), help="The unit is here instead.")
@json_option
def service_status(home: str | None, user_mode: bool, unit_dir: str | None, as_json: bool) -> None:
    """Is the unit installed, what systemd says of it, and is a daemon running for HOME."""
    from ..daemon import service as svc

    h = _home(home)
    path = svc.unit_path(user_mode, unit_dir)
    rec = {
        "unit": path,
        "installed": os.path.exists(path),
        "systemd": svc.systemd_state(user_mode),
        "home": h.root,
        "daemon_pid": daemon_pid(h),
    }
    pid = rec["daemon_pid"]
    text = (
        f"unit: {path} ({'installed' if rec['installed'] else 'not installed'}); systemd: {rec['systemd']}\n"
        f"daemon for {h.root}: {f'pid {pid}' if pid else 'not running'}"
    )
    _emit(as_json, rec, text)
