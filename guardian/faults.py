"""Named fault points, so tests and drills can crash a save at an exact instruction.

``GUARDIAN_FAULT=<point>`` (optionally ``<point>@<n>`` for the n-th time the point
is reached, counting from 1) makes the process ``os._exit(FAULT_EXIT_CODE)`` right
there — no cleanup, no atexit, no flushing — like a SIGKILL at that line. Points
are listed in ``POINTS``. Unset, a fault point costs one dict lookup.
"""

from __future__ import annotations

import os
import sys

FAULT_EXIT_CODE = 86

POINTS = (
    "save.tmpdir_created",
    "save.file_written",
    "save.file_fsynced",
    "save.before_manifest",
    "save.manifest_written",
    "save.manifest_fsynced",
    "save.tmpdir_fsynced",
    "save.renamed",
    "save.parent_fsynced",
    "incremental.linked",
    "retention.renamed",
    "retention.deleted",
    "step.after_save",
    "remote.file_uploaded",
)

_counts: dict[str, int] = {}


def _target() -> tuple[str, int] | None:
    spec = os.environ.get("GUARDIAN_FAULT")
    if not spec:
        return None
    point, _, nth = spec.partition("@")
    return point, int(nth or 1)


def fault_point(name: str) -> None:
    """Crash here if ``GUARDIAN_FAULT`` names this point (and this is the n-th hit)."""
    target = _target()
    if target is None or target[0] != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == target[1]:
        sys.stderr.write(f"guardian: injected fault at {name} (hit {target[1]})\n")
        sys.stderr.flush()
        os._exit(FAULT_EXIT_CODE)
