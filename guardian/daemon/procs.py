"""Processes: identity that survives pid reuse, spawning attempts, killing trees.

A pid alone names a process only until it exits; after that the kernel may hand the
number to anything. Every process the daemon records is therefore a ``(pid,
create_time)`` pair plus the machine's boot id, and "alive" means all three match
(SkyPilot's rule). A zombie counts as dead: it no longer runs and only its parent
can reap it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import TypeGuard

import psutil

BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"


def boot_id() -> str:
    """This boot's id; ``GUARDIAN_BOOT_ID`` overrides it so tests can simulate a reboot."""
    override = os.environ.get("GUARDIAN_BOOT_ID")
    if override:
        return override
    try:
        with open(BOOT_ID_FILE) as f:
            return f.read().strip()
    except OSError:
        return f"unknown-{psutil.boot_time():.0f}"


@dataclass(frozen=True)
class ProcId:
    pid: int
    create_time: float

    def to_dict(self) -> dict:
        return {"pid": self.pid, "create_time": self.create_time}

    @classmethod
    def from_dict(cls, d: dict | None) -> ProcId | None:
        if not d or not isinstance(d.get("pid"), int):
            return None
        return cls(int(d["pid"]), float(d.get("create_time") or 0.0))


class Unknowable(Exception):
    """We may not look at the process (another user's): its identity cannot be decided."""


def identify(pid: int) -> ProcId | None:
    """The identity of a live pid, or None if no such (non-zombie) process exists."""
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return ProcId(pid, p.create_time())
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied as e:
        raise Unknowable(f"pid {pid}: access denied") from e


def is_alive(pid_id: ProcId | None) -> TypeGuard[ProcId]:
    """True when the recorded process still runs (same pid and same create time).

    Typed as a guard so that code past ``if not is_alive(p): return`` may use ``p.pid``.
    """
    if pid_id is None:
        return False
    now = identify(pid_id.pid)
    return now is not None and abs(now.create_time - pid_id.create_time) < 0.05


def attempt_alive(shim: dict | None, child: dict | None) -> bool:
    """Whether an attempt's shim or job still runs; True when we may not look (fail closed)."""
    try:
        return is_alive(ProcId.from_dict(shim)) or is_alive(ProcId.from_dict(child))
    except Unknowable:
        return True


def spawn_shim(attempt_dir: str, argv: list[str], cwd: str, env: dict[str, str]) -> subprocess.Popen:
    """Start one attempt: ``python -m guardian.daemon.shim`` in a new session.

    The shim's stdio are /dev/null; it opens the attempt's logs itself (append mode)
    so the logs do not depend on the daemon's file descriptors staying open.
    ``argv`` must be a list: a string would be run as one (oddly named) program.
    """
    if isinstance(argv, str) or not all(isinstance(a, str) for a in argv):
        raise TypeError("argv must be a list of strings (no shell); for a shell line use ['sh', '-c', LINE]")
    cmd = [sys.executable, "-m", "guardian.daemon.shim", attempt_dir, "--", *argv]
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        start_new_session=True,
        close_fds=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def session_members(sid: int, *, exclude: AbstractSet[int] = frozenset()) -> list[psutil.Process]:
    """Live processes of session ``sid`` (the shim's): the job and all it started."""
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.pid not in exclude and os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return out


def signal_process(pid_id: ProcId | None, sig: int) -> bool:
    """Send ``sig`` to one recorded process if it is still the same process."""
    if not is_alive(pid_id):
        return False
    try:
        os.kill(pid_id.pid, sig)
        return True
    except ProcessLookupError:
        return False


ATTEMPT_TAG = "GUARDIAN_ATTEMPT_TAG"  # set by the shim in the job's environment: its attempt dir


def tagged(tag: str | None) -> list[psutil.Process]:
    """Live processes whose environment carries ``GUARDIAN_ATTEMPT_TAG=tag``.

    Why: torchrun starts every rank with ``start_new_session=True``, so ranks (and their
    DataLoader workers) are not in the shim's session, and a rank orphaned by a dead
    torchrun has no parent link either. The environment is inherited by everything the
    job starts and survives reparenting, so it finds them all.
    """
    if not tag:
        return []
    needle = f"{ATTEMPT_TAG}={tag}".encode()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    out.append(psutil.Process(int(name)))
        except (OSError, psutil.Error):
            continue
    return out


