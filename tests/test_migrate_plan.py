"""Planning: rules, wrappers, auto-detection and the checks, on in-memory sources."""

from __future__ import annotations

import torch
from test_migrate_support import NewNet, OldNet, TiedLM, WideNet
from torch import nn

from guardian.migrate.planner import make_plan
from guardian.migrate.report import render, to_json
from guardian.migrate.rules import parse_rules
from guardian.migrate.sources import tensor_spec
from guardian.migrate.targets import from_module

SEED_RULES = {
    "rules": [{"from": "conv1.{p}", "to": "embed_1.{p}"}, {"from": "conv2.{p}", "to": "embed_2.{p}"}]
}


def specs(sd):
    return {k: tensor_spec(v) for k, v in sd.items()}


def plan_for(src_sd, target_model, rules=None, **kw):
    return make_plan(specs(src_sd), from_module(target_model), parse_rules(rules or {}), values=src_sd, **kw)


def test_seed_rules_make_a_clean_plan():
    p = plan_for(OldNet().state_dict(), NewNet(), SEED_RULES)
    assert not p.blocked and not p.lossy
    statuses = {e.srcs[0]: (e.status, e.dsts[0]) for e in p.entries}
    assert statuses["conv1.weight"] == ("RENAMED", "embed_1.weight")
    assert statuses["fc1.bias"] == ("UNCHANGED", "fc1.bias")
    text = render(p)
    assert "conv1.{p} → embed_1.{p}" in text and "CLEAN" in text


def test_auto_suggests_two_template_rules_with_high_confidence():
    p = plan_for(OldNet().state_dict(), NewNet())
    assert p.blocked  # without --auto nothing is applied silently
    assert {i.status for i in p.issues} == {"SUGGESTED"}
    rules = sorted((s.src_pattern, s.dst_pattern, s.kind) for s in p.suggestions)
    assert rules == [("conv1.{p}", "embed_1.{p}", "template"), ("conv2.{p}", "embed_2.{p}", "template")]
    assert all(s.confidence >= 0.99 for s in p.suggestions)
    assert '  from = "conv1.{p}"\n  to = "embed_1.{p}"' in render(p)  # ready to paste
    auto = plan_for(OldNet().state_dict(), NewNet(), auto=True)
    assert not auto.blocked and len(auto.applied) == 2
    assert sum(e.status == "RENAMED" for e in auto.entries) == 4


def test_suggestions_pasted_as_rules_give_the_same_plan():
    auto = plan_for(OldNet().state_dict(), NewNet(), auto=True)
    pasted = {"rules": [{"from": a["from"], "to": a["to"]} for a in auto.applied]}
    manual = plan_for(OldNet().state_dict(), NewNet(), pasted)
    assert sorted((e.srcs, e.dsts) for e in manual.entries) == sorted((e.srcs, e.dsts) for e in auto.entries)


