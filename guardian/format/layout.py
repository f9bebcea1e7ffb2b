"""Names on disk: the run directory and the checkpoint directories inside it.

A *run directory* holds one training run::

    RUN/
      step-000000120/          a committed checkpoint (manifest.json inside, written last)
      step-000000120-1/        a second checkpoint taken at the same step
      .tmp-step-…/             a save in progress or abandoned by a crash; readers ignore it
      .trash-…/                a checkpoint being deleted by retention; readers ignore it
      set-aside/               corrupt or superseded checkpoints, moved here, never deleted
      run.json                 the run's status (running / finished / preempted / failed)
      heartbeat.json           liveness for the supervisor (step, phase, time)
      .lock                    held by the one process that trains into RUN

Only names matching ``CHECKPOINT_NAME_RE`` are ever considered checkpoints. Anything
starting with a dot is private to the writer. This module is torch-free.
"""

from __future__ import annotations

import re

FORMAT_ID = "guardian.checkpoint"
FORMAT_VERSION = 1

MANIFEST_FILE = "manifest.json"
STATE_FILE = "state.json"
TENSORS_FILE = "tensors.safetensors"
SHARED_FILE = "shared.safetensors"  # incremental saves: unchanged tensors, hard-linked between checkpoints

RUN_STATUS_FILE = "run.json"
HEARTBEAT_FILE = "heartbeat.json"
LOCK_FILE = ".lock"
SET_ASIDE_DIR = "set-aside"

TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"

HASH_ALGORITHM = "xxh3_128"

CHECKPOINT_NAME_RE = re.compile(
    r"^step-([0-9]{9,})(?:-([0-9]+))?\Z"
)  # \Z: no trailing newline; ASCII digits only


def checkpoint_name(step: int, duplicate: int = 0) -> str:
    """The directory name of the checkpoint taken at ``step``.

    ``duplicate`` > 0 distinguishes a second save at the same step (say a periodic
    save followed by a best-metric save after evaluation).
    """
    base = f"step-{step:09d}"
    return base if duplicate == 0 else f"{base}-{duplicate}"


def parse_checkpoint_name(name: str) -> tuple[int, int] | None:
    """``(step, duplicate)`` for a checkpoint directory name, or None if it is not one."""
    m = CHECKPOINT_NAME_RE.match(name)
    if not m:
        return None
    return int(m.group(1)), int(m.group(2) or 0)


def rank_prefix(rank: int, world_size: int) -> str:
    """Sub-directory of per-rank files; empty for a single-process run."""
    return "" if world_size <= 1 else f"rank-{rank:05d}/"
