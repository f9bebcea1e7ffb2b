"""Suggesting renames for the keys the rules leave unresolved.

Passes, coarse evidence first, each producing *rules* a human can review:

1. Structural templates (align.py), fine then coarse: module templates with equal
   structure after index normalisation — hierarchy, leaves, every shape and dtype —
   paired globally by name affinity; index shifts become ``{i-1}``.
2. Fused and split projections (fused.py): ``q``+``k``+``v`` ⇄ ``qkv``, proposed only
   when the name spells the order.
3. Prefix change: template pairs that all differ by the same leading prefix
   (``encoder.`` → ``backbone.encoder.``) collapse into one ``{rest:*}`` rule.
4. Residual pairing of same-shape leftovers, solved globally per shape.

Confidence is contrastive (names.py): the margin by which the evidence prefers this
partner over each compatible alternative, the smallest over all of them; 1.0 when
there is no alternative, 0 for a tie. Registration order only breaks ties, and then
gives at most ``ORDER_ONLY``. A tie is never applied, whatever the threshold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from . import names
from .align import TIE, build_groups, confidence, induce_rule, member_pairs, pair_groups
from .assign import assign, hungarian  # noqa: F401 (hungarian: re-exported for callers)
from .fused import Fusion, find_fusions
from .ops import Spec


@dataclass
class Suggestion:
    src_pattern: str
    dst_pattern: str
    pairs: list[tuple[str, str]]
    confidence: float
    kind: str  # "template" | "prefix" | "pair" | "merge" | "split"
    runner_up: str = ""
    tied: list[str] = field(default_factory=list)
    rules: list[dict[str, Any]] = field(default_factory=list)  # what to paste; empty: none known
    fused: list[tuple[list[str], list[str], list[dict[str, Any]]]] = field(default_factory=list)
    message: str = ""

    @property
    def undecided(self) -> bool:
        """A tie, or no single rule known (e.g. a fusion order its name does not spell):
        never applied without `accept_guesses`."""
        return self.confidence <= TIE or not self.rules

    def snippet(self) -> str:
        """Ready-to-paste TOML ('' when no single answer is known)."""
        return "".join(_toml_rule(r, f"{self.kind}, confidence {self.confidence:.2f}") for r in self.rules)

    def rows(self) -> list[tuple[list[str], list[str], list[dict[str, Any]]]]:
        return [([a], [b], []) for a, b in self.pairs] + list(self.fused)

    def to_json(self) -> dict:
        return {
            "from": self.src_pattern,
            "to": self.dst_pattern,
            "kind": self.kind,
            "confidence": round(self.confidence, 4),
            "pairs": [list(p) for p in self.pairs],
            "fused": [[s, d, o] for s, d, o in self.fused],
            "runner_up": self.runner_up,
            "tied": list(self.tied),
            "rules": list(self.rules),
            "rule": self.snippet(),
        }


def _toml_value(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v)


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").isalpha() else json.dumps(k)


def _toml_rule(rule: dict[str, Any], comment: str) -> str:
    lines = [f"[[rules]]  # {comment}"] + [f"{k} = {_toml_value(v)}" for k, v in rule.items()]
    return "\n".join(lines) + "\n"


def suggest(src: dict[str, Spec], dst: dict[str, Spec], *, ordered: bool = True) -> list[Suggestion]:
    """Suggestions for unresolved source keys ``src`` against unresolved target keys ``dst``
    (both in registration order when ``ordered``; a ``.safetensors`` source is not)."""
    out: list[Suggestion] = []
    left_s, left_d = dict(src), dict(dst)
    for coarse in (False, True):
        found = _template_pass(left_s, left_d, coarse, ordered)
        out += found
        _consume(found, left_s, left_d)
    found = _fusion_pass(left_s, left_d)
    out += found
    _consume(found, left_s, left_d)
    out = _collapse_prefixes(out, src)
    return out + _residual_pass(left_s, left_d, ordered)


def _consume(found: list[Suggestion], left_s: dict[str, Spec], left_d: dict[str, Spec]) -> None:
    for s in found:
        for srcs, dsts, _ops in s.rows():
            for k in srcs:
                left_s.pop(k, None)
            for k in dsts:
                left_d.pop(k, None)


def _template_pass(
    src: dict[str, Spec], dst: dict[str, Spec], coarse: bool, ordered: bool
) -> list[Suggestion]:
    out = []
    for m in pair_groups(build_groups(src, coarse), build_groups(dst, coarse), ordered):
        rule = induce_rule(m)
        conf = m.confidence if rule is not None else 0.0
        src_p = rule["from"] if rule else m.src.template + ".{p}"
        dst_p = rule["to"] if rule else m.dst.template + ".{p}"
        out.append(
            Suggestion(
                src_p, dst_p, member_pairs(m), conf, "template", m.runner_up, m.tied, [rule] if rule else []
            )
        )
    return out


def _fusion_pass(src: dict[str, Spec], dst: dict[str, Spec]) -> list[Suggestion]:
    gs, gd = build_groups(src, False), build_groups(dst, False)
    fusions = find_fusions(gs, gd, split=False) + find_fusions(gd, gs, split=True)
    return [_from_fusion(f) for f in fusions]


def _from_fusion(f: Fusion) -> Suggestion:
    parts = " + ".join(g.template for g in f.parts)
    src_p, dst_p = (f.whole.template, parts) if f.split else (parts, f.whole.template)
    return Suggestion(
        src_p,
        dst_p,
        [],
        f.confidence if f.rules else 0.0,
        "split" if f.split else "merge",
        rules=f.rules,
        fused=f.rows(),
        message=f.message,
    )


def _collapse_prefixes(found: list[Suggestion], src: dict[str, Spec]) -> list[Suggestion]:
    """Template pairs sharing one plain prefix change become one ``{rest:*}`` rule, but
    only when that rule would claim exactly the keys they cover."""
    by_change: dict[tuple[str, str], list[Suggestion]] = {}
    for s in found:
        if s.kind != "template" or s.undecided or any("index_map" in r for r in s.rules):
            continue
        a, b = s.src_pattern.split("."), s.dst_pattern.split(".")
        k = 0
        while k < min(len(a), len(b)) and a[-1 - k].replace(":int", "") == b[-1 - k]:
            k += 1
        pa, pb = ".".join(a[: len(a) - k]), ".".join(b[: len(b) - k])
        if pa and "{" not in pa and "{" not in pb and k > 1:
            by_change.setdefault((pa, pb), []).append(s)
    out = list(found)
    for (pa, pb), group in by_change.items():
        covered = {p[0] for s in group for p in s.pairs}
        claimed = {k for k in src if k.startswith(pa + ".")}
        if len(group) < 2 or covered != claimed:
            continue
        for s in group:
            out.remove(s)
        dst = f"{pb}.{{rest:*}}" if pb else "{rest:*}"
        src_p = f"{pa}.{{rest:*}}"
        pairs = [p for s in group for p in s.pairs]
        conf = min(s.confidence for s in group)
        out.append(Suggestion(src_p, dst, pairs, conf, "prefix", rules=[{"from": src_p, "to": dst}]))
    return out


def _residual_pass(src: dict[str, Spec], dst: dict[str, Spec], ordered: bool) -> list[Suggestion]:
    rank_s, rank_d = _ranks(src), _ranks(dst)
    out = []
    for spec in dict.fromkeys(src.values()):
        ks = [k for k, v in src.items() if v == spec and "{" not in k and "}" not in k]
        kd = [k for k, v in dst.items() if v == spec and "{" not in k and "}" not in k]
        if not ks or not kd:
            continue
        scores = [
            [names.affinity(a, b) + (0.01 * (1 - abs(rank_s[a] - rank_d[b])) if ordered else 0) for b in kd]
            for a in ks
        ]
        ok = [[True] * len(kd) for _ in ks]
        ranks = ([rank_s[a] for a in ks], [rank_d[b] for b in kd]) if ordered else None
        for i, j in assign(scores):
            conf, runner, tied = confidence(i, j, ok, ks, kd, ranks)
            rules = [{"from": ks[i], "to": kd[j]}]
            out.append(Suggestion(ks[i], kd[j], [(ks[i], kd[j])], conf, "pair", runner, tied, rules))
    return out


def _ranks(specs: dict[str, Spec]) -> dict[str, float]:
    n = max(len(specs) - 1, 1)
    return {k: i / n for i, k in enumerate(specs)}
