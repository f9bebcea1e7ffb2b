"""Preemption the way schedulers do it: SIGTERM to the whole process group.

Slurm and ``kill -TERM -PGID`` signal the DataLoader workers too. Before the fix the
workers died first and torch's SIGCHLD handler raised ``DataLoader worker ... killed
by signal: Terminated`` inside forward/backward: exit 1 and no checkpoint (40 of 56
signals in the issue). Now every signal must end in a preemption checkpoint and exit
75, and the run, preempted again and again, must end bit-exact with an uninterrupted
one.

The job (tests/preempt_job.py) runs in processes forked from a launcher that has
imported torch once (tests/prewarmed.py): real processes, each in its own session.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from conftest import soak
from helpers import ROOT, final_digest

from guardian.errors import EXIT_REQUEUE
from guardian.format import reader
from guardian.runfiles import read_heartbeat, read_status

JOB = os.path.join(ROOT, "tests", "preempt_job.py")
ENV = {
    **os.environ,
    "GUARDIAN_QUIET": "1",
    "GUARDIAN_HEARTBEAT_INTERVAL": "0",
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.path.join(ROOT, "tests") + os.pathsep + os.environ.get("PYTHONPATH", ""),
}
DEADLINE = 240.0  # seconds for any one condition: generous, a loaded 2-core machine


class Launcher:
    """Drives tests/prewarmed.py: ``start`` forks a job process, ``wait`` reaps it."""

    def __init__(self, log_path: str) -> None:
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tests", "prewarmed.py"), "preempt_job"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=ENV,
        )

    def start(self, *argv: str) -> int:
        self.proc.stdin.write(json.dumps(list(argv)) + "\n")
        self.proc.stdin.flush()
        return int(self._answer("pid"))

    def wait(self) -> int:
        return int(self._answer("exit"))

    def _answer(self, word: str) -> str:
        line = self.proc.stdout.readline()
        assert line.startswith(word + " "), f"launcher said {line!r}; its log: {self.tail()}"
        return line.split()[1]

    def tail(self) -> str:
        with open(self.log.name) as f:
            return f.read()[-4000:]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.log.close()


def _wait_for(condition, what: str) -> None:
    end = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < end, f"gave up after {DEADLINE:.0f} s waiting for {what}"
        time.sleep(0.002)


def _guard_running(run: str, pid: int) -> bool:
    status = read_status(run) if os.path.isdir(run) else None
    return bool(status and status.get("pid") == pid and status.get("state") == "running")


def _step_of(run: str, pid: int) -> int:
    hb = read_heartbeat(run)
    return hb["step"] if hb and hb.get("pid") == pid else -1


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def preempt_repeatedly(launcher: Launcher, run: str, cfg: dict, signals: int, seed: int) -> list[int]:
    """Start the job, SIGTERM its process group at a random moment, check the
    preemption checkpoint and exit 75; again until ``signals`` were sent; then let it
    finish. Returns the steps the preemption checkpoints were taken at."""
    rng = random.Random(seed)
    total = cfg["epochs"] * -(-cfg["samples"] // cfg["batch"])
    preempted: list[int] = []
    while True:
        pid = launcher.start(run, json.dumps(cfg))
        if len(preempted) >= signals:
            break
        _wait_for(lambda pid=pid: _guard_running(run, pid), "the guard to start")
        start = max(_step_of(run, pid), reader.newest_valid(run).manifest.step if preempted else 0)
        target = start + rng.choice([0, 0, 1, 2, 3, 5])  # 0: while the workers start up
        if target > total - 2:  # too close to the end: a signal could race the exit itself
            break
        if target > start:
            _wait_for(lambda pid=pid, t=target: _step_of(run, pid) >= t, f"step {target}")
        time.sleep(rng.uniform(0, 0.03))  # a random moment inside the step, not a "long enough"
        os.killpg(pid, signal.SIGTERM)
        code = launcher.wait()
        newest = reader.newest_valid(run)
        assert code == EXIT_REQUEUE, f"signal {len(preempted) + 1}: exit {code}\n{launcher.tail()}"
        assert newest is not None and "preempt" in newest.manifest.reason, newest and newest.manifest.reason
        assert newest.manifest.step >= target
        _wait_for(lambda pid=pid: _group_gone(pid), "the job's DataLoader workers to exit")
        preempted.append(newest.manifest.step)
    code = launcher.wait()
    assert code == 0, f"the last, uninterrupted part of the run: exit {code}\n{launcher.tail()}"
    return preempted


# 20 process-group SIGTERMs per variant under GUARDIAN_SOAK=1 (about 3 minutes each); 6 in CI
SIGNALS = 20 if soak() else 6


@pytest.mark.slow
@pytest.mark.parametrize("persistent", [False, True], ids=["workers-per-epoch", "persistent-workers"])
def test_sigterm_to_the_process_group_checkpoints_and_resumes_exactly(tmp_path, persistent):
    cfg = {"workers": 2, "persistent": persistent, "epochs": 4, "samples": 192, "batch": 8}
    ref = str(tmp_path / "ref")
    proc = subprocess.run(
        [sys.executable, JOB, ref, json.dumps(cfg)], env=ENV, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    launcher = Launcher(str(tmp_path / "launcher.log"))
    try:
        run = str(tmp_path / "run")
        preempted = preempt_repeatedly(launcher, run, cfg, signals=SIGNALS, seed=int(persistent))
    finally:
        launcher.close()
    assert len(preempted) == SIGNALS
    assert final_digest(run) == final_digest(ref)


@pytest.mark.slow
def test_workers_of_a_loader_the_program_iterates_itself_dying_of_the_signal_still_exit_75(tmp_path):
    """An evaluation loader iterated directly (not through g.batches()) keeps torch's
    worker signal handling: a process-group SIGTERM during evaluation kills its
    workers and torch raises in the loop. That is still a preemption: exit 75 with
    the last checkpoint (no new one can be taken there)."""
    cfg = {"workers": 0, "eval_workers": 2, "epochs": 2, "samples": 96, "every_steps": 5, "signal_in_eval": 1}
    run = str(tmp_path / "run")
    env = {**ENV, "GUARDIAN_QUIET": "0"}
    log = tmp_path / "job.log"
    with open(log, "w") as out:  # a file, not a pipe: the workers inherit it too
        job = subprocess.Popen(
            [sys.executable, JOB, run, json.dumps(cfg)], env=env, start_new_session=True, stderr=out
        )
    try:
        _wait_for(lambda: os.path.exists(run + ".in-eval") or job.poll() is not None, "the evaluation")
        os.killpg(job.pid, signal.SIGTERM)
        open(run + ".signalled", "w").close()
        job.wait(timeout=DEADLINE)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    err = log.read_text()
    assert job.returncode == EXIT_REQUEUE, err[-3000:]
    assert "died of it before a checkpoint could be taken" in err
    # nothing new claimed: a save in flight at the signal completes, but no preemption
    # checkpoint is taken where the program stood (inside its own evaluation loop)
    assert "preempt" not in reader.newest_valid(run).manifest.reason
    assert read_status(run)["state"] == "preempted"
    _wait_for(lambda: _group_gone(job.pid), "the evaluation workers to exit")
