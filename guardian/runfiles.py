"""The run's status and heartbeat files: the contract between library and supervisor.

Torch-free. The library writes them; ``guardian watch`` and ``guardian status`` read
them. Both are small JSON objects replaced atomically (tmp + rename), so a reader
never sees half a file.

run.json      {"state": "running"|"finished"|"preempted"|"failed", "pid", "step",
               "epoch", "updated", "last_checkpoint", "exit_code", "error": {...}|null,
               "early_stopped": bool}
              ``finished`` is the "done" marker: a supervisor restarts nothing whose
              run.json says finished and whose process exited 0.
heartbeat.json {"pid", "step", "epoch", "phase": "init"|"load"|"train"|"eval"|"save"|"done",
               "time", "step_interval_p99": seconds or null}
"""

from __future__ import annotations

import os
import time
from typing import Any

from .errors import GuardianError
from .format import safeio, strictjson
from .format.layout import HEARTBEAT_FILE, RUN_STATUS_FILE
from .smallfiles import write_small_file_atomically

RUN_STATES = ("running", "finished", "preempted", "failed")
PHASES = ("init", "load", "train", "eval", "save", "done")


def write_status(run_dir: str, state: str, **fields: Any) -> None:
    if state not in RUN_STATES:
        raise ValueError(f"unknown run state {state!r}")
    record = {"state": state, "pid": os.getpid(), "updated": time.time(), **fields}
    write_small_file_atomically(os.path.join(run_dir, RUN_STATUS_FILE), strictjson.dumps_pretty(record))


def write_heartbeat(
    run_dir: str, step: int, epoch: int, phase: str, p99: float | None = None, **totals: int
) -> None:
    """``totals``: the loop's length when known (``epochs_total``), for progress and ETA."""
    record = {
        **totals,
        "pid": os.getpid(),
        "step": step,
        "epoch": epoch,
        "phase": phase,
        "time": time.time(),
        "step_interval_p99": p99,
    }
    write_small_file_atomically(
        os.path.join(run_dir, HEARTBEAT_FILE), strictjson.dumps(record), durable=False
    )


MAX_RUN_FILE_BYTES = 1 << 20


def _read(path: str) -> dict[str, Any] | None:
    """A status file, or None when absent, oversized, not a regular file (a FIFO
    would block a reader forever) or not a JSON object."""
    try:
        data = safeio.read_bounded(
            os.path.dirname(path) or ".", os.path.basename(path), MAX_RUN_FILE_BYTES, "run file"
        )
    except (FileNotFoundError, GuardianError):
        return None
    try:
        obj = strictjson.loads(data, what=path)
    except GuardianError:
        return None
    return obj if isinstance(obj, dict) else None


def read_status(run_dir: str) -> dict[str, Any] | None:
    return _read(os.path.join(run_dir, RUN_STATUS_FILE))


def read_heartbeat(run_dir: str) -> dict[str, Any] | None:
    return _read(os.path.join(run_dir, HEARTBEAT_FILE))
