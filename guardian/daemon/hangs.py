"""Hang watch: one clock per running attempt, and what to do when one runs out.

The clock (``heartbeat.HangClock``) says how long the job has been silent; this
module decides whether that silence is a hang — only while the attempt's workers
still run — and if so collects evidence (stack dumps) and starts the stop.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from . import procs
from . import registry as reg
from .heartbeat import HangClock
from .journal import Journal
from .knobs import Knobs
from .records import JobSpec, JobState
from .safefiles import BadFileError, read_run_heartbeat
from .shim import EXIT_FILE, STDERR_LOG
from .stopping import Stopper


class HangWatch:
    def __init__(
        self, home: reg.Home, k: Knobs, journal: Journal, stopper: Stopper, tag: Callable[[JobState], str]
    ) -> None:
        self.home, self.k, self.journal, self.stopper, self.tag = home, k, journal, stopper, tag
        self.clocks: dict[str, HangClock] = {}
        self.bad_beats: set[str] = set()

    def watching(self, name: str) -> bool:
        return name in self.clocks

    def forget(self, name: str) -> None:
        self.clocks.pop(name, None)
        self.bad_beats.discard(name)

    def learn_pid(self, name: str, pid: int, nproc: int | None) -> None:
        """The job's pid became known: only its beats count (not under torchrun: rank 0 beats)."""
        clock = self.clocks.get(name)
        if clock is not None and not nproc:
            clock.pid = pid

    def start_clock(self, st: JobState, spec: JobSpec) -> None:
        """Under torchrun rank 0 beats, not the launcher: the start time alone filters stale beats."""
        child = procs.ProcId.from_dict(st.latest.child)
        pid = None if spec.nproc or child is None else child.pid
        self.clocks[st.name] = HangClock(started=st.latest.started, pid=pid)

    def check(self, st: JobState, spec: JobSpec | None) -> None:
        clock = self.clocks.get(st.name)
        if clock is None or spec is None:
            return
        try:
            hb = read_run_heartbeat(spec.run_dir)
        except BadFileError as e:
            if st.name not in self.bad_beats:
                self.bad_beats.add(st.name)
                self.journal.event(st, "bad-file", f"{e}; counted as no heartbeat")
            hb = None
        beat = clock.look(hb, self.k)
        if beat is not None:
            st.latest.last_step = beat.step
        why = clock.verdict(self.k)
        if why is None or not self.still_working(st, spec):
            return
        self.journal.event(st, "hang", why, step=beat.step if beat else None)
        child = procs.ProcId.from_dict(st.latest.child)
        if child is None:
            targets = []
        else:
            targets = (procs.ranks(child) or [child]) if spec.nproc else [child]
        stderr = os.path.join(self.home.attempt_dir(st.name, st.latest.n), STDERR_LOG)
        for target in targets:
            done = procs.dump_stacks(target, stderr, self.k.stack_dump_wait)
            self.journal.event(
                st, "stacks", "collected evidence before killing: " + "; ".join(done), log=stderr
            )
        self.stopper.begin(st, "hang", "term", self.k.kill_grace, nproc=spec.nproc, tag=self.tag(st))

    def still_working(self, st: JobState, spec: JobSpec) -> bool:
        """Whether the attempt's workers still run: only then can silence mean a hang.

        An exited job (exit.json written), or a torchrun whose ranks are all gone and
        which is only tearing down, is left to its exit facts.
        """
        if os.path.exists(os.path.join(self.home.attempt_dir(st.name, st.latest.n), EXIT_FILE)):
            return False
        child = procs.ProcId.from_dict(st.latest.child)
        try:
            if child is None:
                return procs.is_alive(procs.ProcId.from_dict(st.latest.shim))
            return bool(procs.ranks(child)) if spec.nproc else procs.is_alive(child)
        except procs.Unknowable:
            return True
