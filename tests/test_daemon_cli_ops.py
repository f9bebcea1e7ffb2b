"""The operator's small commands: service uninstall/status, run's checks, --replace, rm, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from daemon_jobs.harness import FAKE, GUARDIAN, Daemon, cli, env_with, reap, status, wait_for


def svc(home: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = env_with(GUARDIAN_HOME=home)
    r = subprocess.run([GUARDIAN, "service", *args], env=env, capture_output=True, text=True, timeout=60)
    assert not check or r.returncode == 0, r.stderr
    return r


def test_service_install_status_uninstall(tmp_path):
    home, units = str(tmp_path / "home"), str(tmp_path / "units")
    svc(home, "install", "--unit-dir", units)
    st = json.loads(svc(home, "status", "--unit-dir", units, "--json").stdout)
    assert st["installed"] and st["daemon_pid"] is None and st["systemd"]
    out = json.loads(svc(home, "uninstall", "--unit-dir", units, "--json").stdout)
    assert out["removed"] and not os.path.exists(out["unit"]) and "disable" in out["next"][0]
    again = json.loads(svc(home, "uninstall", "--unit-dir", units, "--json").stdout)
    assert again["removed"] is False


def test_uninstall_leaves_a_foreign_unit_alone(tmp_path):
    units = tmp_path / "units"
    units.mkdir()
    (units / "guardian.service").write_text("[Service]\nExecStart=/usr/bin/something-else\n")
    r = svc(str(tmp_path / "home"), "uninstall", "--unit-dir", str(units), check=False)
    assert r.returncode != 0 and "left alone" in r.stderr
    assert (units / "guardian.service").exists()


def test_run_refuses_a_missing_command_and_creates_the_run_dirs_parent(tmp_path):
    home = str(tmp_path / "home")
    r = cli(home, "run", "--name", "typo", "--", "pyhton3", "train.py", check=False)
    assert r.returncode != 0 and "pyhton3: command not found" in r.stderr
    run = tmp_path / "deep" / "er" / "run"
    cli(home, "run", "--name", "ok", "--dir", str(run), "--", sys.executable, FAKE, "finish")
    assert run.parent.is_dir()


def test_replace_keeps_the_command_rm_and_resume(tmp_path):
    home = str(tmp_path / "home")
    d = Daemon(home).start()
    try:
        cli(
            home,
            "run",
            "--name",
            "j",
            "--dir",
            str(tmp_path / "run"),
            "--",
            sys.executable,
            FAKE,
            "finish",
            "3",
        )
        wait_for(lambda: status(home, "j")["state"] == "done", 60, "done")
        cli(home, "run", "--replace", "--name", "j", "--priority", "3")
        assert status(home, "j")["argv"] == [sys.executable, FAKE, "finish", "3"]
        wait_for(
            lambda: status(home, "j")["state"] == "done" and status(home, "j")["attempts"] == 2, 60, "rerun"
        )
        cli(home, "resume", "j")
        wait_for(
            lambda: status(home, "j")["attempts"] == 3 and status(home, "j")["state"] == "done", 60, "resumed"
        )
        cli(home, "rm", "j")
        assert "j" not in [j["name"] for j in status(home)["jobs"]]
        assert (tmp_path / "run").is_dir(), "rm keeps the run directory"
    finally:
        d.stop()
        reap(home)


def test_logs_follow_moves_on_to_the_next_attempt(tmp_path):
    home = str(tmp_path / "home")
    cli(
        home,
        "run",
        "--name",
        "rq",
        "--dir",
        str(tmp_path / "run"),
        "--",
        sys.executable,
        FAKE,
        "requeue",
        "3",
    )
    follower = subprocess.Popen(
        [GUARDIAN, "logs", "--home", home, "rq", "--stdout", "-f"], stdout=subprocess.PIPE, env=env_with()
    )
    d = Daemon(home).start()  # after the follower: it sees the job's first attempt begin
    try:
        wait_for(lambda: status(home, "rq")["state"] == "done", 60, "the requeued job done")
        seen = b""
        os.set_blocking(follower.stdout.fileno(), False)

        def read_more() -> bool:
            nonlocal seen
            seen += follower.stdout.read() or b""
            return b"fake job requeue attempt 2" in seen

        wait_for(read_more, 60, "the follower to reach attempt 2")
        first, marker = seen.index(b"fake job requeue attempt 1"), seen.index(b"=== guardian: attempt 2 ===")
        assert first < marker < seen.index(b"fake job requeue attempt 2")
    finally:
        if follower.poll() is None:
            follower.terminate()
            follower.wait(timeout=30)
        d.stop()
        reap(home)