def test_low_confidence_is_never_applied():
    class A(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Linear(4, 4, bias=False)
            self.q = nn.Linear(4, 4, bias=False)

    class B(nn.Module):
        def __init__(self):
            super().__init__()
            self.x = nn.Linear(4, 4, bias=False)
            self.y = nn.Linear(4, 4, bias=False)

    p = plan_for(A().state_dict(), B(), auto=True, threshold=0.99)
    assert p.blocked and {i.status for i in p.issues} <= {"SUGGESTED", "AMBIGUOUS"}
    assert all(s.confidence < 0.99 for s in p.suggestions)


def test_layer_templates_collapse_to_one_rule_per_template():
    old = nn.ModuleDict(
        {"layers": nn.ModuleList([nn.Linear(3, 3) for _ in range(6)]), "head": nn.Linear(3, 2)}
    )
    new = nn.ModuleDict(
        {"blocks": nn.ModuleList([nn.Linear(3, 3) for _ in range(6)]), "head": nn.Linear(3, 2)}
    )
    p = plan_for(old.state_dict(), new, auto=True)
    assert not p.blocked
    assert [(a["from"], a["to"]) for a in p.applied] == [("layers.{i:int}.{p}", "blocks.{i}.{p}")]


def test_common_prefix_change_becomes_one_rule():
    def tower(name):
        return nn.ModuleDict({name: nn.ModuleDict({"a": nn.Linear(2, 3), "b": nn.Linear(3, 4)})})

    p = plan_for(tower("encoder").state_dict(), tower("backbone"), auto=True)
    assert [(a["from"], a["to"], a["kind"]) for a in p.applied] == [
        ("encoder.{rest:*}", "backbone.{rest:*}", "prefix")
    ]


def test_wrapper_prefixes_need_no_rules():
    sd = OldNet().state_dict()
    for prefix in ("module.", "_orig_mod.", "module._orig_mod."):
        p = plan_for({prefix + k: v for k, v in sd.items()}, OldNet())
        assert not p.blocked, render(p)
        assert all(e.status == "RENAMED" and e.rule.startswith("wrapper") for e in p.entries)
    # wrapped names plus a real rename: the rules see the unwrapped names
    p = plan_for({"module." + k: v for k, v in sd.items()}, NewNet(), SEED_RULES)
    assert not p.blocked and {e.dsts[0] for e in p.entries} == set(NewNet().state_dict())


def test_typo_in_rule_is_unexpected_with_did_you_mean():
    rules = {
        "rules": [{"from": "conv1.{p}", "to": "embbed_1.{p}"}, {"from": "conv2.{p}", "to": "embed_2.{p}"}]
    }
    p = plan_for(OldNet().state_dict(), NewNet(), rules)
    assert p.blocked
    bad = [i for i in p.issues if i.status == "UNEXPECTED"]
    assert bad and "which the target does not have" in bad[0].message
    assert "did you mean 'embed_1." in bad[0].hint


def test_dead_rule_blocks():
    rules = {"rules": SEED_RULES["rules"] + [{"from": "conv3.{p}", "to": "embed_3.{p}"}]}
    p = plan_for(OldNet().state_dict(), NewNet(), rules)
    assert p.blocked and any("dead rule: rules[2]" in x for x in p.problems)


def test_non_injective_mapping_blocks():
    rules = {
        "rules": [{"from": "conv1.{p}", "to": "embed_1.{p}"}, {"from": "conv2.{p}", "to": "embed_1.{p}"}]
    }
    p = plan_for(OldNet().state_dict(), NewNet(), rules)
    assert any(x.startswith("not injective: 'embed_1.") for x in p.problems)


def test_drop_and_expect_missing():
    rules = {
        "rules": SEED_RULES["rules"] + [{"from": "fc2.{p}", "drop": "new head"}],
        "expect_missing": [{"pattern": "fc2.{p}", "why": "fresh head"}],
    }
    p = plan_for(OldNet().state_dict(), NewNet(), rules)
    assert not p.blocked and p.lossy  # a drop cannot be reverted
    assert {e.status for e in p.entries} >= {"DROPPED", "MISSING-EXPECTED"}
    assert "DROPPED" in to_json(p)["summary"]


def test_config_differs_is_diagnosed_once():
    p = plan_for(OldNet().state_dict(), WideNet())
    assert p.blocked and len(p.diagnosis) == 1
    assert "the target's configuration differs" in p.diagnosis[0]
    assert "×2" in p.diagnosis[0]


def test_undeclared_lossy_op_blocks_and_declared_passes():
    rule = {"from": "fc2.weight", "to": "fc2.weight", "ops": [{"op": "cast", "dtype": "F16"}]}
    p = plan_for(
        NewNet().state_dict(),
        NewNet().half(),
        {"rules": [dict(rule, **{"from": "{x}.{p}", "to": "{x}.{p}"})]},
    )
    assert any("loses information" in x and "lossy = true" in x for x in p.problems)
    ok = plan_for(
        NewNet().state_dict(),
        NewNet().half(),
        {
            "rules": [
                {"from": "{x}.{p}", "to": "{x}.{p}", "ops": [{"op": "cast", "dtype": "F16"}], "lossy": True}
            ]
        },
    )
    assert not ok.blocked and ok.lossy


def test_shape_mismatch_hint_names_the_op():
    src = {"w": torch.zeros(3, 5)}
    p = make_plan(specs(src), from_module(nn.Module()), parse_rules({}), values=src)
    assert [i.status for i in p.issues] == ["UNEXPECTED"]
    tgt = nn.Module()
    tgt.register_buffer("w", torch.zeros(5, 3))
    p = make_plan(specs(src), from_module(tgt), parse_rules({}), values=src)
    assert p.issues[0].status == "MISMATCH" and '"transpose"' in p.issues[0].hint


def test_tied_weights_must_stay_tied():
    src = TiedLM().state_dict()
    assert not plan_for(src, TiedLM()).blocked
    src = {k: v.clone() for k, v in src.items()}
    src["head.weight"] += 1  # no longer equal: the tie would silently pick one
    p = plan_for(src, TiedLM())
    assert any(x.startswith("tied weights") for x in p.problems)


def test_regex_escape_hatch_is_checked_for_invertibility():
    good = {
        "rules": [
            {
                "regex": r"conv(\d)\.(.*)",
                "to": r"embed_\1.\2",
                "inverse_regex": r"embed_(\d)\.(.*)",
                "inverse_to": r"conv\1.\2",
            }
        ]
    }
    assert not plan_for(OldNet().state_dict(), NewNet(), good).blocked
    bad = {"rules": [dict(good["rules"][0], inverse_to=r"conv\1.x")]}
    p = plan_for(OldNet().state_dict(), NewNet(), bad)
    assert any("not invertible on 'conv1.weight'" in x for x in p.problems)


def test_split_and_concat_rules():
    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("qkv", torch.arange(12.0).reshape(6, 2))

    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            for n in "qkv":
                self.register_buffer(n, torch.zeros(2, 2))

    rules = {
        "rules": [
            {"from": "qkv", "to": ["q", "k", "v"], "ops": [{"op": "split", "dim": 0, "sizes": [2, 2, 2]}]}
        ]
    }
    p = plan_for(Fused().state_dict(), Split(), rules)
    assert not p.blocked and p.entries[0].status == "TRANSFORMED"
    back = {"rules": [{"from": ["q", "k", "v"], "to": "qkv", "ops": [{"op": "concat", "dim": 0}]}]}
    assert not plan_for(Split().state_dict(), Fused(), back).blocked
