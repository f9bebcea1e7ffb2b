"""One trainer per run directory.

Two processes training into the same directory would interleave checkpoints and
retention; guardian refuses instead. ``flock`` is released by the kernel when the
holder dies (even by SIGKILL), so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os

from .errors import RunLockedError
from .format.layout import LOCK_FILE


class RunLock:
    def __init__(self, run_dir: str) -> None:
        self.path = os.path.join(run_dir, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> None:
        # The lock is held on a read-only descriptor: a long-lived writable fd would keep
        # the file system "busy" (no read-only remount, no clean unmount) for no reason.
        fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(
                f"{os.path.dirname(self.path)} is in use by another training process (pid {holder}). "
                "Two runs must not write into one checkpoint directory: stop the other one, or give "
                "this run its own dir=."
            ) from None
        with open(self.path, "w") as f:  # who holds it, for the message above
            f.write(f"{os.getpid()}\n")
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
