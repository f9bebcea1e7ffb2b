"""Notifications: a real webhook receiver on 127.0.0.1, real notifier commands."""

from __future__ import annotations

import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import psutil
import pytest
from daemon_jobs.harness import FAKE, TINY, Daemon, cli, env_with, reap, status, wait_for

from guardian.daemon import knobs, notify
from guardian.daemon.records import JobSpec, JobState


@pytest.fixture
def home(tmp_path):
    yield str(tmp_path / "home")
    reap(str(tmp_path / "home"))


class Receiver:
    """An HTTP server on 127.0.0.1 (only) that keeps every JSON body POSTed to it."""

    def __init__(self) -> None:
        got = self.got = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                got.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def state_of(home: str, name: str) -> str:
    return status(home, name)["state"]


def test_webhook_gets_failed_and_done_with_job_state_attempt_and_checkpoint(home, tmp_path):
    rx = Receiver()
    d = Daemon(home).start()
    try:
        base = ["--webhook", rx.url, "--", sys.executable, TINY]
        cli(home, "run", "--name", "ok", "--dir", str(tmp_path / "ok"), *base, env=env_with(TINY_EPOCHS="2"))
        cli(
            home,
            "run",
            "--name",
            "bad",
            "--dir",
            str(tmp_path / "bad"),
            *base,
            env=env_with(TINY_EXIT_AT="35:78", GUARDIAN_ASYNC="0"),
        )
        wait_for(lambda: {e["job"]: e for e in rx.got}.keys() == {"ok", "bad"}, 300, "both events")
        by_job = {e["job"]: e for e in rx.got}
        done, failed = by_job["ok"], by_job["bad"]
        assert done["event"] == "done" and done["state"] == "done" and done["attempt"] == 1
        assert done["last_checkpoint"] and done["last_checkpoint"] == status(home, "ok")["last_checkpoint"]
        assert failed["event"] == "failed" and failed["state"] == "failed" and failed["attempt"] == 1
        assert failed["last_checkpoint"] == status(home, "bad")["last_checkpoint"] is not None
        assert "exit 78" in failed["reason"]
        assert len(rx.got) == 2, rx.got
    finally:
        d.stop()
        rx.close()


def test_a_hanging_or_failing_notifier_never_stalls_supervision(home, tmp_path):
    out = tmp_path / "events.out"
    d = Daemon(home).start()
    try:
        job = [sys.executable, FAKE, "finish", "3"]
        cli(
            home,
            "run",
            "--name",
            "fails",
            "--dir",
            str(tmp_path / "f"),
            "--notify",
            f"cat >> {out}; exit 3",
            "--",
            *job,
        )
        cli(
            home,
            "run",
            "--name",
            "hangs",
            "--dir",
            str(tmp_path / "h"),
            "--notify",
            "exec sleep 1000",
            "--",
            *job,
        )
        wait_for(
            lambda: out.exists() and '"job": "fails"' in out.read_text(), 60, "the failing notifier's input"
        )
        assert json.loads(out.read_text().splitlines()[0])["event"] == "done"
        sleeper = wait_for(
            lambda: [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", "1000"]],
            60,
            "the hanging notifier to run",
        )
        cli(home, "run", "--name", "after", "--dir", str(tmp_path / "a"), "--", *job)
        wait_for(lambda: state_of(home, "after") == "done", 60, "a job registered while the notifier hangs")
        assert sleeper[0].is_running(), "the notifier was still hanging while the daemon went on"
        assert state_of(home, "fails") == "done" and state_of(home, "hangs") == "done"
        log = open(os.path.join(home, "daemon.log")).read()
        assert "exited 3" in log
    finally:
        d.stop()
    assert wait_for(lambda: not sleeper[0].is_running(), 30, "the hanging notifier killed at daemon exit")


def test_rate_limit_sends_one_event_per_job_and_kind(tmp_path):
    out = tmp_path / "out"
    k = knobs.Knobs(notify=f"cat >> {out}", notify_interval=3600, notify_timeout=30)
    spec = JobSpec(name="j", argv=["x"], cwd="/", run_dir=str(tmp_path), env={}, owner_uid=os.getuid())
    n = notify.Notifier(k, {"j": spec})
    st = JobState(name="j", state="failed", reason="boom")
    for _ in range(5):
        n.send(st, "failed")
    n.send(st, "done")
    n.close()
    events = [json.loads(line)["event"] for line in out.read_text().splitlines()]
    assert events == ["failed", "done"]
