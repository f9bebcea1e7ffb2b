"""Pure policy decisions: schedules, best, early stopping, retention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guardian.errors import MetricError
from guardian.policies import (
    BestMetric,
    EarlyStopping,
    PolicyState,
    Retention,
    SaveSchedule,
    early_stopping_update,
    to_float,
)


def test_schedule_combines_triggers():
    s = SaveSchedule(every_steps=10, every_seconds=60, every_epochs=2)
    assert not s.steps_due(9) and s.steps_due(10) and s.steps_due(20) and not s.steps_due(21)
    assert not s.seconds_due(59.0) and s.seconds_due(61.0)
    assert s.epoch_due(2) and not s.epoch_due(3)
    with pytest.raises(ValueError):
        SaveSchedule(every_steps=0)


@pytest.mark.parametrize(
    "mode,values,expected",
    [
        ("min", [3, 2.5, 2.49, 1.0], [True, True, False, True]),
        ("max", [0.5, 0.55, 0.56, 0.7], [True, True, False, True]),
    ],
)
def test_best_with_min_delta(mode, values, expected):
    rule = BestMetric("m", mode, min_delta=0.02)
    best, got = None, []
    for v in values:
        improved = rule.improves(v, best)
        got.append(improved)
        best = v if improved else best
    assert got == expected


def test_nan_and_inf_never_improve():
    rule = BestMetric("m", "min")
    assert not rule.improves(float("nan"), None)
    assert not rule.improves(float("-inf"), 1.0)


def test_to_float():
    assert to_float(torch.tensor(2.5, requires_grad=True) * 2) == 5.0
    assert to_float(np.float32(1.5)) == 1.5
    assert to_float(3) == 3.0
    for bad in ("x", None, True, [1.0]):
        with pytest.raises(MetricError):
            to_float(bad)


def test_early_stopping_patience():
    st = PolicyState()
    es, rule = EarlyStopping(patience=2), BestMetric("m", "min")
    for v in [5, 4, 4.5]:
        early_stopping_update(es, rule, st, v)
    assert not st.stopped and st.bad_epochs == 1
    early_stopping_update(es, rule, st, 4.2)  # the second epoch in a row without improvement
    assert st.stopped and st.bad_epochs == 2  # Keras/Lightning: patience=2 stops here


def test_early_stopping_improvement_resets_patience():
    st = PolicyState()
    es, rule = EarlyStopping(patience=2), BestMetric("m", "min")
    for v in [5, 6, 4, 4.5]:
        early_stopping_update(es, rule, st, v)
    assert not st.stopped and st.bad_epochs == 1


def _ckpts(n, best_at=()):
    return [
        {
            "name": f"c{i}",
            "step": i,
            "seq": i,
            "reason": ["best"] if i in best_at else ["steps"],
            "metrics": {"loss": 10 - i if i in best_at else 99},
        }
        for i in range(1, n + 1)
    ]


def test_retention_never_deletes_newest_best_or_protected():
    r = Retention(keep_last=2, keep_best=1, protected={"c1"})
    doomed = r.doomed(_ckpts(8, best_at={3}), BestMetric("loss"))
    assert doomed == ["c2", "c4", "c5", "c6"]


def test_retention_keep_best_k_and_every():
    r = Retention(keep_last=1, keep_best=2, keep_every=4)
    doomed = r.doomed(_ckpts(9, best_at={2, 5, 6}), BestMetric("loss"))
    assert set(doomed) == {"c1", "c2", "c3", "c7"}  # keeps 4, 8 (every), 5, 6 (best 2), 9 (last)


def test_retention_keep_last_none_keeps_all():
    assert Retention(keep_last=None).doomed(_ckpts(5), None) == []
