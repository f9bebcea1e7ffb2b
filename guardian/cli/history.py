"""``guardian history`` and ``guardian plot``: a run's metric history from a terminal.

Torch-free: both read ``RUN/history.csv`` and ``RUN/history-events.jsonl`` (checkpoints
and restarts) with ``guardian.history``; ``plot`` also needs matplotlib
(``pip install 'torch-guardian[plot]'``).
"""

from __future__ import annotations

import csv
import difflib
import json
import math
import os
import sys
from typing import Any

import click

from ..errors import EXIT_FAILURE, EXIT_NOT_FOUND, EXIT_USAGE
from ..history import EVENTS_FILE, HISTORY_FILE, HistoryTable, NotAHistoryError, read_history
from ..history.csvfile import FIXED


def _fail(message: str, code: int) -> None:
    click.echo(f"guardian: {message}", err=True)
    sys.exit(code)


def load(run_dir: str) -> HistoryTable:
    """The run's history; each line that could not be read is named on stderr."""
    path = os.path.join(run_dir, HISTORY_FILE)
    try:
        table = read_history(path)
    except FileNotFoundError:
        _fail(
            f"no {HISTORY_FILE} in {run_dir} (not a run directory, or a run from before guardian kept histories)",
            EXIT_NOT_FOUND,
        )
    except NotAHistoryError as e:
        _fail(str(e), EXIT_FAILURE)
    for message in table.skipped:
        click.echo(f"guardian: {message}", err=True)
    return table


def choose_metrics(table: HistoryTable, wanted: tuple[str, ...]) -> list[str]:
    """The metric columns asked for, in the order asked. Each option value is a column
    name, or a comma-separated list of them (a name that itself holds a comma is
    matched whole first)."""
    if not wanted:
        return list(table.columns)
    names: list[str] = []
    for value in wanted:
        names.extend([value] if value in table.columns else value.split(","))
    for name in names:
        if name not in table.columns:
            close = difflib.get_close_matches(name, table.columns, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            _fail(f"no metric {name!r} in the history (it has: {', '.join(table.columns)}){hint}", EXIT_USAGE)
    return names


def read_events(run_dir: str) -> list[dict[str, Any]]:
    """Checkpoint and restart events, oldest first; unreadable lines are ignored."""
    events = []
    try:
        with open(os.path.join(run_dir, EVENTS_FILE), encoding="utf-8") as f:
            for line in f:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict) and isinstance(event.get("step"), int):
                    events.append(event)
    except FileNotFoundError:
        return []
    return events


def _json_value(v: float | None) -> float | str | None:
    if v is None or math.isfinite(v):
        return v
    return str(v)  # "nan", "inf", "-inf": JSON has no such numbers


@click.command(name="history")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Rows as JSON (non-finite values as strings).")
@click.option("--csv", "as_csv", is_flag=True, help="Rows as CSV (the file's own columns).")
@click.option("--metrics", "wanted", multiple=True, help="Metrics to show: a,b (or repeat the option).")
def history(run_dir: str, as_json: bool, as_csv: bool, wanted: tuple[str, ...]) -> None:
    """Show the metric history of a run: one row per g.log()/g.report() call.

    After a crash and resume it reads as if the run had never died: the rows the
    killed attempt logged after its last checkpoint were cut when training resumed.
    """
    if as_json and as_csv:
        _fail("--json and --csv exclude each other", EXIT_USAGE)
    table = load(run_dir)
    metrics = choose_metrics(table, wanted)
    rows = [r for r in table.rows if not wanted or any(m in r.values for m in metrics)]
    if as_json:
        out = {
            "run": os.path.abspath(run_dir),
            "metrics": metrics,
            "rows": [
                {
                    "step": r.step,
                    "epoch": r.epoch,
                    "wall_time": r.wall_time,
                    "tick": r.tick,
                    "values": {m: _json_value(r.values.get(m)) for m in metrics if m in r.values},
                }
                for r in rows
            ],
            "skipped": table.skipped,
        }
        click.echo(json.dumps(out, indent=1, ensure_ascii=False))
        return
    if as_csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow([*FIXED, *metrics])
        for r in rows:
            cells = ["" if m not in r.values else repr(r.values[m]) for m in metrics]
            writer.writerow([r.step, r.epoch, f"{r.wall_time:.3f}", r.tick, *cells])
        return
    _print_table(rows, metrics)


def _print_table(rows: list[Any], metrics: list[str]) -> None:
    headers = ["STEP", "EPOCH", *metrics]
    table = [
        [str(r.step), str(r.epoch), *("" if m not in r.values else f"{r.values[m]:.6g}" for m in metrics)]
        for r in rows
    ]
    widths = [
        max(len(h), *(len(row[i]) for row in table)) if table else len(h) for i, h in enumerate(headers)
    ]
    click.echo("  ".join(h.rjust(w) for h, w in zip(headers, widths)).rstrip())
    for row in table:
        click.echo("  ".join(c.rjust(w) for c, w in zip(row, widths)).rstrip())
    if not table:
        click.echo("(no rows yet)")


@click.command(name="plot")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("-m", "--metric", "wanted", multiple=True, help="A metric to plot (repeat; default: all).")
@click.option("-o", "--output", default="curves.png", show_default=True, type=click.Path(dir_okay=False))
def plot(run_dir: str, wanted: tuple[str, ...], output: str) -> None:
    """Plot a run's metrics against the step, one panel per metric, marking its
    checkpoints, the best one and each restart."""
    table = load(run_dir)
    metrics = choose_metrics(table, wanted)
    if not metrics:
        _fail(f"the history of {run_dir} has no metrics yet", EXIT_NOT_FOUND)
    try:
        from ..history.plotting import draw
    except ImportError as e:
        _fail(f"guardian plot needs matplotlib ({e}); pip install 'torch-guardian[plot]'", EXIT_FAILURE)
    draw(
        table, metrics, read_events(run_dir), title=os.path.basename(os.path.abspath(run_dir)), output=output
    )
    click.echo(f"wrote {output}")
