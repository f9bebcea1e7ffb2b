"""Fused and split projections: ``attn.q``/``attn.k``/``attn.v`` became ``attn.qkv``
(or the reverse).

A target layer template is a *fusion* of sibling source templates when, member by
member, their tensors stacked along dim 0 have its shape and dtype. The stacking
order matters and shapes cannot tell it (q, k and v are all d×d), so an order is
only proposed when the fused name spells it — ``qkv`` = ``q`` + ``k`` + ``v``,
``gate_up`` = ``gate`` + ``_`` + ``up`` — and exactly one candidate spells it.
Otherwise the row is reported with the candidates and no rule: writing the order
is the user's call, never a guess.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from . import names
from .align import TIE, Group, index_patterns

MAX_PARTS = 4


@dataclass
class Fusion:
    """Several groups on one side that are one group on the other."""

    parts: list[Group]
    whole: Group
    split: bool  # True: one source group → several target groups
    rules: list[dict[str, Any]] = field(default_factory=list)  # empty: order unknown
    confidence: float = 0.0
    message: str = ""

    def rows(self) -> list[tuple[list[str], list[str], list[dict[str, Any]]]]:
        """``(source keys, target keys, ops)`` per member."""
        out = []
        for key, (_spec, whole_key, _idx) in self.whole.members.items():
            part_keys = [p.members[key][1] for p in self.parts]
            if self.split:
                out.append(([whole_key], part_keys, [_split_op(self.parts, key)]))
            else:
                out.append((part_keys, [whole_key], [{"op": "concat", "dim": 0}]))
        return out


def _split_op(parts: list[Group], key: Any) -> dict[str, Any]:
    return {"op": "split", "dim": 0, "sizes": [p.members[key][0][0][0] for p in parts]}


def _leaf_name(template: str) -> tuple[str, str]:
    parent, _, leaf = template.rpartition(".")
    return parent, leaf


def _fits(parts: list[Group], whole: Group) -> bool:
    """Member by member, the parts stacked on dim 0 make the whole."""
    keys = set(whole.members)
    if any(set(p.members) != keys for p in parts):
        return False
    for key, ((shape, dtype), _k, _i) in whole.members.items():
        specs = [p.members[key][0] for p in parts]
        if not shape or any(s[1] != dtype or len(s[0]) != len(shape) or s[0][1:] != shape[1:] for s in specs):
            return False
        if sum(s[0][0] for s in specs) != shape[0]:
            return False
    return True


def _spells(word: str, pieces: list[str]) -> bool:
    """``qkv`` from [q, k, v]; ``gate_up`` from [gate, up] (an optional ``_`` between)."""
    return word in ("".join(pieces), "_".join(pieces))


def find_fusions(parts_side: list[Group], whole_side: list[Group], split: bool) -> list[Fusion]:
    """Every whole-side group that is a fusion of part-side siblings."""
    families: dict[str, list[Group]] = {}
    for g in parts_side:
        families.setdefault(_leaf_name(g.template)[0], []).append(g)
    out = []
    for whole in whole_side:
        found = _candidates(whole, families)
        if found:
            out.append(_decide(whole, found, split))
    return _drop_conflicts(out)


def _candidates(whole: Group, families: dict[str, list[Group]]) -> list[tuple[list[Group], bool]]:
    """``(ordered parts, name spells the order)`` for every fitting sibling sequence."""
    parent_w, leaf_w = _leaf_name(whole.template)
    found = []
    for parent, sibs in families.items():
        if parent.count("{}") != parent_w.count("{}") or len(sibs) > 12:
            continue
        for n in range(2, min(MAX_PARTS, len(sibs)) + 1):
            for combo in itertools.combinations(sibs, n):
                if not _fits(list(combo), whole):
                    continue
                spelled = [
                    list(order)
                    for order in itertools.permutations(combo)
                    if _spells(leaf_w, [_leaf_name(g.template)[1] for g in order])
                    and _fits(list(order), whole)
                ]
                found += [(o, True) for o in spelled] or [(list(combo), False)]
    return found


def _decide(whole: Group, found: list[tuple[list[Group], bool]], split: bool) -> Fusion:
    spelled = [parts for parts, ok in found if ok]
    if not spelled:
        names_ = " / ".join("+".join(g.template for g in parts) for parts, _ in found)
        return Fusion(
            found[0][0],
            whole,
            split,
            message=f"{whole.template} is {'split into' if split else 'a fusion of'} {names_}, in an order "
            "its name does not spell; write the concat/split rule with the right order",
        )
    parent_w = _leaf_name(whole.template)[0]
    ranked = sorted(spelled, key=lambda ps: -names.affinity(_leaf_name(ps[0].template)[0], parent_w))
    conf = 1.0
    if len(ranked) > 1:
        best = names.affinity(_leaf_name(ranked[0][0].template)[0], parent_w)
        second = names.affinity(_leaf_name(ranked[1][0].template)[0], parent_w)
        conf = names.margin(best, second)
    fusion = Fusion(ranked[0], whole, split, confidence=conf)
    if conf <= TIE:
        fusion.message = f"{whole.template} fits several sibling sets equally well; write the rule"
        return fusion
    fusion.rules = _rules(fusion)
    if not fusion.rules:
        fusion.confidence = 0.0
        fusion.message = f"{whole.template}: the indices do not move one-to-one; write the rule"
    return fusion


def _rules(f: Fusion) -> list[dict[str, Any]]:
    idx_pairs = []
    for key, (_s, _k, idx_w) in f.whole.members.items():
        idx_p = f.parts[0].members[key][2]
        idx_pairs.append((idx_w, idx_p) if f.split else (idx_p, idx_w))
    parts_t = [g.template for g in f.parts]
    src_t, dst_t = ([f.whole.template], parts_t) if f.split else (parts_t, [f.whole.template])
    got = index_patterns(src_t, dst_t, idx_pairs)
    if got is None:
        return []
    src, dst, index_map = got
    leaves = sorted({leaf for _r, leaf in f.whole.members})
    by_leaf: dict[str, set[tuple[int, ...]]] = {}
    for key in f.whole.members:
        by_leaf.setdefault(key[1], set()).add(tuple(_split_op(f.parts, key)["sizes"]))
    if f.split and any(len(v) > 1 for v in by_leaf.values()):
        return []  # sizes change from layer to layer: no single split rule
    per_leaf = f.split and len(set().union(*by_leaf.values())) > 1
    rules = []
    for leaf in leaves if per_leaf else ["{p}"]:
        key = next(k for k in f.whole.members if k[1] == leaf) if per_leaf else next(iter(f.whole.members))
        op = _split_op(f.parts, key) if f.split else {"op": "concat", "dim": 0}
        rule: dict[str, Any] = {
            "from": src[0] + "." + leaf if f.split else [s + "." + leaf for s in src],
            "to": [d + "." + leaf for d in dst] if f.split else dst[0] + "." + leaf,
            "ops": [op],
        }
        if index_map:
            rule["index_map"] = index_map
        rules.append(rule)
    return rules


def _drop_conflicts(found: list[Fusion]) -> list[Fusion]:
    """Two wholes claiming the same part: neither is decided."""
    seen: dict[int, int] = {}
    for f in found:
        for p in f.parts:
            seen[id(p)] = seen.get(id(p), 0) + 1
    for f in found:
        if any(seen[id(p)] > 1 for p in f.parts):
            f.rules, f.confidence = [], 0.0
            f.message = (
                f"{f.whole.template} competes with another fused layer for the same parts; write the rule"
            )
    return found
