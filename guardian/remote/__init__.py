"""The remote tier: replicate committed checkpoints to object storage (any fsspec URL)
and resume from there on a node whose run directory holds nothing restorable.

``store`` is the fsspec seam, ``upload`` the background replicator, ``fetch`` the
download-and-verify path. docs/remote.md is the user's guide.
"""

from __future__ import annotations

from typing import Any

from .store import RemoteStore, redact

__all__ = ["RemoteStore", "check_target", "redact", "start_replication"]


def check_target(url: str) -> None:
    """At ``protect()``: the prefix must be writable now (``RemoteStoreError`` if not)."""
    RemoteStore(url).check_writable()


def start_replication(saver: Any, url: str | None, is_leader: bool) -> Any:
    """Register a replicator as a commit listener of ``saver`` (rank 0 replicates;
    the checkpoint is whole once rank 0 committed it). None when not replicating."""
    if not url or not is_leader:
        return None
    from .upload import Replicator

    replicator = Replicator(RemoteStore(url), saver.run_dir, saver.retention, saver.best)
    saver.add_listener(replicator.committed, replicator.close)
    return replicator