def descendants(pid_id: ProcId | None) -> list[psutil.Process]:
    """Every live descendant of a recorded process (the shim is a child subreaper)."""
    if not is_alive(pid_id):
        return []
    try:
        return psutil.Process(pid_id.pid).children(recursive=True)
    except psutil.Error:
        return []


def ranks(child: ProcId | None) -> list[ProcId]:
    """The worker processes torchrun started: the launcher's direct children."""
    if not is_alive(child):
        return []
    out = []
    try:
        for p in psutil.Process(child.pid).children():
            try:
                out.append(ProcId(p.pid, p.create_time()))
            except psutil.Error:
                continue
    except psutil.Error:
        return []
    return out


def job_processes(shim: ProcId | None, child: ProcId | None, tag: str | None = None) -> list[psutil.Process]:
    """Everything that belongs to the attempt, except the shim itself.

    The union of the shim's session, the shim's descendants and the tagged processes:
    each alone misses something (ranks leave the session; orphans lose their parent;
    a job may scrub its environment).
    """
    sid = shim.pid if shim is not None else (child.pid if child else None)
    spare = {shim.pid} if shim is not None and is_alive(shim) else set()
    found: dict[int, psutil.Process] = {}
    groups = (
        session_members(sid, exclude=spare) if sid is not None else [],
        descendants(shim),
        descendants(child),
        tagged(tag),
    )
    for group in groups:
        for p in group:
            if p.pid not in spare and p.pid != os.getpid():
                found.setdefault(p.pid, p)
    return list(found.values())


def kill_tree(
    shim: ProcId | None, child: ProcId | None, sig: int = signal.SIGKILL, tag: str | None = None
) -> int:
    """Signal the job's process group and every other process of the attempt.

    The shim itself is spared (it must survive to record the exit status); DataLoader
    workers share the job's group, anything that called setsid/setpgid is still found
    through the session, and torchrun's ranks (own sessions) through the shim's
    descendants and ``tag``. Returns how many processes were signalled.
    """
    count = 0
    if child is not None and is_alive(child):
        try:
            os.killpg(child.pid, sig)
            count += 1
        except (ProcessLookupError, PermissionError):
            pass
    for p in job_processes(shim, child, tag):
        try:
            p.send_signal(sig)
            count += 1
        except psutil.Error:
            continue
    return count


def wait_gone(shim: ProcId | None, child: ProcId | None, tag: str | None, timeout: float) -> int:
    """Wait until the attempt's killed processes are gone; returns how many remain.

    A restart must not race the previous attempt's ranks still dying (they hold the
    run lock and the rendezvous port).
    """
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in job_processes(shim, child, tag) if _running(p)]
        if not left or time.monotonic() >= deadline:
            return len(left)
        time.sleep(0.05)


def _running(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def catches_signal(pid: int, sig: int) -> bool:
    """Whether ``pid`` has a handler for ``sig`` (bit sig-1 of SigCgt in /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (OSError, ValueError):
        pass
    return False


def dump_stacks(child: ProcId, stderr_path: str, wait: float) -> list[str]:
    """Collect evidence from a hung job before it is killed; returns what was done.

    SIGTTIN is sent only if the job catches it (the library's faulthandler hook):
    its default action would stop the process instead of dumping anything.
    """
    done = []
    if not is_alive(child):
        return ["process already gone"]
    _note(stderr_path, f"\n=== guardian: job hung; dumping stacks of pid {child.pid} at {time.ctime()} ===\n")
    if catches_signal(child.pid, signal.SIGTTIN):
        os.kill(child.pid, signal.SIGTTIN)
        done.append("faulthandler (SIGTTIN)")
        time.sleep(wait)
    else:
        done.append("no SIGTTIN handler registered; faulthandler dump skipped")
    py_spy = shutil.which("py-spy")
    if py_spy:
        out = _run_py_spy(py_spy, child.pid, wait)
        _note(stderr_path, out)
        done.append("py-spy dump")
    return done


def _run_py_spy(py_spy: str, pid: int, wait: float) -> str:
    try:
        r = subprocess.run(
            [py_spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=max(10.0, wait * 5)
        )
        return f"--- py-spy dump ---\n{r.stdout}{r.stderr}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"--- py-spy dump failed: {e} ---\n"


def _note(path: str, text: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
