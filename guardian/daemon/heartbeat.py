"""Hang detection from the library's heartbeat file.

The library rewrites RUN/heartbeat.json atomically (about once a second while
training). A job is *hung* when its heartbeat is older than a timeout that depends
on what it said it was doing:

    no heartbeat yet (or a stale one from an earlier attempt) → ``startup`` allowance
    phase init / load / save / eval                            → ``save_timeout``
    phase train                                                → max(hang_min, hang_factor × p99 step interval)
    phase done                                                 → never

The p99 step interval is the larger of what the library reports and what the daemon
observed (time between heartbeats ÷ steps advanced). GPU utilisation is never used:
a job stuck in an NCCL collective can show 100 %.

``watchdog`` delivers file events so the loop wakes at once; the loop also polls
(``stat`` every ``poll`` seconds) because inotify sees nothing on NFS/Lustre/GPFS.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

from ..runfiles import read_heartbeat
from .knobs import Knobs

MAX_SAMPLES = 512


@dataclass
class Beat:
    step: int
    phase: str
    time: float
    p99: float | None


@dataclass
class HangClock:
    """Per-attempt view of the heartbeat: last beat seen and learned step intervals."""

    started: float
    pid: int | None
    last: Beat | None = None
    intervals: list[float] = field(default_factory=list)

    def observe(self, hb: dict | None) -> Beat | None:
        """Take a heartbeat read from disk; ignore one written by another process."""
        if not hb or (self.pid is not None and hb.get("pid") != self.pid):
            return self.last
        if not isinstance(hb.get("time"), (int, float)) or hb["time"] < self.started:
            # Left by an earlier attempt. No slack: while the child's pid is not known yet,
            # the start time is all that tells a killed attempt's last beat from ours.
            return self.last
        try:
            beat = Beat(
                int(hb.get("step", 0)),
                str(hb.get("phase", "train")),
                float(hb["time"]),
                float(hb["step_interval_p99"]) if hb.get("step_interval_p99") else None,
            )
        except (KeyError, TypeError, ValueError):
            return self.last
        self._learn(beat)
        self.last = beat
        return beat

    def _learn(self, beat: Beat) -> None:
        prev = self.last
        if prev and prev.phase == beat.phase == "train" and beat.step > prev.step and beat.time > prev.time:
            self.intervals.append((beat.time - prev.time) / (beat.step - prev.step))
            del self.intervals[:-MAX_SAMPLES]

    def p99(self) -> float | None:
        observed = sorted(self.intervals)[int(0.99 * (len(self.intervals) - 1))] if self.intervals else None
        reported = self.last.p99 if self.last else None
        known = [v for v in (observed, reported) if v is not None]
        return max(known) if known else None

    def timeout(self, k: Knobs) -> float | None:
        """Seconds of silence allowed now; None means never late (phase done)."""
        if self.last is None:
            return k.startup
        if self.last.phase == "done":
            return None
        if self.last.phase != "train":
            return k.save_timeout
        p99 = self.p99()
        return max(k.hang_min, k.hang_factor * p99) if p99 else max(k.hang_min, 0.0)

    def silence(self, now: float) -> float:
        return now - (self.last.time if self.last else self.started)

    def verdict(self, k: Knobs, now: float | None = None) -> str | None:
        """A human reason if the job is hung, else None."""
        now = time.time() if now is None else now
        limit = self.timeout(k)
        quiet = self.silence(now)
        if limit is None or quiet <= limit:
            return None
        where = (
            f"step {self.last.step}, phase {self.last.phase}" if self.last else "before its first heartbeat"
        )
        return f"no heartbeat for {quiet:.1f} s (limit {limit:.1f} s; {where})"


def poll(clock: HangClock, run_dir: str) -> Beat | None:
    return clock.observe(read_heartbeat(run_dir))


class Waker:
    """Wakes the supervisor loop on file events (watchdog), if watchdog works here.

    Failure to start an observer (no inotify, too many watches) is not an error:
    the loop polls anyway.
    """

    def __init__(self) -> None:
        self.event = threading.Event()
        self._observer = None
        self._watched: dict[str, object] = {}

    def start(self) -> None:
        try:
            from watchdog.observers import Observer
        except ImportError:
            return
        self._observer = Observer()
        self._observer.daemon = True
        self._observer.start()

    def watch(self, path: str) -> None:
        if self._observer is None or path in self._watched or not os.path.isdir(path):
            return
        from watchdog.events import FileSystemEventHandler

        waker = self

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event: object) -> None:
                waker.event.set()

        try:
            self._watched[path] = self._observer.schedule(_Handler(), path, recursive=False)
        except OSError:
            self._watched[path] = None  # polling covers it

    def unwatch(self, path: str) -> None:
        handle = self._watched.pop(path, None)
        if handle is not None and self._observer is not None:
            try:
                self._observer.unschedule(handle)
            except (KeyError, ValueError):
                pass

    def wait(self, timeout: float) -> None:
        self.event.wait(timeout)
        self.event.clear()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
