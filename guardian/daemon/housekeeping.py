"""Housekeeping: a job that restarts a thousand times must not fill the daemon's disk.

systemd's journal rotation is the anchor. Bounded, per job:

* attempt directories (and their records in state.json): the first attempt (how the
  job started), the latest failure (why it last broke) and the last ``keep_attempts``
  are kept; older ones are deleted once an attempt ends;
* ``events.jsonl`` and each attempt's ``stdout.log``/``stderr.log`` are rotated when
  larger than ``log_max_bytes``: the file moves (or, for a log the job still writes
  through the shim's O_APPEND descriptor, is copied) to ``NAME.1`` — replacing the
  previous ``.1`` — and starts empty. At most twice the limit per file remains.

``daemon.log`` rotates the same way through the logging handler (``cli/daemon.py``).
Checkpoints are never touched here: their retention is the library's (``keep_last``).
"""

from __future__ import annotations

import logging
import os
import shutil

from . import registry as reg
from .records import JobState
from .shim import STDERR_LOG, STDOUT_LOG

log = logging.getLogger(__name__)

FAILURES = ("crash", "hang", "permanent", "unrunnable", "unknown")


def kept_attempts(st: JobState, keep: int) -> set[int]:
    """Attempt numbers to keep: the first, the latest failure, the last ``keep``."""
    numbers = [a.n for a in st.attempts]
    if not numbers:
        return set()
    out = {1, *numbers[-max(1, keep) :]}
    failed = [a.n for a in st.attempts if a.classification in FAILURES]
    if failed:
        out.add(failed[-1])
    return out


def prune(h: reg.Home, st: JobState, keep: int, max_bytes: int) -> int:
    """Delete old attempt directories and records; returns how many directories went."""
    kept = kept_attempts(st, keep)
    st.attempts = [a for a in st.attempts if a.n in kept]
    root = os.path.join(h.job_dir(st.name), "attempts")
    removed = 0
    try:
        names = os.listdir(root)
    except OSError:
        return 0
    for name in names:
        if not name.isdigit() or int(name) in kept:
            continue
        path = os.path.join(root, name)
        if os.path.islink(path) or not os.path.isdir(path):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    rotate(h.job_file(st.name, "events.jsonl"), max_bytes, move=True)
    return removed


def rotate(path: str, max_bytes: int, *, move: bool) -> bool:
    """Rotate ``path`` to ``path.1`` if larger than ``max_bytes``; True if it did.

    ``move``: rename (nobody holds the file open). Otherwise copy, then truncate: the
    writer's O_APPEND descriptor then goes on at the new, empty end.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not os.path.isfile(path) or os.path.islink(path) or st.st_size <= max_bytes:
        return False
    if move:
        os.replace(path, path + ".1")
    else:
        shutil.copyfile(path, path + ".1")
        os.truncate(path, 0)
    log.info("rotated %s (%d bytes)", path, st.st_size)
    return True


def cap_logs(attempt_dir: str, max_bytes: int) -> None:
    """Rotate a running attempt's logs that grew past ``max_bytes``."""
    for leaf in (STDOUT_LOG, STDERR_LOG):
        try:
            rotate(os.path.join(attempt_dir, leaf), max_bytes, move=False)
        except OSError as e:
            log.warning("cannot rotate %s: %s", os.path.join(attempt_dir, leaf), e)
