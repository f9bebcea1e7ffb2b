"""The supervisor loop: start attempts, watch them, decide what each exit means.

One thread, one loop: every ``poll`` seconds (sooner when watchdog reports a file
event) each job advances through its state machine::

    pending ──start──▶ running ──exit──▶ done | incomplete | failed | stopped
                         │  ▲                │
                hang/stop│  └──start── backoff ◀── crash / hang / requeue / reboot
                         ▼
                      stopping (SIGUSR2 → SIGTERM → SIGKILL of the tree)

Invariants:
* state.json is written *before* a process is started and again right after, so a
  daemon killed at any point finds either "about to start attempt N" (and looks for
  it by its attempt directory on the command line) or the attempt's pid.
* A job is never started while any process of its previous attempt is alive, nor
  while run.json names another live process training into the same run directory.
* Every decision appends an event with its reason (events.jsonl) and a log line.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import threading
import time
from typing import Any

import psutil

from ..runfiles import read_status
from . import DaemonError, UnsafeJobError, launch, policy, procs, progress, reconcile
from . import registry as reg
from .gpu import Gpus
from .heartbeat import HangClock, Waker
from .heartbeat import poll as poll_heartbeat
from .knobs import Knobs
from .registry import Attempt, Home, JobSpec, JobState
from .shim import CHILD_FILE, EXIT_FILE, SHIM_FILE, STDERR_LOG

log = logging.getLogger("guardian.daemon")


class Supervisor:
    def __init__(self, home: Home, knobs: Knobs, gpus: Gpus | None = None) -> None:
        self.home, self.k = home, knobs
        self.boot = procs.boot_id()
        self.jobs: dict[str, JobState] = {}
        self.specs: dict[str, JobSpec] = {}
        self.spec_mtime: dict[str, float] = {}
        self.popens: dict[str, subprocess.Popen] = {}
        self.clocks: dict[str, HangClock] = {}
        self.progress = progress.ProgressCache()
        self.waker = Waker()
        self.gpus = gpus or Gpus()
        self.stop_event = threading.Event()
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------ lifecycle

    def serve(self) -> None:
        """Run until ``stop_event`` is set. Jobs keep running after the daemon exits."""
        self.acquire()
        try:
            self.gpus.start()
            self.waker.start()
            self.waker.watch(self.home.jobs)
            self.scan()
            for name in list(self.jobs):
                self.reconcile(name)
            while not self.stop_event.is_set():
                self.tick()
                self.waker.wait(self.k.poll)
        finally:
            self.waker.stop()
            self.gpus.stop()
            self.release()

    def acquire(self) -> None:
        """One daemon per HOME: an exclusive flock, then daemon.json for ``guardian status``."""
        self.home.ensure()
        fd = os.open(self.home.path("daemon.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(fd)
            other = reg.read_json(self.home.path("daemon.json")) or {}
            raise DaemonError(
                f"{self.home.root}: another guardian daemon (pid {other.get('pid')}) "
                "already supervises this state directory"
            ) from e
        self._lock_fd = fd
        me = psutil.Process()
        reg.write_json(
            self.home.path("daemon.json"),
            {"pid": me.pid, "create_time": me.create_time(), "boot_id": self.boot, "started": time.time()},
        )
        log.info("guardian watch: supervising %s (pid %d, boot %s)", self.home.root, me.pid, self.boot)

    def release(self) -> None:
        for p in self.popens.values():
            p.returncode = 0  # do not let Popen.__del__ complain; the shims outlive us by design
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        log.info("guardian watch: stopped; running jobs keep running and will be adopted")

    def tick(self) -> None:
        self.scan()
        self.reap()
        for name in list(self.jobs):
            try:
                self.advance(name)
            except (OSError, DaemonError) as e:
                log.exception("guardian watch: job %s: %s", name, e)
        for ev in self.gpus.drain_events():
            self.gpu_event(ev)

    # ------------------------------------------------------------------ discovery

    def scan(self) -> None:
        """Pick up jobs registered (or re-registered) by ``guardian run``."""
        for name in self.home.job_names():
            path = self.home.job_file(name, "job.json")
            try:
                mtime = os.stat(path).st_mtime
            except FileNotFoundError:
                continue  # guardian run is still writing it
            if self.spec_mtime.get(name) == mtime:
                continue
            self.spec_mtime[name] = mtime
            self.load_job(name)

    def load_job(self, name: str) -> None:
        try:
            spec = reg.load_spec(self.home, name)
        except UnsafeJobError as e:
            self.refuse(name, str(e))
            return
        except (DaemonError, TypeError) as e:
            log.error("guardian watch: job %s: cannot read its definition: %s", name, e)
            return
        st = reg.load_state(self.home, name) or JobState(name=name, spec_created=spec.created)
        self.specs[name] = spec
        if spec.created > st.spec_created and st.state in (*reg.TERMINAL, reg.HELD):
            st = self.reset(st, spec)
        if name not in self.jobs:
            self.event(
                st,
                "registered" if not st.attempts else "loaded",
                f"state {st.state}",
                argv=spec.argv,
                run_dir=spec.run_dir,
            )
        self.jobs[name] = st
        self.save(st)
        self.waker.watch(spec.run_dir)

    def reset(self, old: JobState, spec: JobSpec) -> JobState:
        st = JobState(name=old.name, attempts=old.attempts, spec_created=spec.created)
        self.event(st, "re-registered", f"guardian run --replace; previous state {old.state} ({old.reason})")
        return st

    def refuse(self, name: str, why: str) -> None:
        log.error("guardian watch: refusing job %s: %s", name, why)
        st = self.jobs.get(name) or reg.load_state(self.home, name) or JobState(name=name)
        st.state, st.reason = reg.HELD, f"refused: {why}"
        self.jobs[name] = st
        try:
            self.event(st, "refused", why)
            self.save(st)
        except OSError:
            pass

    # ------------------------------------------------------------------ bookkeeping

    def save(self, st: JobState) -> None:
        reg.save_state(self.home, st)

    def event(self, st: JobState, event: str, reason: str, **evidence: Any) -> None:
        st.events += 1
        log.info("job %s: %s: %s", st.name, event, reason)
        reg.append_event(self.home, st.name, event, reason, **evidence)

    def set_state(self, st: JobState, state: str, reason: str, event: str | None = None, **ev: Any) -> None:
        st.state, st.reason = state, reason
        self.event(st, event or state, reason, **ev)
        self.save(st)

    def attempt_file(self, st: JobState, leaf: str) -> str:
        return os.path.join(self.home.attempt_dir(st.name, st.current.n), leaf)

    # ------------------------------------------------------------------ reconciliation

    def reconcile(self, name: str) -> None:
        st = self.jobs[name]
        if st.state not in (reg.RUNNING, reg.STOPPING) or st.current is None:
            return
        self.fill_identities(st)
        decision = reconcile.decide(st.current, self.boot, self.home.attempt_dir(name, st.current.n))
        self.event(st, f"reconcile-{decision.action}", decision.reason)
        if decision.action == "adopt":
            st.current.adopted = True
            if decision.shim is not None:
                st.current.shim = decision.shim.to_dict()
            self.start_clock(st)
            self.save(st)
        elif decision.action == "reboot":
            self.close_attempt(st, "reboot", decision.reason)
            self.schedule(st, 0.0, "resuming after the reboot; no crash budget used")
        elif decision.action == "finished":
            self.finish(st)
        elif decision.action == "hold":
            self.close_attempt(st, "unknown", decision.reason)
            self.set_state(st, reg.HELD, decision.reason, "hold")

    def fill_identities(self, st: JobState) -> None:
        """Read shim.json / child.json the shim wrote, if the daemon has not yet."""
        a = st.current
        if a.shim is None:
            rec = reg.read_json(self.attempt_file(st, SHIM_FILE))
            if rec:
                a.shim = {"pid": rec["pid"], "create_time": rec["create_time"]}
                a.sid = rec["pid"]
        if a.child is None:
            rec = reg.read_json(self.attempt_file(st, CHILD_FILE))
            if rec:
                a.child = {"pid": rec["pid"], "create_time": rec["create_time"]}
                self.clocks.get(st.name, HangClock(0, None)).pid = self.beat_pid(st.name, rec["pid"])
                self.save(st)

    # ------------------------------------------------------------------ per-tick state machine

    def advance(self, name: str) -> None:
        st = self.jobs[name]
        if st.state in (reg.RUNNING, reg.STOPPING):
            self.watch_running(st)
        elif st.state in (reg.PENDING, reg.BACKOFF):
            if self.take_stop_request(st):
                return
            if st.next_start_at is None or time.time() >= st.next_start_at:
                self.try_start(st)
        elif os.path.exists(self.home.job_file(name, "stop.request")):
            self.take_stop_request(st)

    def take_stop_request(self, st: JobState) -> bool:
        path = self.home.job_file(st.name, "stop.request")
        if not os.path.exists(path):
            return False
        req = reg.read_json(path) or {}
        os.unlink(path)
        if st.state == reg.RUNNING:
            grace = float(req.get("grace") or self.k.stop_grace)
            self.begin_stop(st, "request", "usr2", grace)
        elif st.state in (reg.PENDING, reg.BACKOFF, reg.HELD):
            st.next_start_at = None
            self.set_state(st, reg.STOPPED, "stopped on request before it was running", "stopped")
        else:
            self.event(st, "stop-ignored", f"stop requested but the job is already {st.state}")
        return True

    def watch_running(self, st: JobState) -> None:
        self.fill_identities(st)
        a = st.current
        if not self.attempt_alive(st):
            self.finish(st)
            return
        self.note_progress(st)
        self.note_gpus(st)
        if st.state == reg.RUNNING:
            if self.take_stop_request(st):
                return
            self.check_hang(st)
        else:
            self.escalate_stop(st)
        del a

    def attempt_alive(self, st: JobState) -> bool:
        popen = self.popens.get(st.name)
        if popen is not None and popen.poll() is not None:
            self.popens.pop(st.name, None)
        a = st.current
        shim, child = procs.ProcId.from_dict(a.shim), procs.ProcId.from_dict(a.child)
        try:
            return procs.is_alive(shim) or procs.is_alive(child)
        except procs.Unknowable:
            return True

    def reap(self) -> None:
        for name, p in list(self.popens.items()):
            if p.poll() is not None:
                self.popens.pop(name, None)

    # ------------------------------------------------------------------ progress, heartbeat, hangs

    def note_progress(self, st: JobState) -> None:
        """A newer valid checkpoint resets the failure counter (the only thing that does)."""
        spec = self.specs.get(st.name)
        if spec is None:
            return
        newest = self.progress.newest(spec.run_dir)
        if newest is None:
            return
        st.current.newest_checkpoint = newest.name
        if st.progress_mark is None or tuple(newest.mark) > tuple(st.progress_mark):
            st.progress_mark = list(newest.mark)
            st.last_checkpoint = newest.name
            if st.failures:
                self.event(
                    st,
                    "progress",
                    f"new valid checkpoint {newest.name}: failure counter {st.failures} → 0",
                    checkpoint=newest.name,
                )
            st.failures = 0
            st.resume_override = None
            self.save(st)

    def start_clock(self, st: JobState) -> None:
        child = procs.ProcId.from_dict(st.current.child)
        pid = self.beat_pid(st.name, child.pid if child else None)
        self.clocks[st.name] = HangClock(started=st.current.started, pid=pid)

    def nproc(self, name: str) -> int | None:
        spec = self.specs.get(name)
        return spec.nproc if spec is not None else None

    def beat_pid(self, name: str, child_pid: int | None) -> int | None:
        """The pid the heartbeat must carry: the job's, or None under torchrun.

        Under torchrun rank 0 writes the heartbeat, not the launcher we started; the
        attempt's start time alone then tells its beats from an earlier attempt's.
        """
        return None if self.nproc(name) else child_pid

    def tag(self, st: JobState) -> str:
        """The attempt's GUARDIAN_ATTEMPT_TAG (the shim sets it to its attempt dir)."""
        return os.path.abspath(self.home.attempt_dir(st.name, st.current.n))

    def check_hang(self, st: JobState) -> None:
        clock = self.clocks.get(st.name)
        spec = self.specs.get(st.name)
        if clock is None or spec is None:
            return
        if clock.pid is None and st.current.child and not self.nproc(st.name):
            clock.pid = st.current.child["pid"]
        beat = poll_heartbeat(clock, spec.run_dir)
        if beat is not None:
            st.current.last_step = beat.step
        why = clock.verdict(self.k)
        if why is None:
            return
        child = procs.ProcId.from_dict(st.current.child)
        self.event(st, "hang", why, step=beat.step if beat else None)
        targets = (procs.ranks(child) or [child]) if self.nproc(st.name) else [child]
        for target in targets if child is not None else []:
            done = procs.dump_stacks(target, self.attempt_file(st, STDERR_LOG), self.k.stack_dump_wait)
            self.event(
                st,
                "stacks",
                "collected evidence before killing: " + "; ".join(done),
                log=self.attempt_file(st, STDERR_LOG),
            )
        self.begin_stop(st, "hang", "term", self.k.kill_grace)

    # ------------------------------------------------------------------ stopping

    def begin_stop(self, st: JobState, why: str, stage: str, grace: float) -> None:
        child = procs.ProcId.from_dict(st.current.child)
        sig = signal.SIGUSR2 if stage == "usr2" else signal.SIGTERM
        sent = self.signal_job(st, child, sig)
        st.stop = {"why": why, "stage": stage, "deadline": time.time() + grace}
        reason = (
            f"sent {sig.name} to pid {child.pid if child else '?'}; waiting {grace:.0f} s"
            if sent
            else "the job's process is not running yet; killing its session"
        )
        self.set_state(st, reg.STOPPING, reason, "stopping", why=why)
        if not sent:
            self.escalate(st, force=True)

    def signal_job(self, st: JobState, child: procs.ProcId | None, sig: int) -> bool:
        """SIGUSR2 goes to every rank of a torchrun job, anything else to the job itself.

        torchrun has no SIGUSR2 handler (it would die and orphan the ranks); SIGTERM it
        forwards to the ranks itself, then SIGKILLs them after its own timeout.
        """
        if sig == signal.SIGUSR2 and self.nproc(st.name):
            sent = [procs.signal_process(r, sig) for r in procs.ranks(child)]
            if any(sent):
                return True
        return procs.signal_process(child, sig)

    def escalate_stop(self, st: JobState) -> None:
        if st.stop and time.time() >= st.stop["deadline"]:
            self.escalate(st)

    def escalate(self, st: JobState, force: bool = False) -> None:
        """usr2 → SIGTERM the job; term → SIGKILL its whole process group and session."""
        shim, child = procs.ProcId.from_dict(st.current.shim), procs.ProcId.from_dict(st.current.child)
        if st.stop["stage"] == "usr2" and not force:
            procs.signal_process(child, signal.SIGTERM)
            st.stop.update(stage="term", deadline=time.time() + self.k.kill_grace)
            self.event(st, "stop-escalate", "no exit after SIGUSR2 within the grace period; sent SIGTERM")
        else:
            n = procs.kill_tree(shim, child, signal.SIGKILL, tag=self.tag(st))
            st.stop.update(stage="kill", deadline=time.time() + self.k.kill_grace)
            self.event(st, "stop-escalate", f"SIGKILL to the job's process group and session ({n} signalled)")
        self.save(st)

    # ------------------------------------------------------------------ the end of an attempt

    def finish(self, st: JobState) -> None:
        """The attempt's processes are gone: gather the facts, classify, decide."""
        a = st.current
        spec = self.specs.get(st.name)
        shim, child = procs.ProcId.from_dict(a.shim), procs.ProcId.from_dict(a.child)
        leftovers = procs.kill_tree(shim, child, tag=self.tag(st))
        if leftovers:
            left = procs.wait_gone(shim, child, self.tag(st), self.k.kill_grace)
            self.event(
                st,
                "cleanup",
                f"killed {leftovers} leftover process(es) of the attempt"
                + (f"; {left} still not gone after {self.k.kill_grace:.0f} s" if left else ""),
            )
        facts = self.exit_facts(st, spec)
        verdict = policy.classify(facts)
        self.close_attempt(st, verdict.classification, verdict.reason, facts)
        self.clocks.pop(st.name, None)
        self.apply(st, verdict, facts)

    def exit_facts(self, st: JobState, spec: JobSpec | None) -> policy.ExitFacts:
        a = st.current
        rec = reg.read_json(self.attempt_file(st, EXIT_FILE)) or {}
        a.exit_code = rec.get("returncode") if rec else None
        a.signal = rec.get("signal_name")
        st.stderr_tail = tail(self.attempt_file(st, STDERR_LOG), self.k.stderr_tail_lines)
        status = read_status(spec.run_dir) if spec else None
        if status and float(status.get("updated") or 0) < a.started - 1.0:
            status = None  # written by an earlier attempt
        error = (status or {}).get("error") or {}
        error_type = error.get("type") if isinstance(error, dict) else None
        if spec is not None:
            self.note_progress(st)
        made_progress = a.newest_checkpoint is not None and a.newest_checkpoint != a.resume_from
        stop = st.stop or {}
        nproc = spec.nproc if spec is not None else None
        wide = tail(self.attempt_file(st, STDERR_LOG), 400) if nproc else []
        return policy.ExitFacts(
            exit_code=a.exit_code,
            signal=a.signal,
            run_state=(status or {}).get("state"),
            error_type=error_type or policy.error_type_from_stderr(wide or st.stderr_tail),
            made_progress=made_progress,
            hung=stop.get("why") == "hang",
            stop_requested=stop.get("why") == "request",
            nproc=nproc,
            rank_exits=launch.rank_exits(wide) if nproc else None,
        )

    def close_attempt(
        self, st: JobState, classification: str, reason: str, facts: policy.ExitFacts | None = None
    ) -> None:
        a = st.current
        a.ended = a.ended or time.time()
        a.classification, a.reason = classification, reason
        st.stop = None
        how = f"exit {a.exit_code}" if a.exit_code is not None else (a.signal or "exit unknown")
        self.event(
            st,
            "exit",
            f"attempt {a.n}: {how} → {classification}: {reason}",
            attempt=a.n,
            exit_code=a.exit_code,
            signal=a.signal,
            classification=classification,
            stderr_tail=st.stderr_tail[-5:] if classification not in ("done", "requeue") else [],
        )
        self.save(st)

    def apply(self, st: JobState, v: policy.Verdict, facts: policy.ExitFacts) -> None:
        terminal = {
            "done": reg.DONE,
            "incomplete": reg.INCOMPLETE,
            "permanent": reg.FAILED,
            "stopped": reg.STOPPED,
        }
        if v.classification in terminal:
            self.set_state(st, terminal[v.classification], v.reason, "decision")
            return
        if v.classification == "hang" and self.repeated_hang(st):
            return
        if v.uses_budget:
            st.failures += 1
            st.failure_times.append(time.time())
            st.failure_times = st.failure_times[-50:]
        if self.give_up(st, v):
            return
        if v.uses_budget:
            self.maybe_step_back(st)
        delay = policy.backoff(st.failures, self.k) if v.uses_budget else 0.0
        self.schedule(
            st,
            delay,
            f"{v.reason}; failure {st.failures}/{self.k.max_failures} without progress"
            if v.uses_budget
            else v.reason,
        )

    def repeated_hang(self, st: JobState) -> bool:
        step = st.current.last_step
        if step is not None and step in st.hang_steps:
            self.set_state(
                st, reg.FAILED, f"hung twice at step {step}; a third try would hang too", "decision"
            )
            return True
        if step is not None:
            st.hang_steps.append(step)
        return False

    def give_up(self, st: JobState, v: policy.Verdict) -> bool:
        why = (
            policy.give_up_reason(st.failures, st.failure_times, len(st.attempts), time.time(), self.k)
            if v.uses_budget
            else (
                f"hard cap of {self.k.max_restarts} attempts reached"
                if len(st.attempts) >= self.k.max_restarts
                else None
            )
        )
        if why is None:
            return False
        self.set_state(st, reg.FAILED, f"gave up: {why}; last: {v.reason}", "decision")
        return True

    def maybe_step_back(self, st: JobState) -> None:
        points = [a.resume_from for a in st.attempts if a.classification in ("crash", "hang")]
        prog = [
            a.newest_checkpoint in (None, a.resume_from)
            for a in st.attempts
            if a.classification in ("crash", "hang")
        ]
        spec = self.specs.get(st.name)
        if st.stepped_back or spec is None or not policy.should_step_back(points, [not p for p in prog]):
            return
        older = progress.valid_before(spec.run_dir, points[-1])
        if older is None:
            return
        st.stepped_back, st.resume_override = True, older.path
        self.event(
            st,
            "step-back",
            f"{points[-1]} was the resume point of two attempts that died without "
            f"progress; resuming once from {older.name}",
            checkpoint=older.name,
        )

    def schedule(self, st: JobState, delay: float, reason: str) -> None:
        st.next_start_at = time.time() + delay
        self.set_state(
            st, reg.BACKOFF, f"restart in {delay:.1f} s: {reason}", "restart-scheduled", delay=round(delay, 3)
        )

    # ------------------------------------------------------------------ starting

    def try_start(self, st: JobState) -> None:
        spec = self.specs.get(st.name)
        if spec is None:
            return
        blocked = self.gate(st, spec)
        if st.state == reg.HELD:
            return
        if blocked:
            if (st.gate or {}).get("why") != blocked:
                st.gate = {"why": blocked, "since": time.time()}
                self.event(st, "waiting", blocked)
            st.reason = f"waiting: {blocked}"
            st.next_start_at = time.time() + min(self.k.gate_retry, max(self.k.poll, 0.1))
            self.save(st)
            return
        st.gate = None
        self.start(st, spec)

    def gate(self, st: JobState, spec: JobSpec) -> str | None:
        """Why the job may not start now (None: go). Never start twice; mind GPUs and disk."""
        other = reconcile.run_dir_owner(spec.run_dir, [a.child for a in st.attempts if a.child])
        if other:
            self.set_state(st, reg.HELD, other, "hold")
            return other
        if st.current and st.current.gpus:
            prev = {st.current.child["pid"]} if st.current.child else set()
            if (
                self.gpus.usage(prev)
                and time.time() - (st.gate or {}).get("since", time.time()) < self.k.gpu_release_timeout
            ):
                return f"GPU memory of attempt {st.current.n} not yet released"
        return disk_gate(spec.run_dir, self.progress.newest(spec.run_dir), self.k.disk_factor)

    def start(self, st: JobState, spec: JobSpec) -> None:
        n = len(st.attempts) + 1
        adir = self.home.attempt_dir(st.name, n)
        os.makedirs(adir, mode=0o700, exist_ok=True)
        resume = progress.newest_checked(spec.run_dir, deep=True)
        override = st.resume_override
        a = Attempt(
            n=n,
            boot_id=self.boot,
            started=time.time(),
            resume_from=os.path.basename(override) if override else (resume.name if resume else None),
            resume_override=override,
        )
        st.attempts.append(a)
        st.state, st.reason, st.next_start_at, st.resume_override = reg.RUNNING, "starting", None, None
        self.save(st)  # before the spawn: a daemon killed now finds the attempt by its directory
        env = dict(spec.env, GUARDIAN_RUN_DIR=spec.run_dir, GUARDIAN_ATTEMPT=str(n), GUARDIAN_JOB=st.name)
        env.pop("GUARDIAN_RESUME_FROM", None)
        if override:
            env["GUARDIAN_RESUME_FROM"] = override
        os.makedirs(spec.run_dir, exist_ok=True)
        popen = procs.spawn_shim(adir, spec.argv, spec.cwd, env)
        self.popens[st.name] = popen
        a.shim, a.sid = self.shim_identity(popen.pid), popen.pid
        reg.point_latest(self.home, st.name, n)
        self.start_clock(st)
        self.set_state(
            st,
            reg.RUNNING,
            f"attempt {n} started (pid {popen.pid}); resuming from {a.resume_from or 'scratch'}",
            "start",
            attempt=n,
            resume_from=a.resume_from,
            boot_id=self.boot,
        )

    def shim_identity(self, pid: int) -> dict | None:
        try:
            return {"pid": pid, "create_time": psutil.Process(pid).create_time()}
        except psutil.Error:
            return None

    # ------------------------------------------------------------------ GPUs

    def note_gpus(self, st: JobState) -> None:
        if not self.gpus.available or not st.current.child:
            return
        pids = {st.current.child["pid"]}
        try:
            pids |= {c.pid for c in psutil.Process(st.current.child["pid"]).children(recursive=True)}
        except psutil.Error:
            pass
        used = sorted(self.gpus.usage(pids))
        if used and used != st.current.gpus:
            st.current.gpus = used
            self.event(st, "gpus", f"uses {', '.join(used)}", gpus=used)
            self.save(st)

    def gpu_event(self, ev: dict[str, Any]) -> None:
        for st in self.jobs.values():
            if st.state in (reg.RUNNING, reg.STOPPING) and ev["gpu"] in (st.current.gpus or []):
                self.event(
                    st, "gpu-error", f"NVML event type {ev['type']} (Xid {ev['xid']}) on {ev['gpu']}", **ev
                )


def disk_gate(run_dir: str, newest: progress.Newest | None, factor: float) -> str | None:
    """Refuse to start when the next save cannot fit or the run dir is not writable."""
    probe = run_dir if os.path.isdir(run_dir) else os.path.dirname(os.path.abspath(run_dir))
    if not os.access(probe, os.W_OK):
        return f"{probe}: not writable"
    if newest is None:
        return None
    try:
        st = os.statvfs(probe)
    except OSError:
        return None
    free, need = st.f_bavail * st.f_frsize, int(factor * newest.bytes)
    if st.f_blocks and free < need:
        return f"{probe}: {free} bytes free, need {need} ({factor:g} × the last checkpoint)"
    return None


def tail(path: str, lines: int) -> list[str]:
    """The last ``lines`` lines of a log (reads at most the last 64 KiB)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 65536))
            data = f.read()
    except OSError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-lines:]
