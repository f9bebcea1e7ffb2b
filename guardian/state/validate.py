"""Checks on a checkpoint's reserved components before anything live is touched.

The integrity hashes are unkeyed: a forger can re-hash. So whatever verifies is still
treated as hostile until its contents are shown to make sense; a failure here raises
``CorruptCheckpointError`` and resume falls back to an older checkpoint.
"""

from __future__ import annotations

from typing import Any

from ..errors import CorruptCheckpointError

_PROGRESS_INTS = ("epoch", "global_step", "batch_in_epoch", "batches_total")


def check_restorable(meta: dict[str, tuple[str, Any]], path: str) -> None:
    """Validate the reserved components of ``meta`` (as ``snapshot.load_meta`` returns)."""
    if "progress" not in meta or "rng" not in meta:
        raise CorruptCheckpointError(f"{path}: the checkpoint lacks its progress or RNG state")
    progress = meta["progress"][1]
    if not isinstance(progress, dict):
        raise CorruptCheckpointError(f"{path}: progress is a {type(progress).__name__}, not a mapping")
    for key in _PROGRESS_INTS:
        value = progress.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CorruptCheckpointError(f"{path}: progress field {key!r} is {value!r}, not a count")
