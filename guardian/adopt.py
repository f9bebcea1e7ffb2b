"""Let a hand-started run register itself with the user's daemon (``GUARDIAN_WATCH=1``).

``protect(..., watch=True)`` or ``GUARDIAN_WATCH=1`` in the environment: when the
guard is entered, rank 0 registers this very process with the daemon of
``GUARDIAN_HOME`` (or the user's default state directory): its command line, working
directory, environment (without secret-looking variables) and run directory. The
daemon then watches the process by pid and create time, and if it dies restarts it
from that command line, resuming from the newest checkpoint.

Registration never stops training: if it fails, a warning says why and the run goes
on unwatched. A process the daemon itself started (``GUARDIAN_ATTEMPT_TAG`` is set)
is already watched and does not register again.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any

log = logging.getLogger(__name__)

_requests: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def request(guard: Any, watch: bool | None) -> None:
    """Remember ``protect(watch=...)`` for ``guard`` (None: follow ``GUARDIAN_WATCH``)."""
    if watch is not None:
        _requests[guard] = watch


def wanted(guard: Any) -> bool:
    explicit = _requests.get(guard)
    if explicit is not None:
        return explicit
    return os.environ.get("GUARDIAN_WATCH", "").strip().lower() in ("1", "true", "yes")


def on_enter(guard: Any) -> None:
    """Called once the guard holds its run directory: register this process if asked."""
    if not wanted(guard) or not guard.world.is_leader or os.environ.get("GUARDIAN_ATTEMPT_TAG"):
        return
    try:
        from .daemon.adoption import register_process

        spec, note = register_process(guard.run_dir, os.getpid(), this_process=True)
    except Exception as e:  # asked-for supervision failing must never stop the training it guards
        log.warning("not watched by the daemon: %s; training goes on unwatched", e)
        return
    log.info("registered with the daemon as job %r (%s)", spec.name, note)
