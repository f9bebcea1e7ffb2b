"""Let a hand-started run register itself with the user's daemon (``GUARDIAN_WATCH=1``).

``protect(..., watch=True)`` or ``GUARDIAN_WATCH=1`` in the environment: when
``protect()`` is called, rank 0 registers this very process with the daemon of
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

log = logging.getLogger(__name__)


def wanted(watch: bool | None) -> bool:
    """``protect(watch=...)`` decides; None follows ``GUARDIAN_WATCH``."""
    if watch is not None:
        return watch
    return os.environ.get("GUARDIAN_WATCH", "").strip().lower() in ("1", "true", "yes")


def register_if_asked(run_dir: str, watch: bool | None) -> None:
    """Called by ``protect()``: register this process with the daemon if asked to.

    Only rank 0 (``RANK`` unset or 0) registers: under a launcher the job is the
    launcher's, not one rank's. Registering before the guard is entered is enough: the
    daemon watches the pid, and allows for start-up before the first heartbeat.
    """
    if not wanted(watch) or os.environ.get("GUARDIAN_ATTEMPT_TAG") or os.environ.get("RANK", "0") != "0":
        return
    from .logs import ensure_visible_logging

    ensure_visible_logging()  # before the guard would: whether we are watched must be seen
    try:
        from .daemon.adoption import register_process

        spec, note = register_process(run_dir, os.getpid(), this_process=True)
    except Exception as e:  # asked-for supervision failing must never stop the training it guards
        log.warning("not watched by the daemon: %s; training goes on unwatched", e)
        return
    log.info("registered with the daemon as job %r (%s)", spec.name, note)
