"""Telling people: ``--notify CMD`` and ``--webhook URL`` on failed, held, hung, gave-up, done.

supervisord's event listeners are the anchor, with one difference that matters at
3 a.m.: a notifier can never stall supervision. Deliveries run on a separate thread
from a bounded queue; a command runs in its own session with the event as JSON on
stdin and is killed (its whole process group) after ``notify_timeout``; a webhook
POST has the same timeout. A notifier that hangs, fails or exits non-zero is logged
and forgotten — the job's state never depends on it. When the queue is full (a
notifier far slower than events arrive) new events are dropped with a log line.

Rate limit: at most one notification per job and event kind per ``notify_interval``
(a crash-looping job sends one "failed", not a hundred).

The payload: ``{event, job, state, attempt, last_checkpoint, reason, run_dir, host, time}``.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Mapping
from typing import Any

from .knobs import Knobs
from .records import DONE, FAILED, HELD, JobSpec, JobState

log = logging.getLogger(__name__)

KINDS = ("failed", "held", "hung", "gave-up", "done")


def kind_of_state(state: str, reason: str) -> str | None:
    """The notification a new job state deserves, if any."""
    if state == FAILED:
        return "gave-up" if reason.startswith("gave up") else "failed"
    return {DONE: "done", HELD: "held"}.get(state)


def payload(st: JobState, kind: str, spec: JobSpec | None) -> dict[str, Any]:
    return {
        "event": kind,
        "job": st.name,
        "state": st.state,
        "attempt": st.started,
        "last_checkpoint": st.last_checkpoint,
        "reason": st.reason,
        "run_dir": spec.run_dir if spec else None,
        "host": socket.gethostname(),
        "time": time.time(),
    }


class Notifier:
    """Queues events for the job's and the daemon's notifiers; delivers them on its own thread."""

    def __init__(self, k: Knobs, specs: Mapping[str, JobSpec]) -> None:
        self.k, self.specs = k, specs
        self.queue: queue.Queue[tuple[list[tuple[str, str]], dict] | None] = queue.Queue(maxsize=256)
        self.last: dict[tuple[str, str], float] = {}
        self.running: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None

    def targets(self, spec: JobSpec | None) -> list[tuple[str, str]]:
        out = []
        for cmd in (self.k.notify, spec.notify if spec else None):
            if cmd:
                out.append(("cmd", cmd))
        for url in (self.k.webhook, spec.webhook if spec else None):
            if url:
                out.append(("webhook", url))
        return out

    def send(self, st: JobState, kind: str) -> None:
        """Queue one event (never blocks); rate-limited per job and kind."""
        spec = self.specs.get(st.name)
        targets = self.targets(spec)
        if not targets:
            return
        now = time.monotonic()
        key = (st.name, kind)
        if key in self.last and now - self.last[key] < self.k.notify_interval:
            log.info(
                "job %s: %s notification suppressed (rate limit %.0f s)",
                st.name,
                kind,
                self.k.notify_interval,
            )
            return
        self.last[key] = now
        self.start()
        try:
            self.queue.put_nowait((targets, payload(st, kind, spec)))
        except queue.Full:
            log.warning("job %s: %s notification dropped: the notifiers are not keeping up", st.name, kind)

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._loop, name="guardian-notify", daemon=True)
            self.thread.start()

    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            targets, event = item
            for how, where in targets:
                try:
                    (self.run_command if how == "cmd" else self.post)(where, event)
                except Exception as e:  # a notifier's trouble is logged, never the daemon's
                    log.warning("job %s: %s notifier %r failed: %s", event["job"], event["event"], where, e)

    def run_command(self, cmd: str, event: dict) -> None:
        data = json.dumps(event).encode() + b"\n"
        proc = subprocess.Popen(
            ["sh", "-c", cmd],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        self.running = proc
        try:
            proc.communicate(data, timeout=self.k.notify_timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise TimeoutError(f"still running after {self.k.notify_timeout:g} s; killed") from None
        finally:
            self.running = None
        if proc.returncode != 0:
            raise RuntimeError(f"exited {proc.returncode}")

    def post(self, url: str, event: dict) -> None:
        req = urllib.request.Request(
            url, data=json.dumps(event).encode(), headers={"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(req, timeout=self.k.notify_timeout) as resp:  # noqa: S310 (http(s) only: checked at run)
            resp.read(1024)

    def close(self, grace: float = 5.0) -> None:
        """At daemon exit: give queued notifications ``grace`` seconds, then kill what runs."""
        if self.thread is None:
            return
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            pass
        self.thread.join(timeout=grace)
        proc = self.running
        if self.thread.is_alive() and proc is not None:
            _kill_group(proc)
            self.thread.join(timeout=2.0)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        log.warning("notifier pid %d did not die after SIGKILL", proc.pid)
