"""Taking a run directory: create it durably, check it is usable, hold its lock.

One process (rank 0) holds a run directory's lock for the whole run, so two trainings
never write checkpoints into one directory. Creating the directory fsyncs each new
entry's parent: a power cut must not lose the directory that will hold the
checkpoints (on file systems that do not journal directory entries it could).
"""

from __future__ import annotations

import os

from . import fsops
from .errors import CheckpointWriteError, GuardianError
from .locking import RunLock


def make_run_dir(run_dir: str) -> None:
    """Create the run directory (and missing parents) durably (``fsops.make_dirs_durably``:
    each new entry's parent is fsynced) and check that this process can write in it."""
    try:
        fsops.make_dirs_durably(run_dir)
    except FileExistsError as e:
        raise CheckpointWriteError(
            f"checkpoint directory {run_dir} exists and is not a directory; choose another dir=."
        ) from e
    except OSError as e:
        raise CheckpointWriteError(
            f"cannot create checkpoint directory {run_dir}: {e.strerror}. Choose a writable location with dir=.",
            e.errno,
        ) from e
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise CheckpointWriteError(
            f"checkpoint directory {run_dir} is not writable by this user; fix its permissions or choose another dir=."
        )


def take_run_dir(run_dir: str, *, lock: bool) -> RunLock | None:
    """Create ``run_dir`` if needed and, with ``lock``, acquire its run lock."""
    make_run_dir(run_dir)
    if not lock:
        return None
    try:
        run_lock = RunLock(run_dir)
        run_lock.acquire()
    except GuardianError:
        raise
    except OSError as e:
        raise CheckpointWriteError(
            f"cannot use checkpoint directory {run_dir}: {e.strerror}; fix its permissions or choose another dir=.",
            e.errno,
        ) from e
    return run_lock
