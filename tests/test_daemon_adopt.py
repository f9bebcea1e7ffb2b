"""Adopting hand-started runs: real processes started outside the daemon, real SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from daemon_jobs.harness import FAKE, TINY, Daemon, cli, digest, env_with, events, reap, status, wait_for


@pytest.fixture(scope="module")
def reference_digest(tmp_path_factory) -> str:
    run = str(tmp_path_factory.mktemp("ref") / "run")
    subprocess.run(
        [sys.executable, TINY],
        env=env_with(GUARDIAN_RUN_DIR=run),
        check=True,
        capture_output=True,
        timeout=180,
    )
    return digest(run)


@pytest.fixture
def home(tmp_path):
    yield str(tmp_path / "home")
    reap(str(tmp_path / "home"))


def job_of(home: str, name: str) -> dict | None:
    return next((j for j in status(home)["jobs"] if j["name"] == name), None)


def test_hand_started_run_with_guardian_watch_is_restarted_after_sigkill_and_ends_bitwise_equal(
    home, tmp_path, reference_digest
):
    run = str(tmp_path / "handrun")
    d = Daemon(home).start()
    log = open(tmp_path / "hand.log", "wb")
    env = env_with(GUARDIAN_WATCH="1", GUARDIAN_HOME=home, GUARDIAN_RUN_DIR=run, TINY_SLEEP="0.02")
    hand = subprocess.Popen(
        [sys.executable, TINY], env=env, stdout=log, stderr=log, start_new_session=True, cwd=str(tmp_path)
    )
    try:
        j = wait_for(
            lambda: (x := job_of(home, "handrun")) and x["state"] == "running" and x["pid"] == hand.pid and x,
            120,
            "the hand-started run to register itself",
        )
        assert j["argv"][0] == sys.executable and j["argv"][1] == TINY
        wait_for(lambda: (job_of(home, "handrun") or {}).get("last_checkpoint"), 120, "a first checkpoint")
        hand.send_signal(signal.SIGKILL)
        hand.wait(timeout=30)
        wait_for(lambda: job_of(home, "handrun")["state"] == "done", 300, "the restarted run to finish")
        evs = [e["event"] for e in events(home, "handrun")]
        assert "adopted" in evs and "start" in evs, evs
        exits = [e for e in events(home, "handrun") if e["event"] == "exit"]
        assert exits[0]["classification"] == "crash" and exits[-1]["classification"] == "done"
        assert digest(run) == reference_digest
    finally:
        if hand.poll() is None:
            hand.kill()
        d.stop()


def test_adopt_command_watches_a_run_already_going(home, tmp_path):
    run = str(tmp_path / "going")
    env = env_with(GUARDIAN_RUN_DIR=run)
    hand = subprocess.Popen(
        [sys.executable, FAKE, "sleep"], env=env, start_new_session=True, stdout=subprocess.DEVNULL
    )
    d = Daemon(home).start()
    try:
        wait_for(lambda: os.path.exists(os.path.join(run, "run.json")), 60, "run.json")
        r = cli(home, "adopt", run, "--json")
        assert f'"pid": {hand.pid}' in r.stdout
        wait_for(
            lambda: (j := job_of(home, "going")) and j["state"] == "running" and j["pid"] == hand.pid,
            60,
            "adopted",
        )
        cli(home, "stop", "going", "--wait", "--grace", "5")
        assert hand.wait(timeout=60) is not None
        assert job_of(home, "going")["state"] == "stopped"
    finally:
        if hand.poll() is None:
            hand.kill()
        d.stop()


def test_adopt_refuses_a_run_directory_owned_by_another_user(home, tmp_path):
    if os.getuid() != 0:
        pytest.skip("needs root to give the run directory to another user")
    run = tmp_path / "theirs"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"state": "running", "pid": os.getpid(), "updated": 0}))
    os.chown(run, 65534, 65534)
    r = cli(home, "adopt", str(run), check=False)
    assert r.returncode != 0
    assert "refused" in r.stderr and "owned by uid 65534" in r.stderr
    assert not os.path.exists(os.path.join(home, "jobs", "theirs"))


def test_a_failed_registration_warns_and_training_goes_on(tmp_path):
    not_a_dir = tmp_path / "home-is-a-file"
    not_a_dir.write_text("")
    env = env_with(
        GUARDIAN_WATCH="1",
        GUARDIAN_HOME=str(not_a_dir),
        GUARDIAN_RUN_DIR=str(tmp_path / "run"),
        TINY_EPOCHS="1",
    )
    r = subprocess.run([sys.executable, TINY], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "not watched by the daemon" in r.stderr and "training goes on unwatched" in r.stderr
    assert "finished at step" in r.stdout
