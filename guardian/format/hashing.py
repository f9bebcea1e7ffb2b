"""Content hashing. xxh3-128 runs at memory speed, so verification is bound by the disk, not the CPU.

(torch.save's CRC32 costs more than the write itself; a cryptographic hash is not
needed because the manifest guards against accidents, not forgery.)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import xxhash

CHUNK = 8 * 1024 * 1024


def new_hasher() -> xxhash.xxh3_128:
    return xxhash.xxh3_128()


def hash_bytes(data: bytes | memoryview) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def hash_chunks(chunks: Iterable[bytes | memoryview]) -> str:
    h = new_hasher()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def hash_file(
    path: str | os.PathLike[str], progress: Callable[[int], object] | None = None
) -> tuple[str, int]:
    """``(hexdigest, size)`` of a file, read in large chunks without following symlinks
    and without blocking on a FIFO. ``progress(n)`` is told of each chunk of ``n`` bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        return hash_fd(fd, progress)
    finally:
        os.close(fd)


def hash_fd(fd: int, progress: Callable[[int], object] | None = None) -> tuple[str, int]:
    """``(hexdigest, size)`` of an open file, from offset 0 (the offset is not moved).
    ``progress(n)`` is called after each chunk of ``n`` bytes (a CLI progress bar)."""
    h = new_hasher()
    size = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while True:
        n = os.preadv(fd, [buf], size)
        if n == 0:
            break
        h.update(view[:n])
        size += n
        if progress is not None:
            progress(n)
    return h.hexdigest(), size
