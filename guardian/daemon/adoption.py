"""Adopting a run the daemon did not start: a hand-started ``protect()``ed script.

A process the daemon did not start cannot be its child, so it is supervised by what
identifies it durably — pid *and* create time, and its run directory — and, once it
dies, restarted from the command line it registered (``JobSpec.adopt``). Two ways in:

* the library, when asked (``GUARDIAN_WATCH=1`` / ``protect(..., watch=True)``),
  registers its own process (``register_process(..., this_process=True)``);
* ``guardian adopt RUN_DIR`` registers the process that run.json names.

Only the owner may adopt: a run directory, or a process, of another user is refused
(the daemon would otherwise run someone else's command line as us).
"""

from __future__ import annotations

import os
import shutil
import sys
import time

import psutil

from . import DaemonError, UnsafeJobError
from . import registry as reg
from .knobs import default_home
from .records import PENDING, RUNNING, TERMINAL, Attempt, JobSpec, JobState, filter_env
from .safefiles import BadFileError, read_run_status


def register_process(
    run_dir: str, pid: int, *, this_process: bool = False, name: str | None = None, home: str | None = None
) -> tuple[JobSpec, str]:
    """Write the job definition that makes the daemon watch ``pid``; returns it and a note."""
    run_dir = os.path.abspath(run_dir)
    if this_process:
        os.makedirs(run_dir, exist_ok=True)  # protect() is called before the guard creates it
    check_owner(run_dir)
    h = reg.Home(home or default_home()).ensure()
    try:
        proc = psutil.Process(pid)
        if proc.uids().real != os.getuid():
            raise UnsafeJobError(f"pid {pid} belongs to uid {proc.uids().real}; only its owner may adopt it")
        argv = command_line(proc, this_process)
        spec = JobSpec(
            name=reg.check_name(name or job_name(run_dir)),
            argv=argv,
            cwd=proc.cwd(),
            run_dir=run_dir,
            env=filter_env(dict(os.environ) if this_process else proc.environ()),
            owner_uid=os.getuid(),
            adopt={"pid": pid, "create_time": proc.create_time()},
        )
    except psutil.NoSuchProcess as e:
        raise DaemonError(
            f"pid {pid} is not running; nothing to adopt (use `guardian run` to start it)"
        ) from e
    except psutil.AccessDenied as e:
        raise UnsafeJobError(f"pid {pid}: may not inspect it ({e}); only its owner may adopt it") from e
    check_free(h, spec.name)
    reg.save_spec(h, spec)
    return spec, _daemon_note(h)


def check_owner(run_dir: str) -> None:
    try:
        st = os.stat(run_dir)
    except FileNotFoundError as e:
        raise DaemonError(f"{run_dir}: no such run directory") from e
    if st.st_uid != os.getuid():
        raise UnsafeJobError(
            f"refused: {run_dir} is owned by uid {st.st_uid}, not {os.getuid()}; "
            "only the owner of a run may adopt it (ask them to run `guardian adopt`)"
        )


def command_line(proc: psutil.Process, this_process: bool) -> list[str]:
    """The command that restarts the run: for ourselves the interpreter as invoked
    (``sys.orig_argv`` keeps ``-m module``), for another process its /proc cmdline."""
    if this_process:
        argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
        return [sys.executable, *argv[1:]]
    argv = proc.cmdline()
    if not argv:
        raise DaemonError(f"pid {proc.pid}: its command line is unreadable; register it with `guardian run`")
    if os.sep not in argv[0]:
        path = proc.environ().get("PATH")
        argv[0] = shutil.which(argv[0], path=path) or proc.exe()
    return argv


def job_name(run_dir: str) -> str:
    base = os.path.basename(run_dir.rstrip(os.sep))
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in base).strip(".-_") or "job"
    return cleaned[:64]


def check_free(h: reg.Home, name: str) -> None:
    """A job of that name that is still live must not be overwritten (a finished one may)."""
    if not os.path.exists(h.job_file(name, "job.json")):
        return
    try:
        st = reg.load_state(h, name)
    except BadFileError as e:
        raise DaemonError(
            f"job {name!r} exists and its state is unreadable ({e}); choose another name"
        ) from e
    if st is not None and st.state not in (*TERMINAL, "held"):
        raise DaemonError(f"job {name!r} is already registered and {st.state}; choose another name")


def _daemon_note(h: reg.Home) -> str:
    from .procs import ProcId, Unknowable, is_alive

    try:
        ident = ProcId.from_dict(reg.read_json(h.path("daemon.json")))
        alive = is_alive(ident)
    except (BadFileError, Unknowable):
        alive = False
    return "the daemon watches it now" if alive else "no daemon runs yet; `guardian watch` will watch it"


def adopt_into(st: JobState, spec: JobSpec, h: reg.Home, boot: str) -> bool:
    """Give a newly registered adopted job its attempt: the running process itself.

    True when it did. The attempt has no shim: its end is known from the process
    vanishing and run.json (``finished`` → done, ``preempted`` → requeue, else a crash).
    """
    if not spec.adopt or st.state != PENDING or any(a.child == spec.adopt for a in st.attempts):
        return False
    n = st.started + 1
    os.makedirs(h.attempt_dir(st.name, n), mode=0o700, exist_ok=True)
    a = Attempt(
        n=n,
        boot_id=boot,
        started=float(spec.adopt.get("create_time") or time.time()),
        child=dict(spec.adopt),
        adopted=True,
        resume_from=_resumed_from(spec.run_dir),
    )
    st.attempts.append(a)
    st.state, st.reason = (
        RUNNING,
        f"adopted pid {spec.adopt.get('pid')} (started by hand); restarted if it dies",
    )
    reg.point_latest(h, st.name, n)
    return True


def _resumed_from(run_dir: str) -> str | None:
    try:
        status = read_run_status(run_dir) or {}
    except BadFileError:
        return None
    found = status.get("resumed_from")
    return os.path.basename(found) if isinstance(found, str) else None
