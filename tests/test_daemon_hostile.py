"""One bad file costs one job, never the daemon; and a daemon watching a job is idle.

Real ``guardian watch`` processes and real files: a garbage state.json, a state.json
holding a JSON array, a FIFO in place of heartbeat.json, a string argv, beside a healthy
job that must still be supervised to ``done``.
"""

from __future__ import annotations

import json
import os
import sys
import time

import psutil
import pytest
from daemon_jobs.harness import FAKE, Daemon, cli, events, status, wait_for

from guardian.daemon import registry as reg


@pytest.fixture
def home(tmp_path) -> str:
    return str(tmp_path / "home")


def register(home: str, name: str, run_dir: str, *argv: str) -> None:
    cli(home, "run", "--name", name, "--dir", run_dir, "--", *argv)


def test_bad_files_hold_their_jobs_and_the_healthy_one_finishes(home, tmp_path):
    register(home, "healthy", str(tmp_path / "r-ok"), sys.executable, FAKE, "finish", "5")
    register(home, "garbage", str(tmp_path / "r-g"), sys.executable, FAKE, "finish", "5")
    register(home, "array", str(tmp_path / "r-a"), sys.executable, FAKE, "finish", "5")
    register(home, "fifo", str(tmp_path / "r-f"), sys.executable, FAKE, "finish", "5")
    register(home, "stringy", str(tmp_path / "r-s"), sys.executable, FAKE, "finish", "5")
    h = reg.Home(home)
    with open(h.job_file("garbage", "state.json"), "w") as f:
        f.write('{"name": "garbage", "state": "done", ')  # cut mid-write by hand
    with open(h.job_file("array", "state.json"), "w") as f:
        f.write('["done"]')  # valid JSON, not an object: must not count as "no state yet"
    os.makedirs(tmp_path / "r-f")
    os.mkfifo(tmp_path / "r-f" / "heartbeat.json")
    spec = json.loads(open(h.job_file("stringy", "job.json")).read())
    reg.write_json(h.job_file("stringy", "job.json"), {**spec, "argv": "python fake_job.py finish"})

    d = Daemon(home).start()
    try:
        wait_for(lambda: status(home, "healthy")["state"] == "done", 60, "the healthy job to finish")
        held = wait_for(
            lambda: (
                all(status(home, n)["state"] == "held" for n in ("garbage", "array", "fifo", "stringy"))
                and {n: status(home, n)["reason"] for n in ("garbage", "array", "fifo", "stringy")}
            ),
            30,
            "the bad jobs to be held",
        )
        assert d.alive()
    finally:
        d.stop()
    assert "state.json" in held["garbage"] and "not valid JSON" in held["garbage"]
    assert "not an object" in held["array"]
    assert "heartbeat.json" in held["fifo"] and "FIFO" in held["fifo"]
    assert "argv" in held["stringy"] and "expected list" in held["stringy"]
    assert status(home, "array")["attempts"] == 0  # a state that says done never runs again
    assert not os.path.exists(tmp_path / "r-a" / "run.json")
    assert open(h.job_file("garbage", "state.json")).read().endswith(", ")  # evidence kept
    assert any(e["event"] == "hold" and "FIFO" in e["reason"] for e in events(home, "fifo"))
    human = cli(home, "status").stdout
    assert "held" in human and "healthy" in human


def test_status_without_daemon_survives_every_bad_file(home, tmp_path):
    register(home, "ok", str(tmp_path / "r1"), sys.executable, FAKE, "finish", "5")
    register(home, "bad", str(tmp_path / "r2"), sys.executable, FAKE, "finish", "5")
    register(home, "big", str(tmp_path / "r3"), sys.executable, FAKE, "finish", "5")
    h = reg.Home(home)
    os.mkfifo(h.job_file("bad", "state.json"))
    with open(h.job_file("big", "job.json"), "r+") as f:
        f.seek(0, os.SEEK_END)
        f.write(" " * (2 << 20))  # still valid JSON, but over the size limit
    jobs = {j["name"]: j for j in json.loads(cli(home, "status", "--json").stdout)["jobs"]}
    assert jobs["ok"]["state"] == "pending"
    assert jobs["bad"]["state"] == "held" and "FIFO" in jobs["bad"]["reason"]
    assert jobs["big"]["state"] == "held" and "limit" in jobs["big"]["reason"]


def test_daemon_idle_watching_a_running_job_uses_under_one_percent_of_a_core(home, tmp_path):
    """The loop wakes for the poll and for user requests, not for its own reads (nor for
    the job's heartbeats): over a window, its CPU time stays under 1 % of the window."""
    register(home, "busy", str(tmp_path / "run"), sys.executable, FAKE, "sleep")
    d = Daemon(home, GUARDIAN_DAEMON_POLL="1.0").start()
    try:
        wait_for(lambda: (s := status(home, "busy"))["step"] and s["step"] > 5, 30, "heartbeats")
        proc = psutil.Process(d.proc.pid)
        window = 10.0
        before, t0 = proc.cpu_times(), time.monotonic()
        wait_for(lambda: time.monotonic() - t0 >= window, window + 5, "the window", interval=0.5)
        after, elapsed = proc.cpu_times(), time.monotonic() - t0
        used = (after.user + after.system) - (before.user + before.system)
        assert status(home, "busy")["state"] == "running"
        cli(home, "stop", "busy", "--wait", "--timeout", "30", "--grace", "1")
    finally:
        d.stop()
    assert used / elapsed < 0.01, f"daemon used {used:.3f} s of CPU in {elapsed:.1f} s"
