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
import logging
import mmap
import os
import random
import secrets
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from . import fsops, knobs
from .staging import ALIGN, StagedImage
from .threads import lower_thread_priority

log = logging.getLogger(__name__)

CHUNK = 64 * 1024 * 1024
_DIRECT_REFUSED = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)
PROBE_BYTES = 4 * 1024 * 1024  # large enough to span several device requests
PROBE_PREFIX = ".tmp-direct-probe-"  # a temp name: readers ignore it, clean_stale removes it


def image_writer(path: str, *, chunk: int = CHUNK, direct: bool | None = None) -> Callable:
    """A ``writer(fd, chunks, hasher)`` for ``CheckpointTxn.add_file`` that writes one
    aligned buffer (the staging arena) to ``path``, the file ``fd`` refers to.
    O_DIRECT is used only where it has proven itself (``direct_io_proven``)."""
    use_direct = knobs.direct_io() if direct is None else direct

    def write(fd: int, chunks: Iterable[memoryview | StagedImage], hasher) -> int:
        pos = 0
        for image in chunks:
            staged = image if isinstance(image, StagedImage) else None
            view = memoryview(staged.view if staged else image).cast("B")
            seam_is_real = type(fsops.fs) is fsops.FS
            direct = use_direct and seam_is_real and pos == 0 and direct_io_proven(os.path.dirname(path))
            pos = _write_image(fd, path, view, pos, hasher, chunk, direct, staged)
        return pos

    return write


# ---------------------------------------------------------------------- the probe

_proven: dict[int, bool] = {}  # st_dev → O_DIRECT writes read back intact there
_proven_lock = threading.Lock()


def direct_io_proven(directory: str) -> bool:
    """Whether O_DIRECT writes into ``directory``'s file system come back intact.

    Why: a file system can accept O_DIRECT and silently corrupt large writes (seen on
    a FUSE file system with its own page cache) — every save then "succeeds" and none
    verifies. So before the first direct write to a file system, this process writes
    a probe file there with O_DIRECT, reads it back buffered (page cache dropped),
    and compares. On a mismatch or a refusal the answer is False for the rest of the
    process, said once in the log, and that file system gets buffered writes (the
    same bytes, only slower). A probe that cannot run (disk full) is not remembered."""
    try:
        device = os.stat(directory).st_dev
    except OSError:
        return False
    with _proven_lock:
        if device not in _proven:
            verdict = _probe(directory)
            if verdict is None:
                return False
            _proven[device] = verdict
        return _proven[device]


