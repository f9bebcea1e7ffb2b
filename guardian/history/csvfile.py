"""``history.csv``: the run's metric history as a plain CSV file, and its reader.

Layout: a header ``step,epoch,wall_time,tick,<metric>,<metric>…`` and one row per
``g.log()`` / ``g.report()`` call. Metric columns are in order of first appearance;
a row leaves the cells of metrics it does not carry empty, and rows written before
a column existed simply have fewer cells (CSV readers fill them with blanks).

Why the header is rewritten instead of a sidecar file naming the columns: the file
stays a CSV that pandas, a spreadsheet or ``csv.DictReader`` open as they are. A new
column is rare (in practice the first epoch adds them all), and the rewrite is atomic
(tmp file → fsync → rename → fsync of the directory), so a reader or a crash sees the
old header or the new one, never a mix.

Crash safety: rows are appended with one ``write`` each on an ``O_APPEND`` descriptor,
so a killed process leaves at most one torn last line; the reader ignores it and the
next resume cuts it off. ``tick`` is guardian's own column: it counts the loop's
resume points (see ``recorder.py``) and is what a resume cuts the file by.

Rows hold only numbers, written with ``repr`` (exact round trip; ``nan``, ``inf``,
``-inf`` included), so a row line never needs quoting; metric names may hold commas,
quotes, newlines or any unicode, which the header quotes per RFC 4180.
This module is torch-free: ``guardian history`` and ``guardian plot`` use it.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass, field

from ..smallfiles import fsync_dir, write_small_file_atomically

log = logging.getLogger(__name__)

HISTORY_FILE = "history.csv"
FIXED = ("step", "epoch", "wall_time", "tick")
_INTS = ("step", "epoch", "tick")


class NotAHistoryError(ValueError):
    """The file's header is not a guardian history header."""


@dataclass
class Row:
    step: int
    epoch: int
    wall_time: float
    tick: int
    values: dict[str, float]
    end: int = 0  # byte offset just past this row's line


@dataclass
class HistoryTable:
    """What ``read_history`` parsed. ``skipped``: one message per line it could not read."""

    columns: list[str]  # metric columns, in file order
    rows: list[Row] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    header_end: int = 0


def column_name(metric: str) -> str:
    """The column a metric is written to: a metric named like a fixed column
    (``step``…) gets a ``metric:`` prefix rather than clobbering it."""
    return f"metric:{metric}" if metric in FIXED else metric


def encode_header(columns: list[str]) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow([*FIXED, *columns])
    return out.getvalue().encode()


def encode_row(step: int, epoch: int, wall_time: float, tick: int, cells: list[float | None]) -> bytes:
    values = ",".join("" if v is None else repr(v) for v in cells)
    return f"{step},{epoch},{wall_time:.3f},{tick},{values}\n".encode()


# ---------------------------------------------------------------------------- reading


def read_history(path: str) -> HistoryTable:
    """Parse ``path``: every row that parses, and a message for each line that does
    not (hand edits, a torn last line). Raises ``NotAHistoryError`` if the header is
    not guardian's and ``FileNotFoundError`` if there is no file."""
    with open(path, "rb") as f:
        data = f.read()
    return parse_history(data, path)


def parse_history(data: bytes, what: str = HISTORY_FILE) -> HistoryTable:
    header_end = _record_end(data)
    if header_end is None:
        raise NotAHistoryError(f"{what}: no complete header line")
    try:
        header = next(csv.reader(io.StringIO(data[:header_end].decode())))
    except (UnicodeDecodeError, csv.Error, StopIteration) as e:
        raise NotAHistoryError(f"{what}: unreadable header ({e})") from e
    if tuple(header[: len(FIXED)]) != FIXED:
        raise NotAHistoryError(
            f"{what}: header does not start with {','.join(FIXED)}; not a guardian history"
        )
    table = HistoryTable(columns=header[len(FIXED) :], header_end=header_end)
    line_no = data[:header_end].count(b"\n")
    pos = header_end
    while pos < len(data):
        nl = data.find(b"\n", pos)
        line_no += 1
        if nl < 0:
            table.skipped.append(f"{what} line {line_no}: incomplete last line (a write cut short); ignored")
            break
        row, problem = _parse_row(data[pos:nl], table.columns)
        if row is None:
            table.skipped.append(f"{what} line {line_no}: {problem}; skipped")
        else:
            row.end = nl + 1
            table.rows.append(row)
        pos = nl + 1
    return table


