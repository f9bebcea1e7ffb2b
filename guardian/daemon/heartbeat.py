"""Hang detection from the library's heartbeat file.

The library rewrites RUN/heartbeat.json atomically (about once a second while
training). A job is *hung* when the daemon has seen no new heartbeat for longer than
a timeout that depends on what the job said it was doing:

    no heartbeat yet (or a stale one from an earlier attempt) → ``startup`` allowance
    phase init / load / save / eval                            → ``save_timeout``
    phase train                                                → max(hang_min, hang_factor × p99 step interval)
    phase done                                                 → never

Silence is counted on the daemon's own monotonic clock, from the pass that last saw
the heartbeat change — not from the time written in the file, which the library
throttles and which a wall-clock step would distort. And only time the daemon could
observe counts: when its own loop was starved (a pass came much later than ``poll``
asked, as on a machine whose cores are all busy), the silence restarts at the pass
that resumed, giving the job a full timeout to be seen beating again.

The p99 step interval is the larger of what the library reports and what the daemon
observed (time between heartbeats ÷ steps advanced). GPU utilisation is never used:
a job stuck in an NCCL collective can show 100 %. Whether a silent job is hung at
all — its processes must still be alive — is the supervisor's call, not this clock's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

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

    started: float  # wall time the attempt started: older beats are an earlier attempt's
    pid: int | None
    last: Beat | None = None
    intervals: list[float] = field(default_factory=list)
    quiet_since: float = field(default_factory=time.monotonic)  # when the daemon last saw a new beat
    last_look: float | None = None  # monotonic time of the previous look

    def look(self, hb: dict | None, k: Knobs, now: float | None = None) -> Beat | None:
        """One loop pass's look at the heartbeat file (``hb``: its content, or None)."""
        now = time.monotonic() if now is None else now
        if self.last_look is not None and now - self.last_look > starved_after(k):
            self.quiet_since = now  # the daemon could not watch: that silence is not the job's
        self.last_look = now
        before = self.last
        beat = self.observe(hb)
        if beat is not None and beat != before:
            self.quiet_since = now
        return beat

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

    def verdict(self, k: Knobs, now: float | None = None) -> str | None:
        """A human reason if the job has been silent too long, else None."""
        now = time.monotonic() if now is None else now
        limit = self.timeout(k)
        quiet = now - self.quiet_since
        if limit is None or quiet <= limit:
            return None
        where = (
            f"step {self.last.step}, phase {self.last.phase}" if self.last else "before its first heartbeat"
        )
        return f"no new heartbeat seen for {quiet:.1f} s (limit {limit:.1f} s; {where})"


def starved_after(k: Knobs) -> float:
    """A gap between two passes longer than this means the daemon's loop was starved."""
    return max(2.0, 5 * k.poll)
