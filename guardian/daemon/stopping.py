"""Stopping an attempt: SIGUSR2 (checkpoint and exit 75) → grace → SIGTERM → SIGKILL of its tree.

Each stage has a deadline recorded in the job's state (``st.stop``), so a daemon
restarted mid-stop carries on where the last one left off. The escalation never
spares anything of the attempt but the shim, which must live to record the exit.
"""

from __future__ import annotations

import signal
import time

from . import procs
from .journal import Journal
from .knobs import Knobs
from .records import STOPPING, JobState


class Stopper:
    def __init__(self, journal: Journal, knobs: Knobs) -> None:
        self.journal, self.k = journal, knobs

    def begin(self, st: JobState, why: str, stage: str, grace: float, *, nproc: int | None, tag: str) -> None:
        """Start stopping: ``stage`` "usr2" asks for a checkpoint, "term" asks to exit."""
        child = procs.ProcId.from_dict(st.latest.child)
        sig = signal.SIGUSR2 if stage == "usr2" else signal.SIGTERM
        sent = signal_job(child, sig, nproc)
        st.stop = {"why": why, "stage": stage, "deadline": time.time() + grace}
        reason = (
            f"sent {sig.name} to pid {child.pid}; waiting {grace:.0f} s"
            if sent and child is not None
            else "the job's process is not running yet; killing its session"
        )
        self.journal.set_state(st, STOPPING, reason, "stopping", why=why)
        if not sent:
            self.escalate(st, tag, force=True)

    def escalate_if_due(self, st: JobState, tag: str) -> None:
        if st.stop and time.time() >= st.stop["deadline"]:
            self.escalate(st, tag)

    def escalate(self, st: JobState, tag: str, force: bool = False) -> None:
        """usr2 → SIGTERM the job; term → SIGKILL its whole process group and session."""
        shim, child = procs.ProcId.from_dict(st.latest.shim), procs.ProcId.from_dict(st.latest.child)
        stop = st.stop
        assert stop is not None, "escalate() runs only after begin() recorded the stop"
        if stop["stage"] == "usr2" and not force:
            procs.signal_process(child, signal.SIGTERM)
            stop.update(stage="term", deadline=time.time() + self.k.kill_grace)
            self.journal.event(
                st, "stop-escalate", "no exit after SIGUSR2 within the grace period; sent SIGTERM"
            )
        else:
            n = procs.kill_tree(shim, child, signal.SIGKILL, tag=tag)
            stop.update(stage="kill", deadline=time.time() + self.k.kill_grace)
            self.journal.event(
                st, "stop-escalate", f"SIGKILL to the job's process group and session ({n} signalled)"
            )
        self.journal.save(st)


def signal_job(child: procs.ProcId | None, sig: int, nproc: int | None) -> bool:
    """SIGUSR2 goes to every rank of a torchrun job, anything else to the job itself.

    torchrun has no SIGUSR2 handler (it would die and orphan the ranks); SIGTERM it
    forwards to the ranks itself, then SIGKILLs them after its own timeout.
    """
    if sig == signal.SIGUSR2 and nproc:
        sent = [procs.signal_process(r, sig) for r in procs.ranks(child)]
        if any(sent):
            return True
    return procs.signal_process(child, sig)