def _record_end(data: bytes) -> int | None:
    """Offset just past the first CSV record (quoted newlines do not end it)."""
    quoted = False
    for i, byte in enumerate(data):
        if byte == 0x22:  # '"'; an escaped "" toggles twice
            quoted = not quoted
        elif byte == 0x0A and not quoted:
            return i + 1
    return None


def _parse_row(line: bytes, columns: list[str]) -> tuple[Row | None, str]:
    if not line.strip():
        return None, "empty line"
    try:
        cells = line.decode("ascii").rstrip("\r").split(",")
    except UnicodeDecodeError:
        return None, "not a row of numbers"
    if len(cells) < len(FIXED):
        return None, f"{len(cells)} cells, expected at least {len(FIXED)}"
    if len(cells) > len(FIXED) + len(columns):
        return None, f"{len(cells)} cells but the header names {len(FIXED) + len(columns)} columns"
    try:
        fixed = [int(c) if name in _INTS else float(c) for name, c in zip(FIXED, cells)]
        values = {name: float(c) for name, c in zip(columns, cells[len(FIXED) :]) if c != ""}
    except ValueError as e:
        return None, f"not a number ({e})"
    step, epoch, wall, tick = fixed
    return Row(int(step), int(epoch), float(wall), int(tick), values), ""


# ---------------------------------------------------------------------------- writing


class HistoryFile:
    """The ``history.csv`` of a run (rank 0 only). Each ``append`` is one ``write`` of an
    O_APPEND descriptor opened for it and closed after: no writable descriptor stays
    open between rows, so the file system is never held "busy" (a read-only remount,
    a clean unmount) by the history. ``sync`` makes everything appended durable."""

    def __init__(self, path: str, columns: list[str]) -> None:
        self.path = path
        self.columns = list(columns)
        self._index = {c: i for i, c in enumerate(self.columns)}
        if not os.path.exists(path):
            write_small_file_atomically(path, encode_header(self.columns))

    def append(self, step: int, epoch: int, tick: int, values: dict[str, float], wall_time: float) -> None:
        new = [c for c in values if c not in self._index]
        if new:
            self._add_columns(new)
        cells: list[float | None] = [None] * len(self.columns)
        for name, value in values.items():
            cells[self._index[name]] = value
        data = encode_row(step, epoch, wall_time, tick, cells)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    def _add_columns(self, new: list[str]) -> None:
        """Rewrite the header atomically with ``new`` appended (see the module docstring)."""
        with open(self.path, "rb") as f:
            data = f.read()
        header_end = _record_end(data) or len(data)
        columns = self.columns + new
        write_small_file_atomically(self.path, encode_header(columns) + data[header_end:])
        self.columns = columns
        self._index = {c: i for i, c in enumerate(columns)}

    def sync(self) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Nothing stays open between rows; kept for the callers' symmetry."""


def cut_history(path: str, table: HistoryTable, keep: int) -> list[str]:
    """Keep the header and the first ``keep`` parsed rows (and any unreadable lines
    among them); drop everything after, torn last line included. Metric columns that
    no kept row uses are dropped from the header: they appeared in the cut tail, and
    the resumed run adds them again when it logs them. Returns the kept columns."""
    kept = table.rows[:keep]
    used = {name for row in kept for name in row.values}
    columns = list(table.columns)
    while columns and columns[-1] not in used:
        columns.pop()
    end = kept[-1].end if kept else table.header_end
    if columns != table.columns:
        with open(path, "rb") as f:
            data = f.read(end)
        write_small_file_atomically(path, encode_header(columns) + data[table.header_end : end])
        return columns
    if os.path.getsize(path) != end:
        os.truncate(path, end)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(os.path.dirname(path) or ".")
    return columns
