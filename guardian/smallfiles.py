"""Atomic replacement of small files: status, heartbeat, job and plan files.

Both the library and the daemon write small JSON files that readers may open at any
moment (``run.json``, ``heartbeat.json``, the daemon's job state). A reader must see
either the old content or the new one, never half of each, so every such write goes
tmp file → (fsync) → rename → (fsync of the directory). This module depends on
nothing but the standard library, so the daemon can use it without importing the
checkpoint commit protocol (``guardian.commit``), which is about checkpoints only.
"""

from __future__ import annotations

import os
import secrets


def write_small_file_atomically(path: str, data: bytes, *, durable: bool = True, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically.

    ``durable=False`` skips the fsyncs, for files that only have to be atomic (the
    heartbeat, rewritten every few seconds). ``mode`` applies to a newly written
    file: 0o600 for files that may hold secrets (a job's environment).
    """
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(3)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(os.path.dirname(path) or ".")


def fsync_dir(path: str) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
