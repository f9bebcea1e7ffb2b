"""Opening entries of a run directory as if every name in it were hostile.

A run directory may have been edited by hand, restored from a backup, or planted
by someone else. Every reader therefore opens what it finds *relative to a
directory it trusts* (the run directory the user named, or a checkpoint inside
it), one path component at a time, and:

* never follows a symlink — not the last component (``O_NOFOLLOW``) and not a
  directory on the way (each one opened ``O_DIRECTORY | O_NOFOLLOW``), so nothing
  outside the directory is ever read through a planted link;
* never blocks: ``O_NONBLOCK`` on open, then ``fstat``, and anything but a regular
  file (a FIFO, a socket, a device, a directory) is refused before one byte is read;
* knows how large the file is before reading it, so callers can refuse a file
  that exceeds its budget without reading (or parsing) it.

Errors are ``UnsafeCheckpointError`` (something that must not be there) or
``FileNotFoundError`` (absent: the caller decides whether that is damage).
Torch-free.
"""

from __future__ import annotations

import errno
import os
import stat

from ..errors import UnsafeCheckpointError

_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _refusal(full: str, e: OSError) -> UnsafeCheckpointError:
    if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
        why = "a symlink or a non-directory stands on its path; guardian never follows links out of a run directory"
    else:
        why = e.strerror or str(e)
    return UnsafeCheckpointError(f"{full}: cannot open safely ({why})")


def open_dir(root: str, rel: str = "") -> int:
    """A descriptor on directory ``root/rel``; ``root`` itself may be a symlink (the
    user chose it), nothing below it may."""
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise _refusal(root, e) from e
    for part in [p for p in rel.split("/") if p]:
        try:
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            os.close(fd)
            raise
        except OSError as e:
            os.close(fd)
            raise _refusal(os.path.join(root, rel), e) from e
        os.close(fd)
        fd = nxt
    return fd


def open_regular(root: str, rel: str) -> tuple[int, os.stat_result]:
    """``(fd, stat)`` of the regular file ``root/rel``, opened read-only without
    following any link below ``root`` and without blocking. The caller closes fd."""
    full = os.path.join(root, rel)
    head, _, name = rel.rpartition("/")
    dfd = open_dir(root, head)
    try:
        try:
            before = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            raise
        except OSError as e:
            raise _refusal(full, e) from e
        if not stat.S_ISREG(before.st_mode):  # refuse before open: no open() side effects
            raise UnsafeCheckpointError(
                f"{full}: not a regular file (symlinks and devices are refused; this is {_kind(before.st_mode)})"
            )
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=dfd)
        except FileNotFoundError:
            raise
        except OSError as e:
            raise _refusal(full, e) from e
    finally:
        os.close(dfd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
        os.close(fd)
        raise UnsafeCheckpointError(f"{full}: replaced while being opened; refusing it")
    return fd, st


def read_fd(fd: int, size: int, what: str) -> bytes:
    """Exactly ``size`` bytes from the start of ``fd`` (a short file is damage)."""
    buf = bytearray(size)
    view = memoryview(buf)
    done = 0
    while done < size:
        n = os.preadv(fd, [view[done:]], done)
        if n == 0:
            raise UnsafeCheckpointError(f"{what}: shrank while being read ({done} of {size} bytes)")
        done += n
    return bytes(buf)


def read_bounded(root: str, rel: str, limit: int, kind: str) -> bytes:
    """The whole regular file ``root/rel``, refused *before reading* when larger than
    ``limit`` bytes (``kind`` names the file type in the message)."""
    full = os.path.join(root, rel)
    fd, st = open_regular(root, rel)
    try:
        if st.st_size > limit:
            raise UnsafeCheckpointError(
                f"{full}: {st.st_size} bytes is more than a {kind} of this checkpoint can need "
                f"(limit {limit}); refusing to read it"
            )
        return read_fd(fd, st.st_size, full)
    finally:
        os.close(fd)
