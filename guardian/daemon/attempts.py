"""One attempt's life at its two ends: starting it, and deciding what its end means.

Starting: the gates (never two trainers in one run directory, no hostile run files,
GPU memory released, disk space), then state.json *before* the spawn, so a daemon
killed at any point finds the attempt by its directory.

Ending: gather the exit facts (exit.json, run.json, stderr, progress), classify them
with the pure rules of ``policy``, then restart, back off, hold or give up. Only exit
facts decide here; a heartbeat never does.
"""

from __future__ import annotations

import os
import subprocess
import time

import psutil

from . import devices, gates, housekeeping, policy, procs, progress
from . import registry as reg
from .gpu import Gpus
from .journal import Journal
from .knobs import Knobs
from .launch import rank_exits
from .records import Attempt, JobSpec, JobState
from .safefiles import BadFileError, read_json_object, read_run_status, read_tail
from .shim import EXIT_FILE, STDERR_LOG

TERMINAL_OF = {
    "done": reg.DONE,
    "incomplete": reg.INCOMPLETE,
    "permanent": reg.FAILED,
    "stopped": reg.STOPPED,
    "unrunnable": reg.HELD,
}


class Attempts:
    def __init__(
        self, home: reg.Home, k: Knobs, journal: Journal, gpus: Gpus, cache: progress.ProgressCache, boot: str
    ) -> None:
        self.home, self.k, self.journal, self.gpus, self.cache, self.boot = (
            home,
            k,
            journal,
            gpus,
            cache,
            boot,
        )
        self.alloc = devices.Allocator(gpus, k)
        self.jobs: dict[str, JobState] = {}  # the supervisor's table (the allocation is read from it)

    def file(self, st: JobState, leaf: str) -> str:
        return os.path.join(self.home.attempt_dir(st.name, st.latest.n), leaf)

    def tag(self, st: JobState) -> str:
        """The attempt's GUARDIAN_ATTEMPT_TAG (the shim sets it to its attempt dir)."""
        return os.path.abspath(self.home.attempt_dir(st.name, st.latest.n))

    # ------------------------------------------------------------------ starting

    def try_start(self, st: JobState, spec: JobSpec) -> subprocess.Popen | None:
        """Start the next attempt if every gate opens; hold or wait otherwise."""
        try:
            hold = gates.hold_reason(spec.run_dir, [a.child for a in st.attempts if a.child])
        except BadFileError as e:
            hold = str(e)
        hold = hold or self.alloc.too_big(spec)
        if hold:
            self.journal.set_state(st, reg.HELD, hold, "hold")
            return None
        now = time.time()
        blocked = (
            self.alloc.wait_reason(spec, self.jobs)
            or gates.gpu_gate(st, self.gpus, self.k, now)
            or gates.disk_gate(spec.run_dir, self.cache.newest(spec.run_dir), self.k.disk_factor)
        )
        if blocked:
            if (st.gate or {}).get("why") != blocked:
                st.gate = {"why": blocked, "since": now}
                self.journal.event(st, "waiting", blocked)
            st.reason = f"waiting: {blocked}"
            st.next_start_at = now + min(self.k.gate_retry, max(self.k.poll, 0.1))
            self.journal.save(st)
            return None
        st.gate = None
        return self.start(st, spec)

    def start(self, st: JobState, spec: JobSpec) -> subprocess.Popen:
        n = st.started + 1
        adir = self.home.attempt_dir(st.name, n)
        os.makedirs(adir, mode=0o700, exist_ok=True)
        resume = progress.newest_checked(spec.run_dir, deep=False)
        override = st.resume_override
        a = Attempt(
            n=n,
            boot_id=self.boot,
            started=time.time(),
            resume_from=os.path.basename(override) if override else (resume.name if resume else None),
            resume_override=override,
            devices=self.alloc.take(spec, self.jobs),
        )
        st.attempts.append(a)
        st.state, st.reason, st.next_start_at, st.resume_override = reg.RUNNING, "starting", None, None
        self.journal.save(st)  # before the spawn: a daemon killed now finds the attempt by its directory
        env = dict(spec.env, GUARDIAN_RUN_DIR=spec.run_dir, GUARDIAN_ATTEMPT=str(n), GUARDIAN_JOB=st.name)
        env.pop("GUARDIAN_RESUME_FROM", None)
        if override:
            env["GUARDIAN_RESUME_FROM"] = override
        visible = devices.visible_devices(spec, a.devices)
        if visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = visible
        popen = procs.spawn_shim(adir, spec.argv, spec.cwd, env)
        a.shim, a.sid = shim_identity(popen.pid), popen.pid
        reg.point_latest(self.home, st.name, n)
        self.journal.set_state(
            st,
            reg.RUNNING,
            f"attempt {n} starting (shim pid {popen.pid}); resuming from {a.resume_from or 'scratch'}"
            + (f"; GPUs {','.join(a.devices)}" if a.devices else ""),
            "start",
            attempt=n,
            resume_from=a.resume_from,
            boot_id=self.boot,
            devices=a.devices,
        )
        return popen

    # ------------------------------------------------------------------ the end of an attempt

    def finish(self, st: JobState, spec: JobSpec | None) -> None:
        """The attempt's processes are gone: gather the facts, classify, decide."""
        a = st.latest
        shim, child = procs.ProcId.from_dict(a.shim), procs.ProcId.from_dict(a.child)
        leftovers = procs.kill_tree(shim, child, tag=self.tag(st))
        if leftovers:
            left = procs.wait_gone(shim, child, self.tag(st), self.k.kill_grace)
            self.journal.event(
                st,
                "cleanup",
                f"killed {leftovers} leftover process(es) of the attempt"
                + (f"; {left} still not gone after {self.k.kill_grace:.0f} s" if left else ""),
            )
        facts = self.exit_facts(st, spec)
        verdict = policy.classify(facts)
        self.close(st, verdict.classification, verdict.reason)
        self.apply(st, verdict, spec)
        if housekeeping.prune(self.home, st, self.k.keep_attempts, self.k.log_max_bytes):
            self.journal.save(st)

    def exit_facts(self, st: JobState, spec: JobSpec | None) -> policy.ExitFacts:
        a = st.latest
        try:
            rec = read_json_object(self.file(st, EXIT_FILE), 1 << 16) or {}
        except BadFileError as e:
            self.journal.event(st, "bad-file", str(e))
            rec = {}
        code, sig = rec.get("returncode"), rec.get("signal_name")
        a.exit_code = code if isinstance(code, int) and not isinstance(code, bool) else None
        a.signal = sig if isinstance(sig, str) else None
        st.stderr_tail = tail(self.file(st, STDERR_LOG), self.k.stderr_tail_lines)
        status = self.run_status(st, spec)
        error = (status or {}).get("error") or {}
        error_type = error.get("type") if isinstance(error, dict) else None
        made_progress = a.newest_checkpoint is not None and a.newest_checkpoint != a.resume_from
        stop = st.stop or {}
        nproc = spec.nproc if spec is not None else None
        wide = tail(self.file(st, STDERR_LOG), 400) if nproc else []
        spawn_error = rec.get("spawn_error")
        return policy.ExitFacts(
            exit_code=a.exit_code,
            signal=a.signal,
            run_state=(status or {}).get("state"),
            error_type=(error_type if isinstance(error_type, str) else None)
            or policy.error_type_from_stderr(wide or st.stderr_tail),
            made_progress=made_progress,
            hung=stop.get("why") == "hang",
            stop_requested=stop.get("why") == "request",
            nproc=nproc,
            rank_exits=rank_exits(wide) if nproc else None,
            spawn_error=spawn_error if isinstance(spawn_error, str) else None,
        )

    def run_status(self, st: JobState, spec: JobSpec | None) -> dict | None:
        """run.json if this attempt wrote it (an earlier attempt's word does not count)."""
        if spec is None:
            return None
        try:
            status = read_run_status(spec.run_dir)
        except BadFileError as e:
            self.journal.event(st, "bad-file", f"{e}; classifying without it")
            return None
        updated = (status or {}).get("updated")
        if not isinstance(updated, (int, float)) or updated < st.latest.started - 1.0:
            return None
        return status

    def close(self, st: JobState, classification: str, reason: str) -> None:
        a = st.latest
        a.ended = a.ended or time.time()
        a.classification, a.reason = classification, reason
        st.stop = None
        how = f"exit {a.exit_code}" if a.exit_code is not None else (a.signal or "exit unknown")
        self.journal.event(
            st,
            "exit",
            f"attempt {a.n}: {how} → {classification}: {reason}",
            attempt=a.n,
            exit_code=a.exit_code,
            signal=a.signal,
            classification=classification,
            stderr_tail=st.stderr_tail[-5:] if classification not in ("done", "requeue") else [],
        )
        self.journal.save(st)

    def apply(self, st: JobState, v: policy.Verdict, spec: JobSpec | None) -> None:
        if st.latest.lost and v.classification != "done":
            self.journal.set_state(st, reg.HELD, f"{st.latest.lost}; last: {v.reason}", "hold")
            return
        if v.classification in TERMINAL_OF:
            self.journal.set_state(st, TERMINAL_OF[v.classification], v.reason, "decision")
            return
        if v.classification == "hang":
            st.hangs += 1
            if st.latest.last_step is not None:
                st.hang_steps = [*st.hang_steps[-49:], st.latest.last_step]
            why = policy.hang_limit_reason(st.hangs)
            if why:
                self.journal.set_state(
                    st, reg.FAILED, f"gave up: {why}; a third try would hang too", "decision"
                )
                return
        if v.classification == "requeue":
            st.requeues += 1
        if v.uses_budget:
            st.failures += 1
            st.failure_times = [*st.failure_times[-49:], time.time()]
        if self.give_up(st, v):
            return
        if v.uses_budget:
            self.maybe_step_back(st, spec)
            delay = policy.backoff(st.failures, self.k)
            why = f"{v.reason}; failure {st.failures}/{self.k.max_failures} without progress"
        elif v.classification == "requeue":
            delay = policy.requeue_delay(st.requeues, self.k)
            why = f"{v.reason}; requeue {st.requeues} in a row" if st.requeues > 1 else v.reason
        else:
            delay, why = 0.0, v.reason
        self.schedule(st, delay, why)

    def give_up(self, st: JobState, v: policy.Verdict) -> bool:
        if v.uses_budget:
            why = policy.give_up_reason(st.failures, st.failure_times, st.started, time.time(), self.k)
        elif st.started >= self.k.max_restarts:
            why = f"hard cap of {self.k.max_restarts} attempts reached"
        else:
            why = policy.requeue_limit_reason(st.requeues, self.k) if v.classification == "requeue" else None
        if why is None:
            return False
        self.journal.set_state(st, reg.FAILED, f"gave up: {why}; last: {v.reason}", "decision")
        return True

    def maybe_step_back(self, st: JobState, spec: JobSpec | None) -> None:
        died = [a for a in st.attempts if a.classification in ("crash", "hang")]
        points = [a.resume_from for a in died]
        advanced = [a.newest_checkpoint not in (None, a.resume_from) for a in died]
        if st.stepped_back or spec is None or not policy.should_step_back(points, advanced):
            return
        older = progress.valid_before(spec.run_dir, points[-1])
        if older is None:
            return
        st.stepped_back, st.resume_override = True, older.path
        self.journal.event(
            st,
            "step-back",
            f"{points[-1]} was the resume point of two attempts that died without "
            f"progress; resuming once from {older.name}",
            checkpoint=older.name,
        )

    def schedule(self, st: JobState, delay: float, reason: str) -> None:
        st.next_start_at = time.time() + delay
        self.journal.set_state(
            st, reg.BACKOFF, f"restart in {delay:.1f} s: {reason}", "restart-scheduled", delay=round(delay, 3)
        )


def shim_identity(pid: int) -> dict | None:
    try:
        return {"pid": pid, "create_time": psutil.Process(pid).create_time()}
    except psutil.Error:
        return None


def tail(path: str, lines: int) -> list[str]:
    """The last ``lines`` lines of a log (reads at most the last 64 KiB)."""
    try:
        data = read_tail(path, 65536)
    except (BadFileError, OSError):
        return []
    return data.decode("utf-8", "replace").splitlines()[-lines:]