def _probe(directory: str) -> bool | None:
    """True: intact; False: refused or corrupted (logged); None: could not probe."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    path = os.path.join(directory, f"{PROBE_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")
    pattern = random.Random(secrets.randbits(64)).randbytes(PROBE_BYTES)
    try:
        problem = _write_direct_probe(path, pattern, flag)
        if problem is None and _read_back(path) != pattern:
            problem = "the bytes read back differ from the bytes written"
    except OSError as e:
        log.debug("could not probe O_DIRECT in %s: %s", directory, e)
        return None
    except Exception as e:  # noqa: BLE001 - a probe that breaks only costs speed: buffered writes are safe
        log.warning("the O_DIRECT probe in %s failed (%r); writing there buffered this time", directory, e)
        return None
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    if problem is not None:
        log.warning(
            "O_DIRECT writes in %s are not trustworthy (%s); writing checkpoints there buffered",
            directory,
            problem,
        )
        return False
    return True


def _write_direct_probe(path: str, pattern: bytes, flag: int) -> str | None:
    """Write ``pattern`` with O_DIRECT from an aligned buffer; a refusal is returned as
    the reason, any other error raised. Every view of the buffer is released before the
    buffer is closed, on every path (a live view makes ``mmap.close`` raise BufferError,
    which would mask the real outcome)."""
    buf = mmap.mmap(-1, len(pattern))  # anonymous mmap memory is page-aligned
    try:
        buf[:] = pattern
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | flag, 0o600)
        except OSError as e:
            if e.errno in _DIRECT_REFUSED:
                return f"O_DIRECT refused at open: {e.strerror}"
            raise
        try:
            with memoryview(buf) as view:
                problem = _write_all_direct(fd, view)
            if problem is None:
                os.fsync(fd)
            return problem
        finally:
            os.close(fd)
    finally:
        buf.close()


def _write_all_direct(fd: int, view: memoryview) -> str | None:
    done = 0
    while done < len(view):
        with view[done:] as rest:
            try:
                n = os.write(fd, rest)
            except OSError as e:
                if e.errno in _DIRECT_REFUSED:
                    return f"O_DIRECT write refused: {e.strerror}"
                raise
        if n <= 0:
            return "O_DIRECT write made no progress"
        done += n
    return None


def _read_back(path: str) -> bytes:
    """The probe file's bytes as the file system now returns them (buffered, with this
    file's cached pages dropped first so the read reaches the file system)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        chunks, offset = [], 0
        while chunk := os.pread(fd, 1 << 20, offset):
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _write_image(
    fd: int,
    path: str,
    view: memoryview,
    pos: int,
    hasher,
    chunk: int,
    direct: bool,
    staged: StagedImage | None,
) -> int:
    """Hash and write ``view`` at file offset ``pos``; returns the new offset.

    Hashing runs beside the disk on a helper thread (a single worker, so updates stay
    in file order); xxhash (measured: it releases the GIL) and the writes both run
    without the GIL, so the hash costs no wall time. Writes never wait for the hash:
    staged bytes are immutable until the save is committed. With ``staged``, both
    wait for each piece to be staged before touching it (pipelined with the copy).

    Priority: both threads run at normal priority while the image is still being
    staged (the trainer is blocked in ``submit`` then, so there is nobody to yield to
    and the disk should start at once), and drop to ``lower_thread_priority`` as soon
    as staging is complete and the trainer runs again."""
    polite = _Polite(staged)
    with ThreadPoolExecutor(1, thread_name_prefix="guardian-hash") as pool:
        hash_polite = _Polite(staged)
        hashed = [
            pool.submit(_hash_piece, hasher, p, end, staged, hash_polite)
            for p, end in _pieces(view, chunk, len(view) - len(view) % ALIGN)
        ]
        try:
            done = _write_pieces(fd, path, view, pos, chunk, direct, staged, polite)
        except BaseException:
            for f in hashed:  # do not hash what will never be written
                f.cancel()
            raise
        for f in hashed:
            f.result()
    return pos + done


class _Polite:
    """Lowers the calling thread's priority once, when staging is complete."""

    def __init__(self, staged: StagedImage | None) -> None:
        self.staged, self.done = staged, False

    def __call__(self) -> None:
        if not self.done and (self.staged is None or self.staged.complete):
            self.done = True
            lower_thread_priority()


def _hash_piece(hasher, piece: memoryview, end: int, staged: StagedImage | None, polite: _Polite) -> None:
    if staged is not None:
        # Not ``end``: hashing at ~30 GB/s while the trainer copies would take memory
        # bandwidth from the copy (the stall); it catches up with the disk at once.
        staged.wait_for(staged.total)
    polite()
    hasher.update(piece)


def _pieces(view: memoryview, chunk: int, aligned: int) -> list[tuple[memoryview, int]]:
    """(piece, end offset): CHUNK pieces that never straddle the aligned boundary (only
    the last is unaligned)."""
    bounds = list(range(0, aligned, chunk)) + [aligned, len(view)]
    bounds = sorted(set(b for b in bounds if b <= len(view)))
    return [(view[a:b], b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _write_pieces(
    fd: int,
    path: str,
    view: memoryview,
    pos: int,
    chunk: int,
    direct: bool,
    staged: StagedImage | None = None,
    polite: _Polite | None = None,
) -> int:
    aligned = len(view) - len(view) % ALIGN
    dfd = _open_direct(path) if direct and aligned else None
    done = 0
    try:
        for piece, end in _pieces(view, chunk, aligned):
            if staged is not None:
                staged.wait_for(end)
            if polite is not None:
                polite()
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
