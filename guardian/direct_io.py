"""Writing one in-memory file image with large O_DIRECT writes (buffered where unsupported).

Why O_DIRECT: on a machine with few cores, a background thread doing *buffered*
writes of gigabytes fights the training loop for CPU (page-cache copies, dirty page
writeback) — measured here, it slowed a foreground compute loop by 90 %, while
O_DIRECT writes from an aligned buffer slowed it by 9 % and reached the disk's
limit (docs/performance.md). The image is already laid out in the page-aligned
staging arena, so the aligned prefix goes to the device straight from it, in
``CHUNK`` pieces; only the last partial block goes through the page cache.

Invariants:
  * every byte is hashed exactly once, in file order, before it is written — the
    digest is the same as the buffered writer's, and the files are byte-identical;
  * a second descriptor with O_DIRECT is opened on the same path; the transaction's
    own descriptor writes only the unaligned tail (a range the direct writes never
    touch), and its fsync covers the whole inode;
  * where O_DIRECT is refused (tmpfs, some network/FUSE file systems: EINVAL at open
    or at the first write) the rest of the image is written buffered — correct,
    only slower;
  * when the file-system seam (``fsops.fs``) has been replaced (fault-injection and
    crash-state tests) nothing bypasses it: every byte goes through ``fs.write``.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from . import fsops, knobs
from .staging import ALIGN

CHUNK = 64 * 1024 * 1024
_DIRECT_REFUSED = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)


def image_writer(path: str, *, chunk: int = CHUNK, direct: bool | None = None) -> Callable:
    """A ``writer(fd, chunks, hasher)`` for ``CheckpointTxn.add_file`` that writes one
    aligned buffer (the staging arena) to ``path``, the file ``fd`` refers to."""
    use_direct = knobs.direct_io() if direct is None else direct

    def write(fd: int, chunks: Iterable[memoryview], hasher) -> int:
        pos = 0
        for image in chunks:
            view = memoryview(image).cast("B")
            seam_is_real = type(fsops.fs) is fsops.FS
            pos = _write_image(fd, path, view, pos, hasher, chunk, use_direct and seam_is_real and pos == 0)
        return pos

    return write


def _write_image(fd: int, path: str, view: memoryview, pos: int, hasher, chunk: int, direct: bool) -> int:
    """Hash and write ``view`` at file offset ``pos``; returns the new offset.

    Hashing runs one chunk ahead of the disk on a helper thread (a single worker, so
    updates stay in file order); xxhash and the writes both release the GIL, so the
    hash costs no wall time. Writes never wait for the hash: the arena is immutable
    until the save is committed."""
    with ThreadPoolExecutor(1, thread_name_prefix="guardian-hash") as pool:
        hashed = [pool.submit(hasher.update, p) for p in _pieces(view, chunk, len(view) - len(view) % ALIGN)]
        done = _write_pieces(fd, path, view, pos, chunk, direct)
        for f in hashed:
            f.result()
    return pos + done


def _pieces(view: memoryview, chunk: int, aligned: int) -> list[memoryview]:
    """CHUNK pieces that never straddle the aligned boundary (only the last is unaligned)."""
    bounds = list(range(0, aligned, chunk)) + [aligned, len(view)]
    bounds = sorted(set(b for b in bounds if b <= len(view)))
    return [view[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def _write_pieces(fd: int, path: str, view: memoryview, pos: int, chunk: int, direct: bool) -> int:
    aligned = len(view) - len(view) % ALIGN
    dfd = _open_direct(path) if direct and aligned else None
    done = 0
    try:
        for piece in _pieces(view, chunk, aligned):
            end = done + len(piece)
            if dfd is not None and end <= aligned:
                if _pwrite_direct(dfd, piece, pos + done):
                    done = end
                    continue
                os.close(dfd)
                dfd = None
            _write_buffered(fd, piece, pos + done)
            done = end
    finally:
        if dfd is not None:
            os.close(dfd)
    return done


def _open_direct(path: str) -> int | None:
    """A second, O_DIRECT descriptor on ``path``; None where the file system refuses it."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in _DIRECT_REFUSED:
            return None
        raise


def _pwrite_direct(dfd: int, piece: memoryview, offset: int) -> bool:
    """Write an aligned piece; False when the file system rejects O_DIRECT writes
    (nothing of the piece is then on disk, so the caller rewrites it buffered)."""
    written = 0
    while written < len(piece):
        try:
            n = os.pwrite(dfd, piece[written:], offset + written)
        except OSError as e:
            if e.errno in _DIRECT_REFUSED and written == 0:
                return False
            raise
        if n == 0:
            raise OSError(errno.EIO, "O_DIRECT write made no progress", None)
        written += n
    return True


def _write_buffered(fd: int, piece: memoryview, offset: int) -> None:
    """Through the seam, at ``offset`` (after direct writes the fd's own offset is stale;
    a replaced seam never saw direct writes, so its writes are already sequential)."""
    if type(fsops.fs) is fsops.FS:
        os.lseek(fd, offset, os.SEEK_SET)
    fsops.fs.write(fd, piece)
