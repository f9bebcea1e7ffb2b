"""DataLoader workers leave preemption signals to the main process.

A scheduler preempts a job by signalling its whole process group (Slurm, ``kill -TERM
-PGID``, Ctrl-C in a terminal) — the DataLoader workers too. torch's workers die of
SIGTERM (their C handler re-raises it unless the sender is their parent), and die of
SIGUSR1/SIGUSR2 under spawn/forkserver; the main process's SIGCHLD handler then raises
``DataLoader worker ... killed by signal`` wherever the training happens to be —
inside forward, backward or a save — so the run exits 1 with no checkpoint although
guardian had already recorded the request.

So the workers of a loader iterated through ``g.batches()`` do not act on these
signals: the main process saves at the next exact point and exits, and its loader
shuts the workers down as usual. How, in each worker (``LeaveSignalsToMain``, run
as the loader's ``worker_init_fn`` wrapper):

* the preemption signals are blocked in every thread and a small thread takes them
  with ``sigwaitinfo``: a SIGTERM *from the parent* still ends the worker at once,
  exactly as torch's own handler does (that is how a loader stops a stuck worker);
  every other one is dropped;
* their handlers become no-ops, in case a thread the worker started earlier does
  not block them.

The signals are also blocked in the main thread while the loader starts its workers,
so a worker inherits them blocked from its very first instruction: a signal that
arrives while it starts up stays pending until the waiting thread drops it.

Workers that guardian does not start (another loader the program iterates itself)
are not covered; if they die of the signal, the guard ends the run with the requeue
code all the same, without a new checkpoint (see ``is_worker_death``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from .preemption import PREEMPT_SIGNALS, handling_signals

log = logging.getLogger(__name__)


@contextlib.contextmanager
def workers_leave_signals_to_main(loader: Any) -> Iterator[None]:
    """Around the call that starts ``loader``'s workers (``iter(loader)``). Does
    nothing unless guardian handles preemption signals in this process and the
    loader has worker processes."""
    if not handling_signals() or not getattr(loader, "num_workers", 0):
        yield
        return
    original = loader.worker_init_fn
    loader.worker_init_fn = LeaveSignalsToMain(original)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPT_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        loader.worker_init_fn = original


class LeaveSignalsToMain:
    """A ``worker_init_fn`` that first makes the worker leave the preemption signals to
    the main process, then calls the user's own (picklable, for spawn/forkserver).

    Public for the framework integrations, whose loaders guardian does not start
    itself. What they may rely on: wrap the loader's current ``worker_init_fn``
    (``None`` too) before the loader starts its workers and restore it afterwards; each
    worker then ignores the preemption signals except a SIGTERM from its parent (which
    ends it, as torch's own handler does), and the wrapped function is called with
    the worker id. Unlike ``workers_leave_signals_to_main`` it does not block the
    signals in the main thread while workers start, so a signal in that short
    window can still reach a worker that has not run it yet."""

    def __init__(self, inner: Callable[[int], None] | None) -> None:
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPT_SIGNALS)
        for sig in PREEMPT_SIGNALS:
            signal.signal(sig, _ignore)
        threading.Thread(target=_take_signals, name="guardian-worker-signals", daemon=True).start()
        if self.inner is not None:
            self.inner(worker_id)


def _ignore(signum: int, frame: Any) -> None:
    """A handler that does nothing (unlike SIG_IGN, it lets blocked signals stay
    pending for ``sigwaitinfo``)."""


def _take_signals() -> None:
    parent = os.getppid()
    while True:
        info = signal.sigwaitinfo(PREEMPT_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == parent:
            os._exit(0)  # the loader ends its worker: torch's own handler does the same


def stop_reporting_worker_deaths() -> None:
    """For a process leaving because it was preempted: torch's SIGCHLD handler would
    raise once more for every other worker the same signal killed, wherever the exit
    path happens to be (seen: inside the join of the last save). Only the main thread
    can change it; elsewhere nothing is done."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def is_worker_death(exc: BaseException | None) -> bool:
    """Does ``exc`` (or an exception it was raised from) report a DataLoader worker that
    died? torch says so in a RuntimeError, or the main process meets the dead worker's
    connection first (a ConnectionError or EOFError raised inside torch's data loading)."""
    for _ in range(8):  # a short chain: the report is at most a few links away
        if exc is None:
            return False
        if isinstance(exc, RuntimeError) and str(exc).startswith("DataLoader worker (pid"):
            return True
        if isinstance(exc, (ConnectionError, EOFError)) and _raised_in_data_loading(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _raised_in_data_loading(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if "torch/utils/data/" in tb.tb_frame.f_code.co_filename.replace(os.sep, "/"):
            return True
        tb = tb.tb_next
    return False


def requeue_after_worker_death(
    signum: int | None, code: int, exc: BaseException | None, last_checkpoint: str | None
) -> None:
    """A preemption signal also killed the workers of a loader guardian did not start
    (one the program iterates itself, e.g. for evaluation) before the next exact point:
    no checkpoint can be taken, but this is a preemption, not a crash — exit ``code``."""
    log.warning(
        "signal %s received and a DataLoader worker died of it before a checkpoint could be "
        "taken (%s); exiting %d — the run restarts from %s. Iterate loaders through "
        "g.batches() to have their workers leave the signal to this process.",
        signum,
        exc,
        code,
        last_checkpoint or "the beginning",
    )
    raise SystemExit(code) from exc
