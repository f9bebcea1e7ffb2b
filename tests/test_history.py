"""history.csv on its own: hostile names and values, columns that appear mid-run, torn
and hand-edited files, the cut on resume, and a history that cannot be written."""

from __future__ import annotations

import csv
import logging
import math
import os

import pytest
import torch

import guardian
from guardian.history import History, read_history
from guardian.history.csvfile import HistoryFile, cut_history

HOSTILE = ["a,b", 'say "hi"', "ünï — 日本", "two\nlines", "step"]


def write_rows(path: str, rows: list[tuple[int, dict[str, float]]]) -> None:
    f = HistoryFile(path, [])
    for i, (step, values) in enumerate(rows):
        f.append(step, 0, i, values, 1000.0 + i)
    f.close()


def test_hostile_names_and_non_finite_values_round_trip(tmp_path):
    path = str(tmp_path / "history.csv")
    values = [1.5, math.nan, math.inf, -math.inf, 0.1]
    write_rows(path, [(1, dict(zip(HOSTILE, values)))])
    table = read_history(path)
    assert table.columns == HOSTILE and not table.skipped
    got = table.rows[0].values
    assert got["a,b"] == 1.5 and math.isnan(got['say "hi"']) and got["two\nlines"] == -math.inf
    assert got["ünï — 日本"] == math.inf and got["step"] == 0.1
    with open(path, newline="", encoding="utf-8") as f:  # any CSV reader opens it as it is
        header = next(csv.reader(f))
    assert header[4:] == HOSTILE


def test_a_metric_appearing_mid_run_adds_a_column_and_keeps_old_rows(tmp_path):
    path = str(tmp_path / "history.csv")
    write_rows(path, [(1, {"loss": 2.0}), (2, {"loss": 1.0}), (3, {"acc": 0.5, "loss": 0.5})])
    table = read_history(path)
    assert table.columns == ["loss", "acc"]
    assert [r.values for r in table.rows] == [{"loss": 2.0}, {"loss": 1.0}, {"loss": 0.5, "acc": 0.5}]
    with open(path, newline="") as f:
        dict_rows = list(csv.DictReader(f))
    assert dict_rows[0]["acc"] is None and dict_rows[2]["acc"] == "0.5"


def test_torn_last_line_and_hand_edits_are_skipped_and_named(tmp_path):
    path = str(tmp_path / "history.csv")
    write_rows(path, [(s, {"loss": float(s)}) for s in range(1, 6)])
    with open(path) as f:
        lines = f.read().splitlines(keepends=True)
    lines[2] = "2,0,oops,1,2.0\n"  # line 3: a hand edit
    lines.insert(4, "just some note\n")  # line 5
    with open(path, "w") as f:
        f.write("".join(lines) + "6,0,1.0,5,6")  # torn: no newline
    table = read_history(path)
    assert [r.step for r in table.rows] == [1, 3, 4, 5]
    assert len(table.skipped) == 3
    assert "line 3: not a number" in table.skipped[0]
    assert "line 5:" in table.skipped[1]
    assert "line 8: incomplete last line" in table.skipped[2]


def test_cut_drops_the_tail_and_the_columns_only_it_used(tmp_path):
    path = str(tmp_path / "history.csv")
    write_rows(path, [(1, {"loss": 1.0}), (2, {"loss": 2.0}), (3, {"val": 3.0})])
    with open(path, "ab") as f:
        f.write(b"4,0,1.0,3,4.0")  # torn
    columns = cut_history(path, read_history(path), keep=2)
    assert columns == ["loss"]
    assert open(path).read().splitlines()[0] == "step,epoch,wall_time,tick,loss"
    table = read_history(path)
    assert [r.step for r in table.rows] == [1, 2] and not table.skipped


def _state(tick: int, in_tick: int, rows: int, resume: str) -> dict:
    return {
        "global_step": 0,
        "history": {"tick": tick, "rows_at_tick": in_tick, "rows": rows, "resume": resume},
    }


@pytest.mark.parametrize(
    ("resume", "kept"),
    [("next_batch", 4), ("next_epoch", 4), ("here", 3)],  # rows of ticks 0, 1, 1 | 1, 2
)
def test_resume_keeps_rows_up_to_the_checkpoints_point(tmp_path, resume, kept):
    run = str(tmp_path)
    path = os.path.join(run, "history.csv")
    f = HistoryFile(path, [])
    for i, tick in enumerate([0, 1, 1, 1, 2]):
        f.append(i, 0, tick, {"x": float(i)}, 1.0)
    f.close()
    h = History(run)
    h.start(leader=True, progress=_state(1, 2, 3, resume), checkpoint=os.path.join(run, "step-000000002"))
    h.close()
    assert [r.values["x"] for r in read_history(path).rows] == [float(i) for i in range(kept)]


def test_log_accepts_tensors_and_keeps_no_graph(tmp_path):
    w = torch.ones(2, requires_grad=True)
    with guardian.protect(model=torch.nn.Linear(1, 1), dir=str(tmp_path), every_epochs=None) as g:
        loss = (w * 3).sum()
        g.log(loss=loss, lr=0.1)
        with pytest.raises(guardian.MetricError, match="'v' is a tensor with 2 elements"):
            g.log(v=torch.ones(2))
    row = read_history(str(tmp_path / "history.csv")).rows[0]
    assert row.values == {"loss": 6.0, "lr": 0.1}


def test_unwritable_history_warns_once_and_training_goes_on(tmp_path, caplog):
    os.mkdir(tmp_path / "history.csv")  # a directory where the file should be: every write fails
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING, logger="guardian"):
        with guardian.protect(model=model, optimizer=opt, dir=str(tmp_path), every_steps=2) as g:
            for _ in range(5):
                model(torch.ones(1, 1)).sum().backward()
                opt.step()
                g.step()
                g.log(loss=1.0)
    assert g.global_step == 5
    warnings = [r for r in caplog.records if "metric history" in r.getMessage()]
    assert len(warnings) == 1
    assert "training goes on" in warnings[0].getMessage()
