"""The history as TensorBoard event files (optional: ``pip install 'torch-guardian[tensorboard]'``).

Written with the ``tensorboard`` package's own event-file writer (the package the
user needs anyway to look at the curves; no TensorFlow). Each history row becomes one
event holding its scalars, tagged by metric name, at the row's step.

Restarts: TensorBoard's reader discards every event at a step ``>= S`` once it meets
a ``SessionLog.START`` event at step ``S`` (the mechanism behind ``SummaryWriter``'s
``purge_step``). A resumed run opens a new event file that starts with that event at
the resumed checkpoint's step, then re-emits the history rows it keeps from that
step on (rows logged at step S before the kill, which the purge also removed), so
every step appears exactly once with the values of an uninterrupted run.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"


class TensorBoardLog:
    """Event files under ``RUN/tensorboard``. ``open`` raises ImportError when the
    package is missing (the caller warns and goes on without it)."""

    def __init__(self, run_dir: str) -> None:
        self.logdir = os.path.join(run_dir, TENSORBOARD_DIR)
        self._writer: Any = None

    def open(self, purge_step: int | None) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event, self._summary = event_pb2, summary_pb2
        had_files = os.path.isdir(self.logdir) and any(
            n.startswith("events.out.tfevents") for n in os.listdir(self.logdir)
        )
        os.makedirs(self.logdir, exist_ok=True)
        # flush_secs: guardian flushes at every checkpoint; the writer's own timer is a backstop
        self._writer = EventFileWriter(self.logdir, max_queue_size=1000, flush_secs=30)
        if had_files and purge_step is not None:
            start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self._writer.add_event(event_pb2.Event(step=purge_step, session_log=start))

    def add(self, step: int, wall_time: float, values: dict[str, float]) -> None:
        value = self._summary.Summary.Value
        summary = self._summary.Summary(value=[value(tag=k, simple_value=v) for k, v in values.items()])
        self._writer.add_event(self._event.Event(wall_time=wall_time, step=step, summary=summary))

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
