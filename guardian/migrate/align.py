"""Structural alignment of module trees: which source *layer template* became which
target template, and how its indices moved.

Keys are grouped by module with their indices taken out (``layers.{}.attn.q`` holds
``layers.0.attn.q.weight``, ``layers.1.attn.q.bias``…). At the *coarse* level a
name ending in a number counts as an index too when siblings share its stem
(``layer1``, ``layer2``, ``layer3`` → ``layer{}``), so ``layer{i}`` → ``stages.{i-1}``
can be found. A source and a target group are *compatible* when their members agree
after indices are replaced by their rank at each position: same leaves, same shapes
and dtypes, same nesting — the hierarchy and every parameter's shape, not the name.

Compatible groups are paired by a global assignment on name affinity (with
registration order as a faint tie-breaker), and every index position's values are
read off the pairs: a constant difference becomes an offset (``{i-1}``), anything
else an ``index_map``. Each pair of groups is *one* rule to review.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from . import names
from .assign import assign
from .ops import Spec

_NAMED_INDEX = re.compile(r"^(.*?[A-Za-z_])([0-9]+)$")
TIE = 0.02  # a margin this small is a tie: the evidence cannot tell the candidates apart
ORDER_ONLY = 0.5  # the most confidence registration order alone can give


@dataclass
class Group:
    """One module template and its members, keyed by (index ranks, leaf)."""

    template: str
    members: dict[tuple[tuple[int, ...], str], tuple[Spec, str, tuple[int, ...]]] = field(
        default_factory=dict
    )
    rank: float = 0.0  # position of its first key among the leftovers, 0..1

    def signature(self) -> frozenset:
        return frozenset((r, leaf, spec) for (r, leaf), (spec, _k, _i) in self.members.items())

    @property
    def arity(self) -> int:
        return self.template.count("{}")


def _split(key: str, stems: set[tuple[str, str]] | None) -> tuple[str, tuple[int, ...], str] | None:
    """``(template, indices, leaf)``; ``stems`` (coarse level) lists (prefix, stem) pairs
    whose trailing digits are indices."""
    parts = key.split(".")
    if len(parts) < 2 or "{" in key or "}" in key:
        return None
    out: list[str] = []
    idx: list[int] = []
    prefix: list[str] = []
    for part in parts[:-1]:
        m = _NAMED_INDEX.match(part)
        if part.isdigit():
            out.append("{}")
            idx.append(int(part))
        elif stems is not None and m and (".".join(prefix), m.group(1)) in stems and _plain(m.group(2)):
            out.append(m.group(1) + "{}")
            idx.append(int(m.group(2)))
        else:
            out.append(part)
        prefix.append(_general(part))
    return ".".join(out), tuple(idx), parts[-1]


def _general(part: str) -> str:
    """A segment with any number taken out: ``0`` → ``{}``, ``layer1`` → ``layer{}``."""
    if part.isdigit():
        return "{}"
    m = _NAMED_INDEX.match(part)
    return m.group(1) + "{}" if m else part


def _plain(digits: str) -> bool:
    return digits == "0" or not digits.startswith("0")


def _indexed_stems(keys: list[str]) -> set[tuple[str, str]]:
    """(general prefix, stem) pairs seen with two or more different trailing numbers."""
    seen: dict[tuple[str, str], set[str]] = {}
    for key in keys:
        prefix: list[str] = []
        for part in key.split(".")[:-1]:
            m = _NAMED_INDEX.match(part)
            if m and not part.isdigit():
                seen.setdefault((".".join(prefix), m.group(1)), set()).add(m.group(2))
            prefix.append(_general(part))
    return {k for k, v in seen.items() if len(v) > 1}


def build_groups(specs: dict[str, Spec], coarse: bool) -> list[Group]:
    stems = _indexed_stems(list(specs)) if coarse else None
    raw: dict[str, list[tuple[tuple[int, ...], str, Spec, str]]] = {}
    first: dict[str, int] = {}
    for pos, (key, spec) in enumerate(specs.items()):
        split = _split(key, stems)
        if split is None:
            continue
        tmpl, idx, leaf = split
        raw.setdefault(tmpl, []).append((idx, leaf, spec, key))
        first.setdefault(tmpl, pos)
    n = max(len(specs) - 1, 1)
    groups = []
    for tmpl, rows in raw.items():
        ranks = _rankers(rows)
        g = Group(tmpl, rank=first[tmpl] / n)
        for idx, leaf, spec, key in rows:
            g.members[(tuple(r[v] for r, v in zip(ranks, idx, strict=True)), leaf)] = (spec, key, idx)
        groups.append(g)
    return groups


def _rankers(rows: list[tuple[tuple[int, ...], str, Spec, str]]) -> list[dict[int, int]]:
    arity = len(rows[0][0]) if rows else 0
    return [{v: r for r, v in enumerate(sorted({row[0][p] for row in rows}))} for p in range(arity)]


# ------------------------------------------------------------------ pairing


@dataclass
class Match:
    """A source group paired with a target group, and how sure we are."""

    src: Group
    dst: Group
    confidence: float
    runner_up: str = ""
    tied: list[str] = field(default_factory=list)


def pair_groups(gs: list[Group], gd: list[Group], ordered: bool) -> list[Match]:
    """Globally pair structurally compatible groups; confidence per pair."""
    sig_s, sig_d = [g.signature() for g in gs], [g.signature() for g in gd]
    ok = [[sig_s[i] == sig_d[j] for j in range(len(gd))] for i in range(len(gs))]
    scores = [
        [
            names.affinity(a.template, b.template) + (0.01 * (1 - abs(a.rank - b.rank)) if ordered else 0)
            if ok[i][j]
            else None
            for j, b in enumerate(gd)
        ]
        for i, a in enumerate(gs)
    ]
    out = []
    for i, j in assign(scores):
        conf, runner, tied = confidence(
            i, j, ok, [g.template for g in gs], [g.template for g in gd], _ranks(gs, gd, ordered)
        )
        out.append(Match(gs[i], gd[j], conf, runner, tied))
    return out


def _ranks(gs: list[Group], gd: list[Group], ordered: bool) -> tuple[list[float], list[float]] | None:
    return ([g.rank for g in gs], [g.rank for g in gd]) if ordered else None


def confidence(
    i: int,
    j: int,
    ok: list[list[bool]],
    rows: list[str],
    cols: list[str],
    ranks: tuple[list[float], list[float]] | None,
) -> tuple[float, str, list[str]]:
    """``(confidence, runner-up, tied alternatives)`` of pairing ``rows[i]`` with
    ``cols[j]``: the smallest contrastive margin over every compatible alternative in
    its row and column (1.0 with no alternative). Where names cannot separate two
    candidates, registration order may, but never above ``ORDER_ONLY``."""
    conf, runner, tied = 1.0, "", []
    rivals = [(rows[i], cols[j], cols[jj], "row", jj) for jj in range(len(cols)) if jj != j and ok[i][jj]]
    rivals += [(cols[j], rows[i], rows[ii], "col", ii) for ii in range(len(rows)) if ii != i and ok[ii][j]]
    for ref, mine, theirs, side, k in rivals:
        m = names.margin(*names.contrast(ref, mine, theirs))
        if m <= TIE and ranks is not None:
            rs, rd = ranks
            d = abs(rs[i] - rd[j])
            d2 = abs(rs[i] - rd[k]) if side == "row" else abs(rs[k] - rd[j])
            m = ORDER_ONLY * max(0.0, d2 - d) / d2 if d2 > 0 else 0.0
        if m <= TIE:
            tied.append(f"{rows[i]} → {theirs}" if side == "row" else f"{theirs} → {cols[j]}")
        if m < conf:
            conf, runner = m, (f"{rows[i]} → {theirs}" if side == "row" else f"{theirs} → {cols[j]}")
    return conf, runner, tied


# ------------------------------------------------------------------ rules from a match


def member_pairs(m: Match) -> list[tuple[str, str]]:
    return [(m.src.members[k][1], m.dst.members[k][1]) for k in m.src.members]


def induce_rule(m: Match) -> dict[str, Any] | None:
    """The rule (``from``/``to``/``index_map``) that maps every member of ``m.src`` onto
    its partner in ``m.dst``, or None if the indices do not move consistently."""
    idx_pairs = [(idx_s, m.dst.members[key][2]) for key, (_s, _k, idx_s) in m.src.members.items()]
    got = index_patterns([m.src.template], [m.dst.template], idx_pairs)
    if got is None:
        return None
    (src,), (dst,), index_map = got
    rule: dict[str, Any] = {"from": src + ".{p}", "to": dst + ".{p}"}
    if index_map:
        rule["index_map"] = index_map
    return rule


def index_patterns(
    src_templates: list[str],
    dst_templates: list[str],
    idx_pairs: list[tuple[tuple[int, ...], tuple[int, ...]]],
) -> tuple[list[str], list[str], dict[str, dict[str, int]]] | None:
    """Placeholder patterns for templates of one index structure: the k-th index of a
    source template is ``{i:int}`` (``j``, ``k``…), the k-th of a target template the
    same name shifted by a constant, or through an ``index_map`` when no shift fits.
    None when an index does not move one-to-one."""
    arity = len(idx_pairs[0][0]) if idx_pairs else 0
    moves: list[dict[int, int]] = [{} for _ in range(arity)]
    for idx_s, idx_d in idx_pairs:
        if len(idx_s) != arity or len(idx_d) != arity:
            return None
        for p, (a, b) in enumerate(zip(idx_s, idx_d, strict=True)):
            if moves[p].setdefault(a, b) != b:
                return None
    if any(len(set(mv.values())) != len(mv) for mv in moves):
        return None
    labels = "ijklmnabcdefgh"[:arity]
    index_map: dict[str, dict[str, int]] = {}
    dst_marks = []
    for name, mv in zip(labels, moves, strict=True):
        shifts = {b - a for a, b in mv.items()}
        if len(shifts) == 1:
            s = shifts.pop()
            dst_marks.append(f"{{{name}{s:+d}}}" if s else f"{{{name}}}")
        else:
            index_map[name] = {str(a): b for a, b in sorted(mv.items())}
            dst_marks.append(f"{{{name}}}")
    src_marks = [f"{{{n}:int}}" for n in labels]
    return (
        [_fill(t, src_marks) for t in src_templates],
        [_fill(t, dst_marks) for t in dst_templates],
        index_map,
    )


def _fill(template: str, marks: list[str]) -> str:
    it = iter(marks)
    return re.sub(r"\{\}", lambda _m: next(it), template)
