"""Property: revert(apply(x)) == x, tensor for tensor, for generated state dicts,
optimizer states and rule sets (renames, transposes, reshapes, widening casts,
row padding, splits), with hostile-looking key names."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardian.migrate import ops
from guardian.migrate.apply import migrate_model, migrate_optimizer, restore_groups
from guardian.migrate.planner import make_plan
from guardian.migrate.rules import parse_rules
from guardian.migrate.sources import tensor_spec
from guardian.migrate.targets import Target

SEGMENT = st.text(alphabet="abcxyz_[]>^-", min_size=1, max_size=6).filter(lambda s: not s.isdigit())
OPS = ["none", "transpose", "reshape", "cast", "pad_rows", "split"]


@st.composite
def cases(draw):
    n = draw(st.integers(1, 5))
    olds = draw(st.lists(SEGMENT, min_size=n, max_size=n, unique=True))
    news = draw(st.lists(SEGMENT.map(lambda s: "n" + s), min_size=n, max_size=n, unique=True))
    sd, rules, target = {}, [], {}
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    for old, new in zip(olds, news, strict=False):
        rows, cols = draw(st.integers(1, 4)) * 2, draw(st.integers(1, 3))
        w = torch.randn(rows, cols, generator=gen)
        b = torch.randn(rows, generator=gen)
        sd[f"{old}.weight"], sd[f"{old}.bias"] = w, b
        op = draw(st.sampled_from(OPS))
        wop = {
            "none": [],
            "transpose": [{"op": "transpose", "dims": [0, 1]}],
            "reshape": [{"op": "reshape", "shape": [rows * cols]}],
            "cast": [{"op": "cast", "dtype": "F64"}],
            "pad_rows": [{"op": "pad_rows", "rows": 2}],
            "split": [{"op": "split", "dim": 0, "sizes": [rows // 2, rows // 2]}],
        }[op]
        wdst = [f"{new}.w1", f"{new}.w2"] if op == "split" else f"{new}.weight"
        rules.append({"from": f"{old}.weight", "to": wdst, "ops": wop})
        rules.append({"from": f"{old}.{{p}}", "to": f"{new}.{{p}}"})
        out, _ = ops.chain(wop, [tensor_spec(w)], "t")
        for key, spec in zip(wdst if isinstance(wdst, list) else [wdst], out, strict=False):
            target[key] = spec
        target[f"{new}.bias"] = tensor_spec(b)
    return sd, rules, target


def optimizer_tree(sd):
    state = {
        k: {"step": torch.tensor(3.0), "exp_avg": torch.randn_like(v), "momentum_buffer": None}
        for k, v in sd.items()
    }
    return {"state": state, "param_groups": [{"lr": 0.1, "params": list(sd)}]}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        elif isinstance(a[k], dict):
            assert_same(a[k], b[k])
        else:
            assert a[k] == b[k], k


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_revert_of_apply_is_identity(case):
    sd, rules, tspecs = case
    target = Target("generated", tspecs, params=list(tspecs))
    plan = make_plan(
        {k: tensor_spec(v) for k, v in sd.items()}, target, parse_rules({"rules": rules}), values=sd
    )
    assert not plan.blocked, (plan.problems, plan.issues)
    assert not plan.lossy
    notes: list[str] = []
    new_sd = migrate_model(sd, plan.entries, list(tspecs))
    assert {k: tensor_spec(v) for k, v in new_sd.items()} == tspecs
    opt = optimizer_tree(sd)
    new_opt = migrate_optimizer(opt, plan.entries, "", plan.target_params, notes)
    assert not notes  # nothing reset: every op here is exact
    back = migrate_model(new_sd, plan.inverse(), list(sd))
    assert list(back) == list(sd)
    assert_same(back, sd)
    back_opt = migrate_optimizer(new_opt, plan.inverse(), "", None, notes)
    back_opt = restore_groups(back_opt, [g["params"] for g in opt["param_groups"]], notes)
    assert_same(back_opt["state"], opt["state"])
    assert back_opt["param_groups"] == opt["param_groups"]


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4))
def test_lossy_rows_reset_optimizer_state_and_say_so(rows, cols):
    sd = {"e.weight": torch.randn(rows + 1, cols)}
    rules = {
        "rules": [
            {
                "from": "e.weight",
                "to": "e.weight",
                "lossy": True,
                "ops": [{"op": "slice_rows", "start": 0, "stop": rows}],
            }
        ]
    }
    target = Target("t", {"e.weight": ((rows, cols), "F32")}, params=["e.weight"])
    plan = make_plan({k: tensor_spec(v) for k, v in sd.items()}, target, parse_rules(rules))
    assert plan.lossy and not plan.blocked
    notes: list[str] = []
    out = migrate_optimizer(optimizer_tree(sd), plan.entries, "", None, notes)
    assert out["state"] == {} and any("reset" in n and "lossy" in n for n in notes)
    assert math.prod(migrate_model(sd, plan.entries, ["e.weight"])["e.weight"].shape) == rows * cols
