"""The supervisor loop: find jobs, watch their attempts, hand each event to its owner.

One thread, one loop: every ``poll`` seconds (sooner when a user writes job.json or
stop.request) each job advances through its state machine::

    pending ──start──▶ running ──exit──▶ done | incomplete | failed | stopped | held
                         │  ▲                │
                hang/stop│  └──start── backoff ◀── crash / hang / requeue / reboot
                         ▼
                      stopping (SIGUSR2 → SIGTERM → SIGKILL of the tree)

Who owns what: ``attempts`` starts attempts and decides what their ends mean (with the
pure rules of ``policy``), ``stopping`` escalates, ``gates`` say whether a start may
happen, ``heartbeat`` keeps the hang clock, ``journal`` records every decision.

Invariants:
* A job is never started while any process of its previous attempt is alive, nor
  while run.json names another live process training into the same run directory.
* One job's problem never stops the daemon: an unreadable, invalid or hostile file,
  or an unexpected error while handling a job, holds *that* job with the reason.
* A hang is declared only while the attempt's processes run; an attempt that exited
  is judged by its exit facts alone.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from typing import Any

import psutil

from ..errors import RunLockedError
from ..locking import RunLock
from . import DaemonError, UnsafeJobError, adoption, devices, housekeeping, procs, progress, reconcile
from . import registry as reg
from .attempts import Attempts
from .gpu import Gpus, gpu_event, note_gpus
from .hangs import HangWatch
from .journal import Journal
from .knobs import Knobs
from .notify import Notifier
from .records import JobSpec, JobState
from .safefiles import BadFileError
from .shim import CHILD_FILE, SHIM_FILE
from .stopping import Stopper
from .waker import Waker

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(self, home: reg.Home, knobs: Knobs, gpus: Gpus | None = None) -> None:
        self.home, self.k = home, knobs
        self.boot = procs.boot_id()
        self.jobs: dict[str, JobState] = {}
        self.specs: dict[str, JobSpec] = {}
        self.seen: dict[str, tuple] = {}  # job files' signatures when last loaded
        self.popens: dict[str, subprocess.Popen] = {}
        self.cache = progress.ProgressCache()
        self.waker = Waker()
        self.gpus = gpus or Gpus()
        self.journal = Journal(home, Notifier(knobs, self.specs))
        self.attempts = Attempts(home, knobs, self.journal, self.gpus, self.cache, self.boot)
        self.attempts.jobs = self.jobs
        self.stopper = Stopper(self.journal, knobs)
        self.hangs = HangWatch(home, knobs, self.journal, self.stopper, self.attempts.tag)
        self.stop_event = threading.Event()
        self.passes = 0
        self._lock: RunLock | None = None

    # ------------------------------------------------------------------ lifecycle

    def serve(self) -> None:
        """Run until ``stop_event`` is set. Jobs keep running after the daemon exits."""
        self.acquire()
        try:
            self.gpus.start()
            self.waker.start()
            self.waker.watch(self.home.jobs)
            while not self.stop_event.is_set():
                self.tick()
                self.waker.wait(self.k.poll)
        finally:
            self.waker.stop()
            self.journal.close()
            self.gpus.stop()
            self.release()

    def acquire(self) -> None:
        """One daemon per HOME: the same kernel lock a trainer takes on its run directory."""
        self.home.ensure()
        lock = RunLock(self.home.root)
        try:
            lock.acquire()
        except RunLockedError as e:
            try:
                other = reg.read_json(self.home.path("daemon.json")) or {}
            except BadFileError:
                other = {}
            raise DaemonError(
                f"{self.home.root}: another guardian daemon (pid {other.get('pid')}) "
                "already supervises this state directory"
            ) from e
        self._lock = lock
        me = psutil.Process()
        reg.write_json(
            self.home.path("daemon.json"),
            {"pid": me.pid, "create_time": me.create_time(), "boot_id": self.boot, "started": time.time()},
        )
        log.info("supervising %s (pid %d, boot %s)", self.home.root, me.pid, self.boot)

    def release(self) -> None:
        for p in self.popens.values():
            p.returncode = 0  # do not let Popen.__del__ complain; the shims outlive us by design
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        log.info("stopped; running jobs keep running and the next daemon adopts them")

    def tick(self) -> None:
        self.passes += 1
        self.scan()
        devices.new_pass(self.attempts.alloc, self.home, self.jobs.values(), self.stopper, self.attempts.tag)
        for name in devices.queue_order(self.specs, list(self.jobs)):
            self.guarded(name, self.advance)
        for ev in self.gpus.drain_events():
            gpu_event(self.jobs.values(), ev, self.journal)

    def guarded(self, name: str, step: Any) -> None:
        """Run one job's ``step``; whatever goes wrong holds that job, never the daemon."""
        try:
            step(name)
        except BadFileError as e:
            self.hold_unreadable(name, str(e))
        except Exception as e:  # one job's trouble must not stop the others' supervision
            log.exception("job %s: unexpected error", name)
            self.hold_unreadable(
                name, f"the daemon failed on this job ({type(e).__name__}: {e}); see daemon.log"
            )

    # ------------------------------------------------------------------ discovery

    def scan(self) -> None:
        """Pick up jobs registered (or re-registered, or repaired); forget removed ones."""
        names = self.home.job_names()
        for name in names:
            self.waker.watch(self.home.job_dir(name))
            sig = self.signature(name)
            if sig is not None and self.seen.get(name) != sig:
                self.seen[name] = sig
                self.guarded(name, self.load_job)
        for gone in set(self.jobs) - set(names):
            log.info("job %s: its directory is gone; no longer supervised", gone)
            for table in (self.jobs, self.specs, self.popens, self.seen):
                table.pop(gone, None)
            self.hangs.forget(gone)
            self.journal.frozen.discard(gone)
            self.waker.unwatch(self.home.job_dir(gone))

    def signature(self, name: str) -> tuple | None:
        """What must change for a job to be (re)loaded: job.json, and state.json if it is bad."""
        leaves = ["job.json"] + (["state.json"] if name in self.journal.frozen else [])
        sig = []
        for leaf in leaves:
            try:
                s = os.lstat(self.home.job_file(name, leaf))
            except FileNotFoundError:
                if leaf == "job.json":
                    return None  # guardian run is still writing it
                s = None
            sig.append((s.st_ino, s.st_mtime_ns, s.st_size, s.st_mode) if s else None)
        return tuple(sig)

    def load_job(self, name: str) -> None:
        try:
            spec = reg.load_spec(self.home, name)
        except FileNotFoundError:
            return
        except UnsafeJobError as e:
            self.hold_unreadable(name, f"refused: {e}")
            return
        st = reg.load_state(self.home, name) or JobState(name=name, spec_created=spec.created)
        was_known = name in self.jobs and name not in self.journal.frozen
        self.journal.frozen.discard(name)
        self.specs[name] = spec
        if spec.created > st.spec_created and st.state in (*reg.TERMINAL, reg.HELD):
            st = JobState(name=name, attempts=st.attempts, spec_created=spec.created)
            self.journal.event(st, "re-registered", "guardian run --replace; starting afresh")
        if not was_known:
            kind = "registered" if not st.attempts else "loaded"
            self.journal.event(st, kind, f"state {st.state}", argv=spec.argv, run_dir=spec.run_dir)
        if adoption.adopt_into(st, spec, self.home, self.boot):
            self.journal.event(st, "adopted", st.reason, pid=st.latest.child and st.latest.child["pid"])
        self.jobs[name] = st
        self.journal.save(st)
        if st.state in (reg.RUNNING, reg.STOPPING) and not self.hangs.watching(name):
            self.reconcile(st, spec)

    def hold_unreadable(self, name: str, why: str) -> None:
        """Hold a job whose files cannot be trusted, without touching them (evidence)."""
        prev = self.jobs.get(name)
        self.journal.frozen.add(name)
        self.seen[name] = self.signature(name) or ()
        st = JobState(name=name, state=reg.HELD, reason=why)
        if prev is None or prev.reason != why:
            log.error("job %s: held: %s", name, why)
            self.journal.event(st, "hold", why)
        self.jobs[name] = st
        self.specs.pop(name, None)
        self.hangs.forget(name)

    # ------------------------------------------------------------------ reconciliation

    def reconcile(self, st: JobState, spec: JobSpec) -> None:
        """A job that was running when the daemon last ran: adopt, resume or classify it."""
        a = st.latest
        if a is None:
            self.journal.set_state(st, reg.PENDING, "state said running with no attempt; starting it")
            return
        self.fill_identities(st)
        decision = reconcile.decide(a, self.boot, self.home.attempt_dir(st.name, a.n))
        self.journal.event(st, f"reconcile-{decision.action}", decision.reason)
        if decision.action == "adopt":
            a.adopted = True
            if decision.shim is not None:
                a.shim = decision.shim.to_dict()
            self.hangs.start_clock(st, spec)
            self.journal.save(st)
        elif decision.action == "reboot":
            self.attempts.close(st, "reboot", decision.reason)
            self.attempts.schedule(st, 0.0, "resuming after the reboot; no crash budget used")
        elif decision.action == "finished":
            self.end_attempt(st, spec)
        elif decision.action == "hold":
            self.attempts.close(st, "unknown", decision.reason)
            self.journal.set_state(st, reg.HELD, decision.reason, "hold")

    def fill_identities(self, st: JobState) -> None:
        """Read shim.json / child.json the shim wrote, if the daemon has not yet."""
        a = st.latest
        adir = self.home.attempt_dir(st.name, a.n)
        if a.shim is None:
            rec = procs.ProcId.from_dict(reg.read_json(os.path.join(adir, SHIM_FILE)))
            if rec:
                a.shim, a.sid = rec.to_dict(), rec.pid
        if a.child is None:
            rec = procs.ProcId.from_dict(reg.read_json(os.path.join(adir, CHILD_FILE)))
            if rec:
                a.child = rec.to_dict()
                self.hangs.learn_pid(st.name, rec.pid, self.nproc(st.name))
                if st.state == reg.RUNNING:
                    st.reason = (
                        f"attempt {a.n} running (pid {rec.pid}); resumed from {a.resume_from or 'scratch'}"
                    )
                self.journal.save(st)

    # ------------------------------------------------------------------ per-pass state machine

    def advance(self, name: str) -> None:
        st = self.jobs[name]
        if name in self.journal.frozen:
            return
        spec = self.specs.get(name)
        if st.state in (reg.RUNNING, reg.STOPPING):
            self.watch_running(st, spec)
        elif st.state in (reg.PENDING, reg.BACKOFF):
            if self.take_stop_request(st) or spec is None:
                return
            if st.next_start_at is None or time.time() >= st.next_start_at:
                popen = self.attempts.try_start(st, spec)
                if popen is not None:
                    self.popens[name] = popen
                    self.hangs.start_clock(st, spec)
        else:
            self.take_stop_request(st)

    def take_stop_request(self, st: JobState) -> bool:
        path = self.home.job_file(st.name, "stop.request")
        if not os.path.lexists(path):
            return False
        try:
            req = reg.read_json(path) or {}
        except BadFileError as e:
            self.journal.event(st, "stop-request", f"{e}; taking it as a plain stop request")
            req = {}
        try:
            os.unlink(path)
        except OSError as e:
            raise BadFileError(f"{path}: cannot be removed ({e.strerror}); remove it by hand") from e
        grace = req.get("grace")
        if st.state == reg.RUNNING:
            grace = float(grace) if isinstance(grace, (int, float)) and grace >= 0 else self.k.stop_grace
            self.stopper.begin(
                st, "request", "usr2", grace, nproc=self.nproc(st.name), tag=self.attempts.tag(st)
            )
        elif st.state in (reg.PENDING, reg.BACKOFF, reg.HELD):
            st.next_start_at = None
            self.journal.set_state(st, reg.STOPPED, "stopped on request before it was running", "stopped")
        else:
            self.journal.event(st, "stop-ignored", f"stop requested but the job is already {st.state}")
        return True

    def watch_running(self, st: JobState, spec: JobSpec | None) -> None:
        self.fill_identities(st)
        popen = self.popens.get(st.name)
        if popen is not None and popen.poll() is not None:
            self.popens.pop(st.name, None)  # reaped; the recorded identities decide below
        if not procs.attempt_alive(st.latest.shim, st.latest.child):
            self.end_attempt(st, spec)
            return
        self.note_progress(st, spec)
        housekeeping.cap_logs(self.home.attempt_dir(st.name, st.latest.n), self.k.log_max_bytes)
        note_gpus(self.gpus, st, self.journal)
        if st.state == reg.RUNNING:
            if not self.take_stop_request(st):
                self.hangs.check(st, spec)
        else:
            self.stopper.escalate_if_due(st, self.attempts.tag(st))

    def end_attempt(self, st: JobState, spec: JobSpec | None) -> None:
        self.note_progress(st, spec)
        self.attempts.finish(st, spec)
        self.hangs.forget(st.name)
        self.popens.pop(st.name, None)

    def nproc(self, name: str) -> int | None:
        spec = self.specs.get(name)
        return spec.nproc if spec is not None else None

    # ------------------------------------------------------------------ progress, heartbeat, hangs

    def note_progress(self, st: JobState, spec: JobSpec | None) -> None:
        """A newer valid checkpoint resets the failure, hang and requeue counters (only that does)."""
        newest = self.cache.newest(spec.run_dir) if spec is not None else None
        if newest is None:
            return
        st.latest.newest_checkpoint = newest.name
        if st.progress_mark is None or tuple(newest.mark) > tuple(st.progress_mark):
            st.progress_mark, st.last_checkpoint = list(newest.mark), newest.name
            if st.failures or st.hangs or st.requeues:
                self.journal.event(
                    st,
                    "progress",
                    f"new valid checkpoint {newest.name}: failure counter {st.failures} → 0",
                    checkpoint=newest.name,
                )
            st.failures = st.hangs = st.requeues = 0
            st.resume_override = None
            self.journal.save(st)
