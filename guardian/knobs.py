"""Every environment variable guardian reads, in one place.

Precedence: an explicit argument to ``protect()`` wins over the environment, except
``GUARDIAN_RESUME_FROM``, which a supervisor sets to override where a run resumes.
"""

from __future__ import annotations

import os


def resume_from() -> str | None:
    """Set by ``guardian watch`` (or a user) to resume from one specific checkpoint."""
    return os.environ.get("GUARDIAN_RESUME_FROM") or None


def run_dir() -> str | None:
    """Set by ``guardian run`` for each attempt: the job's checkpoint directory."""
    return os.environ.get("GUARDIAN_RUN_DIR") or None


def attempt() -> int | None:
    value = os.environ.get("GUARDIAN_ATTEMPT")
    return int(value) if value and value.isdigit() else None


def heartbeat_interval() -> float:
    return float(os.environ.get("GUARDIAN_HEARTBEAT_INTERVAL", "1.0"))


def quiet() -> bool:
    return os.environ.get("GUARDIAN_QUIET", "") not in ("", "0")


def async_save() -> bool:
    """``GUARDIAN_ASYNC=0`` turns asynchronous saving off when ``protect()`` picks the writer."""
    return os.environ.get("GUARDIAN_ASYNC", "1") not in ("0", "false", "no")


def overlap() -> bool:
    """``GUARDIAN_OVERLAP=1`` lets the async writer copy parameters and optimizer state
    during the next step instead of before a save returns. Off by default: on the
    benchmark machine it lowered the time the loop waits but not the step-time stall,
    and raised the stall of a plain save (docs/performance.md, "Round 6")."""
    return os.environ.get("GUARDIAN_OVERLAP", "0") in ("1", "true", "yes")


def direct_io() -> bool:
    """``GUARDIAN_DIRECT_IO=0`` makes the async writer use buffered writes only."""
    return os.environ.get("GUARDIAN_DIRECT_IO", "1") not in ("0", "false", "no")


def stream_copy() -> bool:
    """``GUARDIAN_STREAM_COPY=0`` makes staging copies use numpy's memcpy even when the
    C extension (non-temporal stores) is built."""
    return os.environ.get("GUARDIAN_STREAM_COPY", "1") not in ("0", "false", "no")


def background_nice() -> int | None:
    """``GUARDIAN_BACKGROUND_NICE`` (default 19): the nice value of a save's background
    threads; ``off`` leaves them at the trainer's priority."""
    value = os.environ.get("GUARDIAN_BACKGROUND_NICE", "19")
    if value.lower() in ("off", "none", ""):
        return None
    try:
        return max(-20, min(19, int(value)))
    except ValueError:
        return 19
