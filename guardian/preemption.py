"""Signals ask for a checkpoint; they never take one.

A handler that saves runs in the middle of whatever the main thread was doing —
maybe halfway through ``optimizer.step()`` (Lightning#21406). Ours only records the
request; the guard saves at the next step boundary and exits with
``EXIT_REQUEUE`` (75), or 130 for an interactive Ctrl-C. A second SIGINT raises
``KeyboardInterrupt`` at once, for the user who really wants out.

SIGTTIN is registered with ``faulthandler`` so a supervisor can get every thread's
Python stack written to stderr without stopping the process (hang evidence).

While a flag is installed, the DataLoader workers guardian starts leave these signals
to this process (``worker_signals``): a signal to the whole process group must not
kill them before the checkpoint is taken.
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import threading
from typing import Any

log = logging.getLogger(__name__)

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
STACK_DUMP_SIGNAL = signal.SIGTTIN

_installed: list[PreemptionFlag] = []  # the flags whose handlers are in place, innermost last


def handling_signals() -> bool:
    """True while a guard of this process turns the preemption signals into a flag."""
    return bool(_installed)


class PreemptionFlag:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._stack_dump = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("protect() entered outside the main thread; signals will not be handled")
            return
        for sig in PREEMPT_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        _installed.append(self)
        try:
            faulthandler.register(STACK_DUMP_SIGNAL, all_threads=True, chain=False)
            self._stack_dump = True
        except (RuntimeError, ValueError, OSError):
            pass

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self in _installed:
            _installed.remove(self)
        if self._stack_dump:
            faulthandler.unregister(STACK_DUMP_SIGNAL)
            self._stack_dump = False

    def reinstall(self) -> None:
        """Put these handlers back on top: for a framework that installs its own signal
        handlers after ``protect()`` entered (Lightning does at train start). What an
        integration may rely on: ``Guard.preemption`` is this flag, or None when
        ``protect(handle_signals=False)``."""
        self.uninstall()
        self.install()

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    @property
    def exit_code(self) -> int:
        from .errors import EXIT_REQUEUE

        return 130 if self.signum == signal.SIGINT else EXIT_REQUEUE
