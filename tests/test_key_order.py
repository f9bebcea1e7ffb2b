"""Dicts in saved state come back in the order they were built.

state.json is written with sorted keys (canonical JSON), so without the recorded
``key_orders`` every string-keyed dict came back sorted: a resumed run that iterates a
user's dict (a float sum, callbacks, curriculum tasks) silently diverged from the
uninterrupted one. Found by an outside user's generated state; each case here is a
place such a dict lives: a module's extra state, a plain object's ``state_dict()``,
``g.extra``, and the optimizer's own param groups.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

import guardian
from guardian.format.tree import restore_key_orders

ORDERS = [["zeta", "alpha", "mid"], ["main", "reg", "aux"], ["b", "a"], ["x2", "x10", "x1", "y"]]


class Weighted(nn.Module):
    """Extra state whose order matters: its values are summed in float."""

    def __init__(self, keys: list[str]) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.w = {k: float(i) for i, k in enumerate(keys)}

    def get_extra_state(self):
        return {"w": dict(self.w), "nested": {"inner": dict(self.w)}}

    def set_extra_state(self, state):
        self.w = state["w"]


class Tracker:
    def __init__(self, keys: list[str]) -> None:
        self.counts = {k: 0 for k in keys}

    def state_dict(self):
        return {"counts": dict(self.counts), "top_" + "z": 1, "top_a": 2}

    def load_state_dict(self, sd):
        self.counts = sd["counts"]
        self.top = list(sd)


def _run(tmp_path, keys: list[str], steps: int):
    model = Weighted(keys)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    tracker = Tracker(keys)
    with guardian.protect(
        model=model, optimizer=opt, tracker=tracker, dir=str(tmp_path / "run"), save_on_exit=False
    ) as g:
        if steps:
            g.extra["schedule"] = {k: i for i, k in enumerate(keys)}
            for _ in range(steps):
                model.lin(torch.ones(1, 2)).sum().backward()
                opt.step()
                opt.zero_grad()
                g.step()
            g.save("test")
        return model, opt, tracker, dict(g.extra)


@pytest.mark.parametrize("keys", ORDERS)
def test_user_dicts_resume_in_their_own_order(tmp_path, keys):
    _, opt0, _, _ = _run(tmp_path, keys, steps=2)
    model, opt, tracker, extra = _run(tmp_path, ["unrelated"], steps=0)  # fresh objects: a resume
    assert list(model.w) == keys
    assert list(tracker.counts) == keys
    assert tracker.top == ["counts", "top_z", "top_a"]
    assert list(extra["schedule"]) == keys
    assert [list(g) for g in opt.state_dict()["param_groups"]] == [
        list(g) for g in opt0.state_dict()["param_groups"]
    ]


def test_generated_trees_keep_every_dict_order():
    """Random trees of dicts, lists and tuples: restore_key_orders puts back exactly
    the order the encoder saw, after a round trip through sorted JSON."""
    import json

    from guardian.format.tree import Decoder, Encoder

    rng = random.Random(24)

    def tree(depth: int):
        if depth == 0 or rng.random() < 0.3:
            return rng.choice([1, 2.5, "s", None, True])
        kind = rng.choice(["dict", "dict", "list", "tuple", "intdict"])
        n = rng.randint(0, 5)
        if kind == "dict":
            keys = rng.sample(["a", "b", "c", "d", "e", "f", "g"], n)
            return {k: tree(depth - 1) for k in keys}
        if kind == "intdict":
            return {rng.randint(0, 99): {"q": tree(depth - 1), "p": 1} for _ in range(n)}
        items = [tree(depth - 1) for _ in range(n)]
        return items if kind == "list" else tuple(items)

    def orders(value):
        if isinstance(value, dict):
            return [list(value), *[o for v in value.values() for o in orders(v)]]
        if isinstance(value, (list, tuple)):
            return [o for v in value for o in orders(v)]
        return []

    for _ in range(300):
        original = tree(4)
        enc = Encoder(lambda v: False, lambda parts, t: "")
        data = json.loads(json.dumps(enc.encode(original), sort_keys=True))
        back = Decoder(lambda k: None).decode(data)
        restore_key_orders(back, [{"at": list(at), "keys": keys} for at, keys in enc.key_orders])
        assert back == original
        assert orders(back) == orders(original)


@pytest.mark.parametrize(
    "orders",
    [
        None,
        "x",
        [1],
        [{"at": "a", "keys": []}],
        [{"at": [], "keys": ["a"]}],
        [{"at": ["zz"], "keys": ["b", "a"]}],
    ],
)
def test_an_order_list_that_does_not_fit_costs_only_the_order(orders):
    tree = {"a": 1, "b": {"d": 2, "c": 3}}
    restore_key_orders(tree, orders)
    assert tree == {"a": 1, "b": {"d": 2, "c": 3}}
