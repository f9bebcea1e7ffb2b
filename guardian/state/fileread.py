"""Reading exact byte ranges of checkpoint files.

Both the whole-file restore (``snapshot``) and lazy shard reads (``dtensor``) read
straight into caller-owned buffers with ``preadv``; a short read means the file is
shorter than its header promised, which is corruption, never a retry.
"""

from __future__ import annotations

import os

from ..errors import CorruptCheckpointError


def preadv_exactly(fd: int, views: list[memoryview], offset: int, path: str) -> None:
    """Fill ``views`` from ``fd`` starting at ``offset``, or raise CorruptCheckpointError."""
    while views:
        n = os.preadv(fd, views, offset)
        if not n:
            raise CorruptCheckpointError(f"{path}: file ended early (truncated)")
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views = views[1:]
        if n:
            views = [views[0][n:], *views[1:]]
