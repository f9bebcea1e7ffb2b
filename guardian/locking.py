"""One trainer per run directory.

Two processes training into the same directory would interleave checkpoints and
retention; guardian refuses instead. ``flock`` is released by the kernel when the
holder dies (even by SIGKILL), so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from .errors import CheckpointWriteError, RunLockedError
from .format.layout import LOCK_FILE

# The lock file is opened like every other run-directory entry: a planted symlink is
# never followed (nothing outside the run directory is created or written), a FIFO
# never blocks, and anything but a regular file is refused with a clear message.
_LOCK_FLAGS = os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_WOULD_BLOCK = (errno.EWOULDBLOCK, errno.EAGAIN)


class RunLock:
    def __init__(self, run_dir: str) -> None:
        self.path = os.path.join(run_dir, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> None:
        # The lock is held on a read-only descriptor: a long-lived writable fd would keep
        # the file system "busy" (no read-only remount, no clean unmount) for no reason.
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder(fd)
            os.close(fd)
            if e.errno in _WOULD_BLOCK:
                raise RunLockedError(
                    f"{os.path.dirname(self.path)} is in use by another training process (pid {holder}). "
                    "Two runs must not write into one checkpoint directory: stop the other one, or give "
                    "this run its own dir=."
                ) from None
            raise CheckpointWriteError(
                f"cannot lock {self.path}: the file system refused flock ({e.strerror or e}). guardian "
                "needs flock to keep two trainers out of one run directory; on Lustre mount with "
                "'-o flock', on NFS make sure lockd runs, or put the run directory on a local disk.",
                e.errno,
            ) from e
        self._record_holder()
        self._fd = fd

    def _open(self) -> int:
        try:
            fd = os.open(self.path, _LOCK_FLAGS, 0o644)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
                raise self._not_a_lock_file("a symlink, a socket or a directory") from e
            raise
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise self._not_a_lock_file("a FIFO or a device" if not stat.S_ISDIR(mode) else "a directory")
        return fd

    def _not_a_lock_file(self, what: str) -> CheckpointWriteError:
        return CheckpointWriteError(
            f"{self.path} is {what}, not guardian's lock file; refusing to follow or write it. "
            "Remove it (nothing of the run is lost) and start again."
        )

    def _record_holder(self) -> None:
        """Write our pid for the message another process shows (never through a link)."""
        fd = os.open(self.path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _holder(fd: int) -> str:
    try:
        return os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
    except OSError:
        return "unknown"
