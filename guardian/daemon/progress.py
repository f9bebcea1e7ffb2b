"""What the job's checkpoints say: newest valid checkpoint, cheaply, and whether it moved.

Uses only ``guardian.format.reader`` (torch-free). Progress tracking re-reads the run
directory only when its listing changes, and checks manifests and sizes (not hashes):
it runs every poll. The resume point recorded for an attempt is fully verified once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import GuardianError
from ..format import reader
from ..format.layout import parse_checkpoint_name


@dataclass(frozen=True)
class Newest:
    name: str
    path: str
    mark: tuple[int, int]  # (seq, step): the order checkpoints were committed in
    bytes: int
    created: float = 0.0  # when it was committed (the manifest's created_unix)


class ProgressCache:
    """Newest valid checkpoint per run dir, recomputed only when the listing changes."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[tuple[str, ...], Newest | None]] = {}

    def newest(self, run_dir: str) -> Newest | None:
        names = _checkpoint_names(run_dir)
        cached = self._seen.get(run_dir)
        if cached is not None and cached[0] == names:
            return cached[1]
        found = newest_checked(run_dir, deep=False)
        self._seen[run_dir] = (names, found)
        return found


def _checkpoint_names(run_dir: str) -> tuple[str, ...]:
    try:
        return tuple(sorted(n for n in os.listdir(run_dir) if parse_checkpoint_name(n)))
    except OSError:
        return ()


def newest_checked(run_dir: str, *, deep: bool) -> Newest | None:
    """The newest checkpoint that verifies (hashes too when ``deep``)."""
    try:
        info = reader.newest_valid(run_dir, verify=deep)
    except (GuardianError, OSError):
        return None
    if info is None or info.manifest is None:
        return None
    m = info.manifest
    return Newest(info.name, info.path, (m.seq, m.step), m.total_bytes, m.created_unix)


def valid_before(run_dir: str, name: str | None) -> Newest | None:
    """The newest fully verified checkpoint older than ``name`` (for stepping back).

    ``None`` (the attempt started from scratch) has nothing older: the answer is None.
    """
    try:
        infos = reader.list_checkpoints(run_dir, verify=False)
    except (GuardianError, OSError):
        return None
    names = [i.name for i in infos]
    if name not in names:
        return None
    for info in reversed(infos[: names.index(name)]):
        checked = reader.inspect_checkpoint(info.path, verify=True)
        if checked.valid and checked.manifest is not None:
            m = checked.manifest
            return Newest(checked.name, checked.path, (m.seq, m.step), m.total_bytes, m.created_unix)
    return None
