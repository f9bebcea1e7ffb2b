"""The run's metric history, kept as if the run had never died.

The guard owns one ``History`` and delegates to it: every ``g.log()`` and
``g.report()`` call becomes a row of ``history.csv`` (rank 0 writes it; see
``csvfile.py``), optionally an event for TensorBoard, and each commit makes the file
durable and appends a line to ``history-events.jsonl`` (checkpoints and restarts, for
``guardian plot``).

**Where a resume cuts the file.** A checkpoint resumes at a *point of the user's
program* (the loop rules in ``guard.py``); rows logged before that point are kept,
rows logged after it are cut, because the resumed run logs them again. To know which
is which, every row carries ``tick``: a counter of the loop's resume points — each
batch the guarded loader hands out (and its end), and each start of an epoch body.
It depends only on the program's structure, never on when saves happened, so it is
equal in an uninterrupted run and in a resumed one. A checkpoint records the tick
and how the run resumes from it:

* ``next_batch`` — taken at ``g.step()`` inside ``g.batches()`` (or right after it):
  the resumed run goes on with the next batch, so everything logged up to it, in
  this same tick, stays (also rows logged *after* ``g.step()`` in that batch's body:
  the resumed run does not run them again);
* ``next_epoch`` — taken at the epoch boundary (or after the loop): the resumed run
  starts with the next epoch's body; every row of the tick stays;
* ``here`` — a loop that uses neither ``g.epochs()`` nor ``g.batches()``: the
  resumed run's position is the user's business; rows logged after the save are cut.

A resumed run re-runs the code between the top of its script and that point (the
epoch body before the batch loop, on a mid-epoch resume). Rows it logs there were
already recorded by the first run, so until the program passes the checkpoint's
point again they are not recorded a second time.

A history that cannot be written (read-only or full disk) never stops training: one
warning, and this process goes on without it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

from .csvfile import (
    FIXED,
    HISTORY_FILE,
    HistoryFile,
    HistoryTable,
    NotAHistoryError,
    column_name,
    cut_history,
)
from .csvfile import read_history as _read_table
from .tensorboard import TensorBoardLog

log = logging.getLogger(__name__)

EVENTS_FILE = "history-events.jsonl"
STATE_KEY = "history"  # where the history's counters live in the checkpoint's progress


class History:
    """See the module docstring. Methods are called by the guard, in loop order."""

    def __init__(self, run_dir: str, *, tensorboard: bool = False) -> None:
        self.run_dir = run_dir
        self.want_tensorboard = tensorboard
        self.tick = 0
        self.rows_at_tick = 0  # rows logged since the tick last advanced
        self.rows = 0
        self._waiting: str | None = None  # a resumed run re-running code: "next_batch" / "next_epoch"
        self._in_loop = False  # g.epochs() or g.batches() is in use
        self._file: HistoryFile | None = None
        self._events_path: str | None = None  # appended by open-write-close: no fd stays open
        self._tb: TensorBoardLog | None = None

    # ------------------------------------------------------------------ start

    def start(self, *, leader: bool, progress: dict[str, Any] | None, checkpoint: str | None) -> None:
        """After the guard resumed (``progress``: the restored checkpoint's progress
        component, None for a fresh start). Rank 0 cuts the file to the checkpoint."""
        state = (progress or {}).get(STATE_KEY) if checkpoint else None
        if state:
            self.tick, self.rows_at_tick, self.rows = state["tick"], state["rows_at_tick"], state["rows"]
            resume = state["resume"]
            self._waiting = resume if resume in ("next_batch", "next_epoch") else None
            self._in_loop = self._waiting is not None
        if not leader:
            return
        step = int((progress or {}).get("global_step", 0)) if checkpoint else 0
        try:
            kept = self._open_file(state, checkpoint)
            self._events_path = os.path.join(self.run_dir, EVENTS_FILE)
            os.close(
                os.open(self._events_path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            )
            if checkpoint:
                self._event("restart", step=step, checkpoint=os.path.basename(checkpoint.rstrip("/")))
        except OSError as e:
            self._give_up(e)
            return
        if self.want_tensorboard:
            self._open_tensorboard(step, kept)

    def _open_file(self, state: dict[str, Any] | None, checkpoint: str | None) -> list[Any]:
        path = os.path.join(self.run_dir, HISTORY_FILE)
        table = self._existing(path)
        if table is None:
            if state and state["rows"]:
                log.warning(
                    "%s is missing; the %d row(s) logged before %s are lost. New rows are appended to a new file.",
                    path,
                    state["rows"],
                    checkpoint,
                )
            self._file = HistoryFile(path, [])
            return []
        keep = self._keep_count(table, state)
        if state and keep < state["rows"]:
            log.warning(
                "%s holds %d row(s) from before %s, which was taken after row %d: the missing rows were "
                "edited out, or lost to a power cut before they were made durable",
                path,
                keep,
                checkpoint,
                state["rows"],
            )
        if len(table.rows) > keep:
            log.info(
                "history: cut %d row(s) logged after %s", len(table.rows) - keep, checkpoint or "the start"
            )
        columns = cut_history(path, table, keep)
        self.rows = keep if state else 0
        self._file = HistoryFile(path, columns)
        return table.rows[:keep]

    def _existing(self, path: str) -> HistoryTable | None:
        try:
            table = _read_table(path)
        except FileNotFoundError:
            return None
        except NotAHistoryError as e:
            aside = f"{path}.unreadable-{int(time.time())}"
            log.warning("%s; moved it to %s and starting a new history", e, aside)
            os.replace(path, aside)
            return None
        for message in table.skipped:
            log.warning("%s", message)
        return table

    @staticmethod
    def _keep_count(table: HistoryTable, state: dict[str, Any] | None) -> int:
        """How many leading rows were logged before the checkpoint's resume point."""
        if not state:
            return 0
        tick, in_tick, whole = state["tick"], state["rows_at_tick"], state["resume"] != "here"
        kept = seen = 0
        for row in table.rows:
            if row.tick == tick and (whole or seen < in_tick):
                seen += 1
            elif row.tick >= tick:
                break
            kept += 1
        return kept

    def _open_tensorboard(self, step: int, kept: list[Any]) -> None:
        tb = TensorBoardLog(self.run_dir)
        try:
            tb.open(purge_step=step)
        except ImportError:
            log.warning(
                "protect(tensorboard=True) but the tensorboard package is not installed "
                "(pip install 'torch-guardian[tensorboard]'); training goes on without event files"
            )
            return
        except OSError as e:
            log.warning(
                "cannot write TensorBoard event files in %s (%s); going on without them", tb.logdir, e
            )
            return
        for row in kept:  # the purge removed the kept rows at the resumed step too: write them again
            if row.step >= step:
                tb.add(row.step, row.wall_time, {_metric_name(c): v for c, v in row.values.items()})
        self._tb = tb

    # ------------------------------------------------------------------ the loop

    def epoch_started(self) -> None:
        self._in_loop = True
        self._advance(batch=False)

    def batches(self, batches: Iterable[Any]) -> Iterator[Any]:
        """Wrap the guarded loader's iterator: each batch handed out (and its end) is
        a resume point."""
        self._in_loop = True
        for batch in batches:
            self._advance(batch=True)
            yield batch
        self._advance(batch=True)

    def _advance(self, *, batch: bool) -> None:
        if self._waiting is not None:
            if self._waiting == "next_batch" and not batch:
                return  # the resumed epoch's body starts again; its first batch is the point
            self._waiting = None
        self.tick += 1
        self.rows_at_tick = 0

    def record(self, step: int, epoch: int, values: dict[str, float]) -> None:
        """One row (``values``: floats already). Dropped while a resumed run re-runs
        code the first run already recorded (module docstring)."""
        if self._waiting is not None or not values:
            return
        self.rows += 1
        self.rows_at_tick += 1
        if self._file is None:
            return
        now = time.time()
        try:
            self._file.append(step, epoch, self.tick, {column_name(k): v for k, v in values.items()}, now)
        except OSError as e:
            self._give_up(e)
        if self._tb is not None:
            self._tb.add(step, now, values)

    # ------------------------------------------------------------------ checkpoints

    def state(self, *, mid_epoch: bool) -> dict[str, Any]:
        """The counters a checkpoint taken now must carry (in its progress component).
        TensorBoard is flushed here, so every row before the save is in its files."""
        if self._tb is not None:
            self._tb.flush()
        resume = "next_batch" if mid_epoch else ("next_epoch" if self._in_loop else "here")
        return {
            STATE_KEY: {
                "tick": self.tick,
                "rows_at_tick": self.rows_at_tick,
                "rows": self.rows,
                "resume": resume,
            }
        }

    def committed(self, path: str, manifest: Any) -> None:
        """A checkpoint was committed: make the rows so far durable with it."""
        if self._file is None:
            return
        try:
            self._file.sync()
            self._event(
                "checkpoint",
                step=manifest.step,
                epoch=manifest.epoch,
                checkpoint=manifest.name,
                reasons=list(manifest.reason),
                monitor=(manifest.extra or {}).get("monitor"),
                metrics=dict(manifest.metrics),
            )
            if self._events_path is not None:
                fd = os.open(self._events_path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as e:
            self._give_up(e)

    def _event(self, kind: str, **fields: Any) -> None:
        if self._events_path is None:
            return
        line = json.dumps({"event": kind, "time": round(time.time(), 3), **fields}) + "\n"
        fd = os.open(self._events_path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ the end

    def _give_up(self, error: OSError) -> None:
        log.warning(
            "cannot write the metric history in %s (%s); training goes on without it in this process. "
            "Make the directory writable (or free space): the next restart writes it again.",
            self.run_dir,
            error.strerror or error,
        )
        self._close_files()

    def _close_files(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._events_path = None

    def close(self) -> None:
        self._close_files()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _metric_name(column: str) -> str:
    prefix = "metric:"
    if column.startswith(prefix) and column[len(prefix) :] in FIXED:
        return column[len(prefix) :]
    return column
