"""Never call a guess clean: ties, thresholds, --accept-guesses and what the report
may offer as a ready-to-paste rule. Plus index arithmetic in rules, end to end."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner
from test_migrate_families import FAMILIES, ResNetV1, _randomized, measure
from test_migrate_support import write_ckpt
from torch import nn

import guardian.migrate as M
from guardian.cli import main
from guardian.format import manifest as manifest_mod
from guardian.format import reader
from guardian.migrate.planner import make_plan
from guardian.migrate.rules import parse_rules
from guardian.migrate.sources import tensor_spec
from guardian.migrate.targets import from_module


class Twins(nn.Module):
    """Two layers nothing tells apart: same shapes, and names with no shared word."""

    def __init__(self, a: str = "alpha", b: str = "beta") -> None:
        super().__init__()
        setattr(self, a, nn.Linear(4, 4))
        setattr(self, b, nn.Linear(4, 4))


def TwinsV2() -> Twins:
    return Twins("gamma", "delta")


def _save_safetensors(sd: dict, path: str) -> str:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return path


def _specs(sd: dict) -> dict:
    return {k: tensor_spec(v) for k, v in sd.items()}


def test_threshold_zero_never_reports_clean_for_a_tie():
    """The regression: --auto --threshold 0.0 applied zero-confidence ties and said CLEAN."""
    sd = Twins().state_dict()
    p = make_plan(
        _specs(sd),
        from_module(TwinsV2()),
        parse_rules({}),
        source={"kind": "safetensors"},
        auto=True,
        threshold=0.0,
    )
    assert p.verdict == "blocked" and not p.entries
    assert {i.status for i in p.issues} == {"AMBIGUOUS"}
    for issue in p.issues:
        assert "[[rules]]" not in issue.hint  # a tie offers no rule to paste
        assert "tied with" in issue.message
    assert "CLEAN" not in M.render(p).splitlines()[-1]


def test_cli_tie_blocks_at_threshold_zero_and_accept_guesses_is_loud_and_recorded(tmp_path):
    src = _save_safetensors(_randomized(Twins()).state_dict(), str(tmp_path / "twins.safetensors"))
    runner = CliRunner()
    target = "test_migrate_guesses:TwinsV2"
    res = runner.invoke(
        main, ["migrate", "plan", src, "--to", target, "--auto", "--threshold", "0.0", "--json"]
    )
    assert res.exit_code == M.EXIT_BLOCKED
    assert json.loads(res.output)["status"] == "blocked"
    out = str(tmp_path / "out")
    res = runner.invoke(main, ["migrate", src, "-o", out, "--to", target, "--auto", "--threshold", "0.0"])
    assert res.exit_code == M.EXIT_BLOCKED and not os.path.exists(out)

    args = ["migrate", src, "-o", out, "--to", target, "--auto", "--accept-guesses"]
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "GUESSES ACCEPTED" in res.output and "NOT CLEAN" in res.output
    assert "CLEAN: nothing unresolved" not in res.output
    record = manifest_mod.read(out).extra["migration"]
    assert record["verdict"] == "guessed"
    assert len(record["accepted_guesses"]) == 2  # one per template: alpha.{p}, beta.{p}
    assert all(g["guess"] == "tie" for g in record["accepted_guesses"])
    assert record["plan"]["accept_guesses"] is True
    assert {e["status"] for e in record["plan"]["entries"]} == {"GUESSED"}


def test_below_threshold_is_suggested_with_a_rule_and_applied_only_when_asked():
    """Registration order can break a tie, but alone it never reaches the default threshold."""
    sd = Twins().state_dict()
    p = make_plan(_specs(sd), from_module(TwinsV2()), parse_rules({}), source={"kind": "torch"}, auto=True)
    assert p.verdict == "blocked"
    assert {i.status for i in p.issues} == {"SUGGESTED"}
    assert all("[[rules]]" in i.hint for i in p.issues)  # the unique best candidate: a rule to paste
    assert all(0 < i.confidence <= 0.5 for i in p.issues)
    guessed = make_plan(
        _specs(sd),
        from_module(TwinsV2()),
        parse_rules({}),
        source={"kind": "torch"},
        auto=True,
        accept_guesses=True,
    )
    assert guessed.verdict == "guessed" and len(guessed.guesses) == 2
    assert all("below threshold" in g["guess"] for g in guessed.guesses)


class FusedUnspelled(nn.Module):
    """q, k, v fused under a name that does not spell their order (torch MHA style)."""

    def __init__(self) -> None:
        super().__init__()
        self.in_proj = nn.Linear(4, 12)


class Split(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)


def test_a_fusion_order_the_name_does_not_spell_is_never_guessed():
    p = make_plan(_specs(Split().state_dict()), from_module(FusedUnspelled()), parse_rules({}), auto=True)
    assert p.verdict == "blocked" and not p.entries
    assert {i.status for i in p.issues} == {"AMBIGUOUS"}
    assert all("does not spell" in i.message and "[[rules]]" not in i.hint for i in p.issues)


def test_pasted_family_rules_with_index_shift_give_the_same_plan(tmp_path):
    got = measure(FAMILIES[0], "pt", str(tmp_path))
    auto = got["plan"]
    rules = [r for a in auto.applied for r in a["rules"]]
    assert any("{i-1}" in r["to"] for r in rules)
    assert len(rules) <= 6  # a handful of rules to review, not 92 pairs
    manual = M.plan(got["path"], FAMILIES[0].new, {"rules": rules})
    assert manual.verdict == "clean"
    assert sorted((e.srcs, e.dsts) for e in manual.entries) == sorted((e.srcs, e.dsts) for e in auto.entries)


def test_family_migration_with_optimizer_reverts_byte_for_byte(tmp_path):
    torch.manual_seed(0)
    model = _randomized(ResNetV1()).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 12, 12)).sum().backward()
    opt.step()
    src = write_ckpt(str(tmp_path / "ck"), {"model": model, "optimizer": opt})
    out = str(tmp_path / "out")
    result = M.migrate(src, out, FAMILIES[0].new, auto=True)
    assert result.plan.verdict == "clean"
    moved = M.sources.load_source(out).components["optimizer"][1]["state"]
    assert "module.stages.0.0.conv1.weight" in moved and "layer1.0.conv1.weight" not in moved
    back = str(tmp_path / "back")
    M.revert(out, back)

    def digest(p):
        return reader.checkpoint_digest(reader.component_summaries(p, reader.inspect_checkpoint(p).manifest))

    assert digest(back) == digest(src)


# ------------------------------------------------------------------ index arithmetic in rules


def test_index_shift_rules_claim_invert_and_refuse_what_they_cannot_write():
    rules = parse_rules({"rules": [{"from": "layer{i:int}.{rest:*}", "to": "stages.{i-1}.{rest:*}"}]})
    rule = rules.rules[0]
    assert rule.claim("layer3.0.conv1.weight") == (["layer3.0.conv1.weight"], ["stages.2.0.conv1.weight"])
    assert rule.unclaim("stages.2.0.conv1.weight") == "layer3.0.conv1.weight"

    class L0(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer0 = nn.Linear(2, 2)

    class S(nn.Module):
        def __init__(self):
            super().__init__()
            self.stages = nn.ModuleList([nn.Linear(2, 2)])

    p = make_plan(_specs(L0().state_dict()), from_module(S()), rules)
    assert p.verdict == "blocked"
    assert any("would become -1" in x for x in p.problems)


def test_index_map_and_regex_shift():
    rules = parse_rules(
        {
            "rules": [
                {"from": "blocks.{i:int}.{p}", "to": "layers.{i}.{p}", "index_map": {"i": {"1": 0, "3": 1}}},
                {
                    "regex": r"layer(\d+)\.(.*)",
                    "to": r"stages.\g<1-1>.\2",
                    "inverse_regex": r"stages\.(\d+)\.(.*)",
                    "inverse_to": r"layer\g<1+1>.\2",
                },
            ]
        }
    )
    table, rx = rules.rules
    assert table.claim("blocks.3.weight")[1] == ["layers.1.weight"]
    assert table.unclaim("layers.0.bias") == "blocks.1.bias"
    assert rx.claim("layer2.w")[1] == ["stages.1.w"] and rx.unclaim("stages.1.w") == "layer2.w"


@pytest.mark.parametrize(
    "rule, message",
    [
        ({"from": "a.{i:int}", "to": "b.{i}", "index_map": {"i": {"1": 0, "2": 0}}}, "cannot be inverted"),
        ({"from": "a.{i:int}", "to": "b.{i}", "index_map": {"j": {"1": 0}}}, "which 'from' does not use"),
        ({"from": "a.{r:*}", "to": "b.{r+1}"}, "only numbers can be shifted"),
        ({"from": "a.{r}", "to": "b.{r}", "index_map": {"r": {"1": 0}}}, "only numbers can be shifted"),
        (
            {"regex": "a(.*)", "to": r"b\g<2-1>", "inverse_regex": "b(.*)", "inverse_to": r"a\1"},
            "names no group",
        ),
        ({"from": "a.{i:int}", "drop": "gone", "index_map": {"i": {"1": 0}}}, "index_map belongs"),
    ],
)
def test_bad_index_arithmetic_is_rejected(rule, message):
    with pytest.raises(M.RulesError) as e:
        parse_rules({"rules": [rule]})
    assert message in str(e.value)


def test_leading_zeros_cannot_be_shifted_back_so_the_plan_says_so():
    class Z(nn.Module):
        def __init__(self):
            super().__init__()
            self.add_module("l01", nn.Linear(2, 2))

    class S(nn.Module):
        def __init__(self):
            super().__init__()
            self.stages = nn.ModuleList([nn.Linear(2, 2)])

    rules = parse_rules({"rules": [{"from": "l{i:int}.{p}", "to": "stages.{i-1}.{p}"}]})
    p = make_plan(_specs(Z().state_dict()), from_module(S()), rules)
    assert p.verdict == "blocked"
    assert any("'01' is not a plain number" in x for x in p.problems)


def test_an_induced_index_map_is_valid_toml_and_gives_the_same_plan():
    """Indices 1 and 3 became 0 and 1: no single shift fits, so the rule carries a table."""
    import tomllib

    old = nn.ModuleDict({"blocks": nn.ModuleDict({"1": nn.Linear(3, 3), "3": nn.Linear(3, 5)})})
    new = nn.ModuleDict({"layers": nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 5)])})
    sd = old.state_dict()
    auto = make_plan(_specs(sd), from_module(new), parse_rules({}), auto=True)
    assert auto.verdict == "clean", M.render(auto)
    (applied,) = auto.applied
    assert applied["rules"][0]["index_map"] == {"i": {"1": 0, "3": 1}}
    pasted = tomllib.loads(applied["rule"])
    manual = make_plan(_specs(sd), from_module(new), parse_rules(pasted))
    assert manual.verdict == "clean"
    assert sorted((e.srcs, e.dsts) for e in manual.entries) == sorted((e.srcs, e.dsts) for e in auto.entries)


# ------------------------------------------------------------------ numeric tie-break


class ChainV1(nn.Module):
    def __init__(self, a: str = "alpha", b: str = "beta", summed: bool = False) -> None:
        super().__init__()
        self.a, self.b, self.summed = a, b, summed
        setattr(self, a, nn.Linear(4, 4))
        setattr(self, b, nn.Linear(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = getattr(self, self.a), getattr(self, self.b)
        return first(x) + second(x) if self.summed else second(torch.relu(first(x)))


def ChainV2() -> ChainV1:
    """alpha → gamma, beta → delta; delta is registered first, and no name shares a word."""
    m = ChainV1("delta", "gamma")
    m.a, m.b = "gamma", "delta"
    return m


def SumV1() -> ChainV1:
    return ChainV1(summed=True)


def SumV2() -> ChainV1:
    return ChainV1("delta", "gamma", summed=True)


def test_a_tie_is_decided_numerically_when_exactly_one_assignment_computes_the_old_outputs(tmp_path):
    src = _save_safetensors(_randomized(ChainV1()).state_dict(), str(tmp_path / "chain.safetensors"))
    target = "test_migrate_guesses:ChainV2"
    with pytest.raises(M.PlanBlockedError):  # names and structure alone: a tie
        M.migrate(src, str(tmp_path / "no"), target, auto=True)
    numeric = {"old": "test_migrate_guesses:ChainV1", "input_shape": (3, 4)}
    result = M.migrate(src, str(tmp_path / "out"), target, auto=True, numeric=numeric)
    assert result.plan.verdict == "clean" and result.numeric_diff <= 1e-6
    pairs = {e.srcs[0]: e.dsts[0] for e in result.plan.entries}
    assert pairs["alpha.weight"] == "gamma.weight" and pairs["beta.bias"] == "delta.bias"
    assert all("decided numerically" in r["why"] for r in result.plan.rules["rules"])


def test_a_symmetry_the_probe_cannot_break_stays_undecided(tmp_path):
    """alpha(x) + beta(x): both assignments compute the same outputs, so neither is chosen."""
    src = _save_safetensors(_randomized(SumV1()).state_dict(), str(tmp_path / "sum.safetensors"))
    numeric = {"old": "test_migrate_guesses:SumV1", "input_shape": (3, 4)}
    with pytest.raises(M.PlanBlockedError) as e:
        M.migrate(src, str(tmp_path / "out"), "test_migrate_guesses:SumV2", auto=True, numeric=numeric)
    assert {i.status for i in e.value.plan.issues} == {"AMBIGUOUS"}
