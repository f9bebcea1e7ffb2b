"""Putting a snapshot on disk: the seam between the guard and the commit protocol.

``SyncWriter`` writes and commits before ``submit`` returns. An asynchronous writer
has the same interface: ``submit`` returns once the snapshot's tensors are safe to
mutate again (copied to a staging area), and the commit completes in the
background. Whatever the writer, ``on_committed(path, manifest)`` runs after the
checkpoint is durable (retention hangs off it), and a failure is never lost: it is
re-raised by the next ``submit``/``wait``/``check``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol

from .commit import CheckpointTxn, check_free_space
from .format.layout import rank_prefix
from .format.manifest import Manifest
from .state.snapshot import Snapshot, write_files

Committed = Callable[[str, Manifest], None]
WriterMode = Literal["sync", "async"]

# Space needed beyond the tensor bytes: state.json, manifest, file-system slack.
SPACE_MARGIN = 1.02
SPACE_SLACK = 1 << 20


class Writer(Protocol):
    """What the guard needs of a writer; ``SyncWriter`` and ``async_writer.AsyncWriter`` conform.

    ``submit`` returns the committed path, or None when the commit finishes in the
    background. ``mode`` tells the saver whether a commit may still be in flight
    ("async": ``wait`` before anything that must see it, such as a resume or exit).
    The distributed writer (``dist_async``) shares ``mode``/``wait``/``check``/``close``
    but takes per-rank snapshots in ``submit``; the saver calls it on its own path.
    """

    @property
    def mode(self) -> WriterMode: ...

    def submit(self, run_dir: str, snap: Snapshot, manifest: Manifest, on_committed: Committed) -> str | None:
        """Put ``snap`` on disk as ``manifest.name``; the state may change once this returns."""
        ...

    def wait(self) -> None:
        """Block until nothing is in flight; re-raise a failure of the last save."""
        ...

    def check(self) -> None:
        """Re-raise a failure of a finished background save, without blocking."""
        ...

    def close(self) -> None:
        """Finish or abandon what is in flight and release resources (staging memory)."""
        ...


class SyncWriter:
    mode: Literal["sync"] = "sync"

    def submit(self, run_dir: str, snap: Snapshot, manifest: Manifest, on_committed: Committed) -> str:
        check_free_space(run_dir, int(snap.tensor_bytes * SPACE_MARGIN) + SPACE_SLACK)
        with CheckpointTxn(run_dir, manifest.name) as txn:
            write_files(txn, snap, rank_prefix(0, manifest.world_size))
            path = txn.commit(manifest)
        on_committed(path, manifest)
        return path

    def wait(self) -> None:
        """Nothing is ever in flight."""

    def check(self) -> None:
        """Sync saves raise directly; nothing to report later."""

    def close(self) -> None:
        pass
