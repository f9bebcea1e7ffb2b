"""Test harness for the daemon: real ``guardian watch`` processes, a per-test --home,
timings shrunk through env vars so every scenario runs in seconds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
GUARDIAN = os.path.join(os.path.dirname(sys.executable), "guardian")
TINY = os.path.join(HERE, "tiny_train.py")
FAKE = os.path.join(HERE, "fake_job.py")

FAST = {
    "GUARDIAN_DAEMON_POLL": "0.1",
    "GUARDIAN_DAEMON_BACKOFF_BASE": "0.3",
    "GUARDIAN_DAEMON_BACKOFF_MAX": "2",
    "GUARDIAN_DAEMON_HANG_MIN": "3",
    "GUARDIAN_DAEMON_STARTUP": "60",
    "GUARDIAN_DAEMON_SAVE_TIMEOUT": "60",
    "GUARDIAN_DAEMON_STOP_GRACE": "20",
    "GUARDIAN_DAEMON_KILL_GRACE": "2",
    "GUARDIAN_DAEMON_STACK_DUMP_WAIT": "1",
    "GUARDIAN_DAEMON_GATE_RETRY": "0.5",
    "GUARDIAN_HEARTBEAT_INTERVAL": "0.1",
    "GUARDIAN_QUIET": "",
    "PYTHONUNBUFFERED": "1",
}


def env_with(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GUARDIAN_", "TINY_"))}
    env.update(FAST)
    env.update(extra)
    return env


def cli(
    home: str, *args: str, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [GUARDIAN, *args[:1], "--home", home, *args[1:]],
        env=env or env_with(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check and r.returncode != 0:
        raise AssertionError(f"guardian {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def status(home: str, name: str | None = None) -> dict[str, Any]:
    out = json.loads(cli(home, "status", *([name] if name else []), "--json").stdout)
    if name is None:
        return out
    return next(j for j in out["jobs"] if j["name"] == name)


def events(home: str, name: str) -> list[dict[str, Any]]:
    return json.loads(cli(home, "logs", name, "--events", "--json").stdout)


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


class Daemon:
    """One ``guardian watch --home HOME`` subprocess."""

    def __init__(self, home: str, **env: str) -> None:
        self.home, self.env = home, env_with(**env)
        self.proc: subprocess.Popen | None = None

    def start(self) -> Daemon:
        log = (
            open(os.path.join(self.home, "watch.out"), "ab")
            if os.path.isdir(self.home)
            else subprocess.DEVNULL
        )
        self.proc = subprocess.Popen(
            [GUARDIAN, "watch", "--home", self.home],
            env=self.env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        wait_for(lambda: status(self.home)["daemon_pid"] == self.proc.pid, 30, "the daemon to start")
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def kill_job_session(home: str, name: str) -> None:
    """Power loss for the job: SIGKILL every process of its attempt's session."""
    from guardian.daemon import registry as reg

    st = reg.load_state(reg.Home(home), name)
    sid = st.current.sid
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                p.kill()
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass


def digest(run_dir: str, env: dict[str, str] | None = None) -> str:
    r = subprocess.run(
        [GUARDIAN, "inspect", run_dir, "--json"],
        capture_output=True,
        text=True,
        env=env or env_with(),
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["digest"]


def reap(home: str) -> int:
    """Kill whatever a test's jobs left running (jobs outlive the daemon by design).

    Found by the shim's attempt tag or a command line under ``home``; returns how many.
    """
    killed = 0
    needle = f"GUARDIAN_ATTEMPT_TAG={os.path.abspath(home)}".encode()
    for p in psutil.process_iter(["cmdline"]):
        try:
            mine = any(home in arg for arg in p.info["cmdline"] or [])
            if not mine:
                with open(f"/proc/{p.pid}/environ", "rb") as f:
                    mine = any(v.startswith(needle) for v in f.read().split(b"\0"))
            if mine and p.pid != os.getpid():
                p.kill()
                killed += 1
        except (OSError, psutil.Error):
            continue
    return killed
