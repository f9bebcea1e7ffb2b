"""The attempt shim: ``python -m guardian.daemon.shim ATTEMPT_DIR -- CMD ARGS...``.

Runs in its own session (the daemon starts it with setsid). It

1. records itself in ``shim.json`` (pid, create time, boot id) before anything else,
   so a daemon that dies right after spawning can still find it;
2. opens ``stdout.log``/``stderr.log`` in append mode — a restart never truncates a log;
3. starts the command in a new process group (so the daemon can kill the job's whole
   group while the shim survives to report), records it in ``child.json``;
   The job's environment gets ``GUARDIAN_ATTEMPT_TAG`` (the attempt dir) and the shim
   is a child subreaper, so the daemon finds every process of the attempt — torchrun's
   ranks start their own sessions;
4. forwards SIGTERM/SIGINT/SIGHUP/SIGUSR1/SIGUSR2 to the job, waits, and writes
   ``exit.json`` atomically: ``{returncode, signal, ended}``.

It imports nothing heavy: it is a few MB of Python next to each training process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import IO

import psutil

from ..format import strictjson
from ..smallfiles import write_small_file_atomically
from .procs import ATTEMPT_TAG, boot_id

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
SHIM_FILE, CHILD_FILE, EXIT_FILE = "shim.json", "child.json", "exit.json"
STDOUT_LOG, STDERR_LOG = "stdout.log", "stderr.log"


def _write(path: str, record: dict) -> None:
    write_small_file_atomically(path, strictjson.dumps(record))


def _identity(pid: int) -> dict:
    return {"pid": pid, "create_time": psutil.Process(pid).create_time(), "boot_id": boot_id()}


class _Forwarder:
    """Forwards signals to the job; those that arrive before it exists are replayed.

    A handler (not SIG_IGN) is installed before the fork on purpose: caught signals
    reset to their default in the exec'd child, ignored ones would be inherited.
    """

    def __init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self.pending: list[int] = []
        for sig in FORWARDED:
            signal.signal(sig, self.handle)

    def handle(self, signum: int, frame: object) -> None:
        if self.child is None:
            self.pending.append(signum)
            return
        try:
            self.child.send_signal(signum)
        except ProcessLookupError:
            pass

    def attach(self, child: subprocess.Popen) -> None:
        self.child = child
        for signum in self.pending:
            self.handle(signum, None)


def _exit_record(returncode: int) -> dict:
    sig = -returncode if returncode < 0 else None
    return {
        "returncode": returncode,
        "signal": sig,
        "signal_name": signal.Signals(sig).name if sig else None,
        "ended": time.time(),
    }


def become_subreaper() -> bool:
    """Make orphaned descendants (ranks whose torchrun died) reparent to the shim.

    Why: the daemon finds an attempt's processes through the shim's descendants; without
    this, a rank orphaned by its launcher would be reparented to init and escape. Linux
    only (prctl PR_SET_CHILD_SUBREAPER); elsewhere the environment tag still finds them.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _spawn_in_own_group(
    cmd: list[str], out: IO[bytes], err: IO[bytes], env: dict[str, str]
) -> subprocess.Popen:
    """Start the job as the leader of a new process group, so a kill reaches all it started.

    ``process_group`` needs Python 3.11; 3.10 (still supported) only has ``preexec_fn``,
    which is safe here because the shim runs no threads.
    """
    if sys.version_info >= (3, 11):
        return subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, process_group=0, close_fds=True, env=env
        )
    return subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, preexec_fn=os.setpgrp, close_fds=True, env=env
    )


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m guardian.daemon.shim ATTEMPT_DIR -- CMD ARGS...", file=sys.stderr)
        return 2
    attempt_dir, cmd = argv[0], argv[2:]
    _write(os.path.join(attempt_dir, SHIM_FILE), _identity(os.getpid()))
    out = open(os.path.join(attempt_dir, STDOUT_LOG), "ab")
    err = open(os.path.join(attempt_dir, STDERR_LOG), "ab")
    forwarder = _Forwarder()
    become_subreaper()
    env = dict(os.environ, **{ATTEMPT_TAG: os.path.abspath(attempt_dir)})
    try:
        child = _spawn_in_own_group(cmd, out, err, env)
    except OSError as e:
        err.write(f"guardian shim: cannot start {cmd[0]!r}: {e}\n".encode())
        err.flush()
        _write(os.path.join(attempt_dir, EXIT_FILE), {**_exit_record(127), "spawn_error": str(e)})
        return 127
    _write(os.path.join(attempt_dir, CHILD_FILE), _identity(child.pid))
    forwarder.attach(child)
    returncode = child.wait()
    _write(os.path.join(attempt_dir, EXIT_FILE), _exit_record(returncode))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
