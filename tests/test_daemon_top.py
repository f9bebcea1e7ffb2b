"""``guardian top`` in a real terminal (tmux at 80×24, or a pty where tmux is missing)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from daemon_jobs.harness import FAKE, GUARDIAN, Daemon, cli, env_with, reap, status, wait_for


@pytest.fixture
def home(tmp_path):
    yield str(tmp_path / "home")
    reap(str(tmp_path / "home"))


def state(home: str, name: str) -> str:
    return status(home, name)["state"]


def capture_in_tmux(home: str, sock: str, expect: list[str]) -> str:
    """Start top in a detached 80-column tmux session; return the screen once it shows ``expect``."""
    cmd = f"{GUARDIAN} top --home {home} --interval 0.5"
    env = env_with()
    subprocess.run(
        ["tmux", "-S", sock, "new-session", "-d", "-s", "top", "-x", "80", "-y", "24", cmd],
        env=env,
        check=True,
    )
    try:

        def screen() -> str | None:
            r = subprocess.run(
                ["tmux", "-S", sock, "capture-pane", "-p", "-t", "top"], capture_output=True, text=True
            )
            return r.stdout if all(e in r.stdout for e in expect) else None

        return wait_for(screen, 90, f"top to show {expect}", interval=0.5)
    finally:
        subprocess.run(["tmux", "-S", sock, "kill-server"], capture_output=True)


def capture_in_pty(home: str, expect: list[str]) -> str:
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    p = subprocess.Popen(
        [GUARDIAN, "top", "--home", home, "--interval", "0.5"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env_with(),
    )
    os.close(slave)
    buf = b""
    try:

        def screen() -> str | None:
            nonlocal buf
            buf += os.read(master, 65536)
            last = buf.decode(errors="replace").split("\x1b[2J")[-1]
            return last if all(e in last for e in expect) else None

        return wait_for(screen, 90, f"top to show {expect}", interval=0.2)
    finally:
        p.terminate()
        p.wait(timeout=30)
        os.close(master)


def test_top_at_80_columns_shows_every_jobs_state_and_progress(home, tmp_path):
    d = Daemon(home, GUARDIAN_DAEMON_DEVICES="gpu0").start()
    try:
        cli(
            home,
            "run",
            "--name",
            "finished-one",
            "--dir",
            str(tmp_path / "f"),
            "--",
            sys.executable,
            FAKE,
            "finish",
            "3",
        )
        wait_for(lambda: state(home, "finished-one") == "done", 60, "the first job done")
        run = ["--", sys.executable, FAKE, "progress", "1000"]
        cli(home, "run", "--name", "training", "--dir", str(tmp_path / "t"), "--gpus", "1", *run)
        wait_for(lambda: status(home, "training")["step"] == 250, 60, "training at 25%")
        cli(home, "run", "--name", "waiting", "--dir", str(tmp_path / "w"), "--gpus", "1", *run)
        wait_for(lambda: "queued" in status(home, "waiting")["reason"], 60, "the second GPU job queued")
        expect = ["finished-one", "training", "waiting", "25%"]
        if shutil.which("tmux"):
            screen = capture_in_tmux(home, str(tmp_path / "tmux.sock"), expect)
        else:
            screen = capture_in_pty(home, expect)
        lines = screen.splitlines()
        assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
        rows = {
            line.split()[0]: line.split()
            for line in lines
            if line.split() and line.split()[0] in ("finished-one", "training", "waiting")
        }
        assert rows["finished-one"][1] == "done"
        assert rows["training"][1] == "running" and "25%" in rows["training"] and "gpu0" in rows["training"]
        assert rows["waiting"][1] == "pending" and "queued" in screen
        assert "STATE" in screen and "DONE" in screen
        cli(home, "stop", "waiting")
        wait_for(lambda: state(home, "waiting") == "stopped", 60, "the queued job stopped")
        cli(home, "stop", "training", "--grace", "1")
        wait_for(lambda: state(home, "training") == "stopped", 60, "training stopped")
    finally:
        d.stop()
