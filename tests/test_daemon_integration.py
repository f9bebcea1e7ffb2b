"""The daemon end to end: real ``guardian watch`` processes, real training jobs, real signals.

CPU only; NVML is absent here (no GPU), so GPU checks are off and must not get in the way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
import pytest
from daemon_jobs.harness import (
    FAKE,
    TINY,
    Daemon,
    cli,
    digest,
    env_with,
    events,
    kill_job_session,
    status,
    wait_for,
)


@pytest.fixture(scope="module")
def reference_digest(tmp_path_factory) -> str:
    """The digest of an uninterrupted run of the tiny job."""
    run = str(tmp_path_factory.mktemp("ref") / "run")
    env = env_with(GUARDIAN_RUN_DIR=run)
    subprocess.run([sys.executable, TINY], env=env, check=True, capture_output=True, timeout=120)
    return digest(run)


@pytest.fixture
def home(tmp_path) -> str:
    return str(tmp_path / "home")


def register(home: str, name: str, run_dir: str, *argv: str, **env: str) -> None:
    cli(home, "run", "--name", name, "--dir", run_dir, "--", *argv, env=env_with(**env))


def step_of(home: str, name: str) -> int:
    s = status(home, name)
    return s["step"] if s["state"] == "running" and s["pid"] and s["step"] is not None else -1


def kinds(evs: list[dict]) -> list[str]:
    return [e["event"] for e in evs]


@pytest.mark.slow
def test_sigkill_twice_restarts_and_finishes_exactly(home, tmp_path, reference_digest):
    run = str(tmp_path / "run")
    register(home, "twice", run, sys.executable, TINY, TINY_SLEEP="0.03")
    d = Daemon(home).start()
    try:
        for attempt, at_step in ((1, 30), (2, 90)):
            wait_for(
                lambda n=attempt, k=at_step: (
                    status(home, "twice")["attempts"] == n and step_of(home, "twice") >= k
                ),
                90,
                f"attempt {attempt} to pass step {at_step}",
            )
            os.kill(status(home, "twice")["pid"], signal.SIGKILL)
        final = wait_for(lambda: (s := status(home, "twice"))["state"] == "done" and s, 120, "done")
    finally:
        d.stop()
    assert final["attempts"] == 3 and final["exit_code"] == 0
    assert digest(run) == reference_digest
    exits = [e for e in events(home, "twice") if e["event"] == "exit"]
    assert [e["classification"] for e in exits] == ["crash", "crash", "done"]
    assert exits[0]["signal"] == "SIGKILL"
    starts = [e for e in events(home, "twice") if e["event"] == "start"]
    assert starts[0]["resume_from"] is None and starts[1]["resume_from"] and starts[2]["resume_from"]


@pytest.mark.slow
def test_hang_is_detected_stacks_logged_killed_and_resumed(home, tmp_path, reference_digest):
    run = str(tmp_path / "run")
    register(home, "hangs", run, sys.executable, TINY, TINY_HANG_AT="40")
    # A short save allowance: guard.py (at the time of writing) leaves the phase at "save"
    # after the first checkpoint and writes no more heartbeats (reported to the lead).
    d = Daemon(home, GUARDIAN_DAEMON_SAVE_TIMEOUT="10").start()
    try:
        final = wait_for(
            lambda: (s := status(home, "hangs"))["state"] in ("done", "failed") and s, 150, "end"
        )
    finally:
        d.stop()
    assert final["state"] == "done", final
    evs = events(home, "hangs")
    assert "hang" in kinds(evs) and "stacks" in kinds(evs)
    assert "faulthandler (SIGTTIN)" in next(e for e in evs if e["event"] == "stacks")["reason"]
    log1 = cli(home, "logs", "hangs", "--attempt", "1").stdout
    assert "job hung; dumping stacks" in log1
    assert "most recent call first" in log1 and "tiny_train.py" in log1  # faulthandler's dump
    exits = [e for e in evs if e["event"] == "exit"]
    assert [e["classification"] for e in exits] == ["hang", "done"]
    assert digest(run) == reference_digest


@pytest.mark.slow
def test_power_loss_and_reboot_bring_the_job_back(home, tmp_path, reference_digest):
    run = str(tmp_path / "run")
    register(home, "power", run, sys.executable, TINY, TINY_SLEEP="0.03")
    d = Daemon(home, GUARDIAN_BOOT_ID="boot-before").start()
    wait_for(lambda: step_of(home, "power") >= 40, 90, "training to pass step 40")
    d.stop(signal.SIGKILL)
    kill_job_session(home, "power")
    d2 = Daemon(home, GUARDIAN_BOOT_ID="boot-after").start()
    try:
        final = wait_for(lambda: (s := status(home, "power"))["state"] == "done" and s, 120, "done")
    finally:
        d2.stop()
    evs = events(home, "power")
    assert "reconcile-reboot" in kinds(evs)
    assert [e["classification"] for e in evs if e["event"] == "exit"] == ["reboot", "done"]
    assert final["failures_without_progress"] == 0 and final["attempts"] == 2
    assert digest(run) == reference_digest


def test_power_loss_same_boot_counts_one_crash(home, tmp_path):
    run = str(tmp_path / "run")
    register(home, "cut", run, sys.executable, FAKE, "sleep")
    d = Daemon(home).start()
    wait_for(lambda: step_of(home, "cut") >= 2, 30, "heartbeats")
    d.stop(signal.SIGKILL)
    kill_job_session(home, "cut")
    d2 = Daemon(home).start()
    try:
        wait_for(
            lambda: status(home, "cut")["attempts"] == 2 and status(home, "cut")["state"] == "running",
            30,
            "restart",
        )
        cli(home, "stop", "cut", "--wait", "--timeout", "30", "--grace", "1")
    finally:
        d2.stop()
    evs = events(home, "cut")
    assert "reconcile-finished" in kinds(evs)
    assert [e["classification"] for e in evs if e["event"] == "exit"] == ["crash", "stopped"]


def test_deterministic_startup_failure_stops_after_attempts_with_backoff(home, tmp_path):
    run = str(tmp_path / "run")
    register(home, "broken", run, sys.executable, TINY, TINY_FAIL="RuntimeError")
    d = Daemon(home).start()
    try:
        final = wait_for(lambda: (s := status(home, "broken"))["state"] == "failed" and s, 60, "failed")
    finally:
        d.stop()
    assert final["attempts"] == 3
    assert "3 failures without a newer valid checkpoint" in final["reason"]
    assert any("RuntimeError: deliberate start-up failure" in line for line in final["stderr_tail"])
    delays = [e["delay"] for e in events(home, "broken") if e["event"] == "restart-scheduled"]
    assert len(delays) == 2 and delays[1] > delays[0]  # 0.3 s then 0.6 s, ±25 % jitter
    human = cli(home, "status", "broken").stdout
    assert "RuntimeError: deliberate start-up failure" in human and "gave up" in human


def test_permanent_error_is_not_retried(home, tmp_path):
    register(home, "typo", str(tmp_path / "run"), sys.executable, TINY, TINY_FAIL="NameError")
    d = Daemon(home).start()
    try:
        final = wait_for(lambda: (s := status(home, "typo"))["state"] == "failed" and s, 60, "failed")
    finally:
        d.stop()
    assert final["attempts"] == 1 and final["classification"] == "permanent"
    assert "NameError before any new checkpoint" in final["reason"]


def test_exit_codes_75_and_78(home, tmp_path):
    register(home, "requeue", str(tmp_path / "r1"), sys.executable, FAKE, "requeue", "5")
    register(home, "never", str(tmp_path / "r2"), sys.executable, FAKE, "never")
    d = Daemon(home).start()
    try:
        wait_for(lambda: status(home, "requeue")["state"] == "done", 60, "requeue job done")
        wait_for(lambda: status(home, "never")["state"] == "failed", 60, "never job failed")
    finally:
        d.stop()
    rq = status(home, "requeue")
    assert rq["attempts"] == 2 and rq["failures_without_progress"] == 0
    assert status(home, "never")["attempts"] == 1


def test_finished_job_is_never_restarted_and_exit0_without_marker_is_reported(home, tmp_path):
    register(home, "fin", str(tmp_path / "r1"), sys.executable, FAKE, "finish", "5")
    register(home, "early", str(tmp_path / "r2"), sys.executable, TINY, TINY_EXIT0_EARLY="20")
    d = Daemon(home).start()
    try:
        wait_for(lambda: status(home, "fin")["state"] == "done", 60, "done")
        wait_for(lambda: status(home, "early")["state"] == "incomplete", 60, "incomplete")
    finally:
        d.stop()
    d2 = Daemon(home).start()  # a new daemon reconciles: nothing to restart
    try:
        wait_for(lambda: "loaded" in kinds(events(home, "fin")), 10, "reload")
        import time

        time.sleep(1.0)
    finally:
        d2.stop()
    assert status(home, "fin")["attempts"] == 1 and status(home, "fin")["state"] == "done"
    early = status(home, "early")
    assert early["attempts"] == 1 and "no 'finished' marker" in early["reason"]


def test_daemon_restart_neither_kills_nor_duplicates_jobs(home, tmp_path):
    run = str(tmp_path / "run")
    register(home, "steady", run, sys.executable, FAKE, "workers")
    d = Daemon(home).start()
    pid = wait_for(lambda: step_of(home, "steady") >= 2 and status(home, "steady")["pid"], 30, "running")
    d.stop(signal.SIGTERM)
    assert psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    d.start()  # a second daemon on the same home adopts
    try:
        wait_for(lambda: "reconcile-adopt" in kinds(events(home, "steady")), 10, "adoption")
        s = status(home, "steady")
        assert s["pid"] == pid and s["attempts"] == 1 and s["state"] == "running"
        tree = [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
        assert len(tree) == 3  # the job and its two "DataLoader workers"
        r = cli(home, "stop", "steady", "--wait", "--timeout", "40", "--grace", "1", "--json")
        assert '"state": "stopped"' in r.stdout
    finally:
        d.stop()
    for p in tree:  # the whole tree is gone, workers included
        assert not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE
    assert status(home, "steady")["attempts"] == 1


def test_stop_asks_the_library_for_a_checkpoint(home, tmp_path):
    run = str(tmp_path / "run")
    register(home, "graceful", run, sys.executable, TINY, TINY_SLEEP="0.05", TINY_EPOCHS="40")
    d = Daemon(home).start()
    try:
        wait_for(lambda: step_of(home, "graceful") >= 15, 60, "training")
        cli(home, "stop", "graceful", "--wait", "--timeout", "60")
    finally:
        d.stop()
    s = status(home, "graceful")
    assert s["state"] == "stopped" and s["exit_code"] == 75  # saved at a step boundary, then 75
    assert s["attempts"] == 1


def test_only_one_daemon_per_home(home):
    d = Daemon(home).start()
    try:
        r = subprocess.run(
            [d.env and os.path.join(os.path.dirname(sys.executable), "guardian"), "watch", "--home", home],
            env=d.env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode != 0 and "already supervises" in r.stderr
    finally:
        d.stop()
