"""Reading job and run-directory files that may be hostile, without ever blocking.

The daemon reads files other people and other programs can put in place: job files
edited by hand or left by another version, and a run directory's ``run.json`` and
``heartbeat.json``. One such file must cost only *its* job, never the daemon. So
every read here

* opens with ``O_NONBLOCK | O_NOFOLLOW``: a FIFO cannot block the loop and a symlink
  (in or out of the tree) is refused instead of followed;
* ``fstat``s the open descriptor first and refuses anything but a regular file;
* checks the size before reading a byte, and reads at most the limit;
* parses with the strict JSON reader and insists on a JSON object.

Any refusal is a ``BadFileError`` whose message names the file, says what is wrong
and what to do; callers turn it into a held job (daemon) or a held row (``status``).
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any

from ..errors import GuardianError
from ..format import strictjson
from ..format.layout import HEARTBEAT_FILE, RUN_STATUS_FILE
from . import DaemonError

# Generous for any honest file: a job's environment, a state with 100 attempts.
JOB_FILE_LIMIT = 1 << 20
STATE_FILE_LIMIT = 4 << 20
RUN_FILE_LIMIT = 1 << 20

_KINDS = {
    stat.S_IFDIR: "directory",
    stat.S_IFIFO: "FIFO",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
}


class BadFileError(DaemonError):
    """A job or run file the daemon refuses to use; the job it belongs to is held."""


def read_json_object(path: str, limit: int) -> dict[str, Any] | None:
    """The JSON object in ``path``; None if the file does not exist.

    Raises ``BadFileError`` for anything else that is not a regular file of at most
    ``limit`` bytes holding one JSON object.
    """
    data = read_bytes(path, limit)
    if data is None:
        return None
    try:
        obj = strictjson.loads(data, what=path, max_bytes=limit)
    except GuardianError as e:
        raise BadFileError(f"{e}; move the file aside (or fix it) to continue") from e
    if not isinstance(obj, dict):
        raise BadFileError(
            f"{path}: holds a JSON {type(obj).__name__}, not an object; move it aside (or fix it) to continue"
        )
    return obj


def read_bytes(path: str, limit: int) -> bytes | None:
    """At most ``limit`` bytes of a regular file, or None if it does not exist."""
    fd = open_regular(path)
    if fd is None:
        return None
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise BadFileError(f"{path}: {size} bytes, over the {limit}-byte limit; move it aside")
        return _read_at_most(fd, limit + 1, path)
    finally:
        os.close(fd)


def read_tail(path: str, limit: int) -> bytes:
    """The last ``limit`` bytes of a regular file (b"" if absent): logs, events."""
    fd = open_regular(path)
    if fd is None:
        return b""
    try:
        size = os.fstat(fd).st_size
        os.lseek(fd, max(0, size - limit), os.SEEK_SET)
        return os.read(fd, limit)  # a regular file: one read returns all that is asked
    finally:
        os.close(fd)


def open_regular(path: str) -> int | None:
    """A read-only descriptor of a regular file, None if absent, never blocking."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise BadFileError(f"{path}: is a symlink; the daemon reads only regular files") from e
        raise BadFileError(f"{path}: cannot be opened ({e.strerror})") from e
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = _KINDS.get(stat.S_IFMT(mode), "special file")
        raise BadFileError(f"{path}: is a {kind}, not a regular file; remove it")
    return fd


def _read_at_most(fd: int, n: int, path: str) -> bytes:
    chunks, left = [], n
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 16))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    data = b"".join(chunks)
    if len(data) >= n:  # it grew after fstat
        raise BadFileError(f"{path}: grew past the {n - 1}-byte limit while being read; move it aside")
    return data


def check_regular_or_absent(path: str) -> None:
    """Raise ``BadFileError`` unless ``path`` is missing or a regular file (not followed)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise BadFileError(f"{path}: is a symlink; the daemon reads only regular files")
    if not stat.S_ISREG(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "special file")
        raise BadFileError(f"{path}: is a {kind}, not a regular file; remove it")


def read_run_status(run_dir: str) -> dict[str, Any] | None:
    """The run's ``run.json`` (the library's word), read as a possibly hostile file."""
    return read_json_object(os.path.join(run_dir, RUN_STATUS_FILE), RUN_FILE_LIMIT)


def read_run_heartbeat(run_dir: str) -> dict[str, Any] | None:
    """The run's ``heartbeat.json``, read as a possibly hostile file."""
    return read_json_object(os.path.join(run_dir, HEARTBEAT_FILE), RUN_FILE_LIMIT)


def check_run_dir(run_dir: str) -> None:
    """Raise ``BadFileError`` if the files the daemon reads in ``run_dir`` are not regular."""
    for leaf in (RUN_STATUS_FILE, HEARTBEAT_FILE):
        check_regular_or_absent(os.path.join(run_dir, leaf))
