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

from .commit import CheckpointTxn, check_free_space
from .format.layout import rank_prefix
from .format.manifest import Manifest
from .state.snapshot import Snapshot, write_files

Committed = Callable[[str, Manifest], None]

# Space needed beyond the tensor bytes: state.json, manifest, file-system slack.
SPACE_MARGIN = 1.02
SPACE_SLACK = 1 << 20


class SyncWriter:
    mode = "sync"

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
