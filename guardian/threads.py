"""Priority of a save's background threads.

With few cores, the persist work of an asynchronous save (the writer's syscalls, the
hash) competes with the training loop's own threads. At nice 0 it visibly slows a
CPU-bound trainer; at nice 19 the scheduler gives the trainer the CPU whenever both
want it, and the persist runs in the gaps (it mostly waits on the disk anyway).
docs/performance.md has the measurement.
"""

from __future__ import annotations

import os
import threading

from . import knobs


def lower_thread_priority() -> None:
    """Make the *calling* thread the lowest-priority CPU user (``GUARDIAN_BACKGROUND_NICE``,
    default 19); call it first thing in every background thread of a save.

    On Linux a thread id passed to ``setpriority(PRIO_PROCESS, tid)`` changes only that
    thread (the trainer keeps its priority); threads it starts inherit the value.
    Elsewhere, or where refused, this is a no-op: the save is still correct, only less
    polite.
    """
    nice = knobs.background_nice()
    if nice is None:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (OSError, AttributeError):
        pass
