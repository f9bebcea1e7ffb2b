"""Rules, patterns, ops and the assignment solver: the parts with no I/O."""

from __future__ import annotations

import json

import pytest

from guardian.migrate import ops
from guardian.migrate.auto import hungarian
from guardian.migrate.errors import RulesError
from guardian.migrate.patterns import compile_pair, compile_pattern
from guardian.migrate.rules import load_rules, parse_rules


def test_placeholders_full_match_and_invert():
    a, b = compile_pair("layers.{i:int}.attn.{p}", "blocks.{i}.attention.{p}", "t")
    vals = a.match("layers.12.attn.weight")
    assert b.format(vals) == "blocks.12.attention.weight"
    assert a.format(b.match("blocks.12.attention.weight")) == "layers.12.attn.weight"
    assert a.match("layers.x.attn.weight") is None  # {i:int} is digits only
    assert a.match("pre.layers.1.attn.weight") is None  # full match, never a substring
    assert compile_pattern("enc.{rest:*}", "t").match("enc.a.b.c") == {"rest": "a.b.c"}
    assert compile_pattern("conv1.{p}", "t").match("conv1.sub.weight") is None  # {p} is one segment


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"rules": [{"from": "a.{p}", "to": "b.{q}"}]}, "must use the same placeholders"),
        ({"rules": [{"from": "a.{p}.{p}", "to": "b.{p}"}]}, "appears twice"),
        ({"rules": [{"from": "a.{p", "to": "b"}]}, "malformed placeholder"),
        ({"rules": [{"from": "a", "drop": ""}]}, "drop needs a reason"),
        ({"rules": [{"regex": "a(.*)", "to": "b\\1"}]}, "must state its inverse"),
        ({"rules": [{"from": "a", "to": "b", "form": 1}]}, "unknown fields ['form']"),
        ({"rules": [{"from": "a", "to": "b", "ops": [{"op": "rotate"}]}]}, "unknown op"),
        (
            {"rules": [{"from": "a", "to": "b", "ops": [{"op": "cast", "dtype": "F17"}]}]},
            "cast to unknown dtype",
        ),
        ({"rules": [{"from": "a.{i:int}", "to": ["b.{i}", "c.{i}"]}]}, "several 'to' keys need a split op"),
        ({"expect_missing": [{"pattern": "x", "init": "random"}]}, "init must be one of"),
        ({"version": 2}, "rules version 2 is not supported"),
        ({"renames": []}, "unknown top-level keys"),
    ],
)
def test_bad_rules_are_rejected_with_a_message(doc, message):
    with pytest.raises(RulesError) as e:
        parse_rules(doc, "r.toml")
    assert message in str(e.value)
    assert e.value.exit_code == 12


def test_toml_and_json_rules_files(tmp_path):
    toml = tmp_path / "r.toml"
    toml.write_text('[[rules]]\nfrom = "conv1.{p}"\nto = "embed_1.{p}"\n')
    assert load_rules(toml).rules[0].claim("conv1.weight") == (["conv1.weight"], ["embed_1.weight"])
    js = tmp_path / "r.json"
    js.write_text(json.dumps({"rules": [{"from": "conv1.{p}", "to": "embed_1.{p}"}]}))
    assert len(load_rules(js).rules) == 1
    dup = tmp_path / "d.json"
    dup.write_text('{"rules": [], "rules": []}')
    with pytest.raises(RulesError, match="duplicate JSON key 'rules'"):
        load_rules(dup)
    bad = tmp_path / "b.toml"
    bad.write_text("[[rules]\n")
    with pytest.raises(RulesError, match="not valid TOML"):
        load_rules(bad)


def test_ops_shapes_and_inverses():
    spec = [((6, 4), "F32")]
    out, inv = ops.chain([{"op": "transpose", "dims": [0, 1]}], spec, "t")
    assert out == [((4, 6), "F32")] and inv == [{"op": "transpose", "dims": [0, 1]}]
    out, inv = ops.chain([{"op": "split", "dim": 0, "sizes": [2, 4]}], spec, "t")
    assert out == [((2, 4), "F32"), ((4, 4), "F32")] and inv == [{"op": "concat", "dim": 0}]
    out, inv = ops.chain([{"op": "pad_rows", "rows": 2}], spec, "t")
    assert out == [((8, 4), "F32")] and inv == [{"op": "slice_rows", "start": 0, "stop": 6}]
    assert ops.chain([{"op": "cast", "dtype": "F16"}], spec, "t")[1] is None  # narrowing: lossy
    assert ops.chain([{"op": "slice_rows", "start": 0, "stop": 3}], spec, "t")[1] is None
    assert ops.chain([{"op": "cast", "dtype": "F32"}], [((2,), "F16")], "t")[1] == [
        {"op": "cast", "dtype": "F16"}
    ]
    with pytest.raises(RulesError, match="reshape must keep the element count"):
        ops.chain([{"op": "reshape", "shape": [5, 5]}], spec, "t")


def test_hungarian_is_globally_optimal():
    # greedy would take (0,0)=0.1 and then pay 10; the optimum is 1 + 1
    cost = [[0.1, 1.0], [1.0, 10.0]]
    assert hungarian(cost) == [(0, 1), (1, 0)]
    assert hungarian([[1.0, 0.0, 5.0]]) == [(0, 1)]
    assert hungarian([[1.0], [0.0]]) == [(1, 0)]
