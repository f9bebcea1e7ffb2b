"""The run's voice to its supervisor: ``heartbeat.json`` and ``run.json``.

Rank 0 speaks for the run. The heartbeat is throttled (``GUARDIAN_HEARTBEAT_INTERVAL``)
and carries the p99 step interval, which a supervisor uses to scale its hang limit to
the job's own pace. Neither file is training state: a failure to write one is logged,
never allowed to stop training or mask the exception that is already on its way out.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from . import knobs, runfiles

log = logging.getLogger(__name__)


class RunVoice:
    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.is_leader = True
        self.world_size = 1
        self._last_beat = 0.0
        self._interval = knobs.heartbeat_interval()  # read once: beat() runs every step
        self._last_step_time = time.monotonic()
        self._intervals: deque[float] = deque(maxlen=512)
        self.totals: dict[str, int] = {}  # the loop's length when known (epochs_total)

    def step_taken(self, now: float) -> None:
        self._intervals.append(now - self._last_step_time)
        self._last_step_time = now

    def beat(self, step: int, epoch: int, phase: str, *, force: bool = False) -> None:
        """Write the heartbeat if the interval has passed (or ``force``)."""
        now = time.monotonic()
        if not self.is_leader or (not force and now - self._last_beat < self._interval):
            return
        self._last_beat = now
        try:
            runfiles.write_heartbeat(self.run_dir, step, epoch, phase, self._p99(), **self.totals)
        except OSError as e:  # liveness only; never worth stopping training for
            log.warning("could not write heartbeat: %s", e)

    def _p99(self) -> float | None:
        if len(self._intervals) < 8:
            return None
        ordered = sorted(self._intervals)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]

    def status(self, state: str, **fields: Any) -> None:
        """``run.json``: what the run is doing, for ``guardian status`` and the daemon."""
        if self.is_leader:
            runfiles.write_status(self.run_dir, state, world_size=self.world_size, **fields)

    def status_best_effort(self, state: str, **fields: Any) -> None:
        """On the way out after a failure, a status file that cannot be written (the
        disk that failed, a removed directory) must not mask the original exception."""
        try:
            self.status(state, **fields)
        except OSError as e:
            log.error("could not record run state %r in %s: %s", state, self.run_dir, e)
