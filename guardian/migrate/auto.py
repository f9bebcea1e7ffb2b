"""Suggesting renames for the keys the rules leave unresolved.

Three passes, coarse to fine, each producing *rules* a human can review:

1. Template induction. Keys are grouped by module path with indices collapsed
   (``layers.{i}.attn``); a source group and a target group are compatible when
   they hold the same indices and the same leaves with the same shapes. Compatible
   groups are paired by a global assignment on name similarity, depth and order,
   and each pair becomes *one* rule — 5 rules to review, not 600 key pairs.
2. Prefix change. Template pairs that all differ by the same leading prefix
   (``encoder.`` → ``backbone.encoder.``) collapse into one ``{rest:*}`` rule.
3. Residual pairing of same-shape leftovers by name similarity, hierarchy and
   registration order, again solved globally per shape (Hungarian algorithm).

Confidence is the relative margin over the runner-up: ``1 - runner_up/score``.
A pairing with no compatible alternative scores 1.0; a tie scores 0 (AMBIGUOUS).
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field

from .ops import Spec

INCOMPATIBLE = 1e9


@dataclass
class Suggestion:
    src_pattern: str
    dst_pattern: str
    pairs: list[tuple[str, str]]
    confidence: float
    kind: str  # "template" | "prefix" | "pair"
    runner_up: str = ""

    def snippet(self) -> str:
        """Ready-to-paste TOML."""
        return (
            f"[[rules]]  # {self.kind}, confidence {self.confidence:.2f}\n"
            f"from = {json.dumps(self.src_pattern)}\nto = {json.dumps(self.dst_pattern)}\n"
        )

    def to_json(self) -> dict:
        return {
            "from": self.src_pattern,
            "to": self.dst_pattern,
            "kind": self.kind,
            "confidence": round(self.confidence, 4),
            "pairs": [list(p) for p in self.pairs],
            "runner_up": self.runner_up,
            "rule": self.snippet(),
        }


@dataclass
class _Group:
    template: str  # module path with "{}" for each index segment
    members: dict[tuple[str, str], tuple[tuple[str, ...], str]] = field(default_factory=dict)
    rank: float = 0.0  # position of its first key among the leftovers, 0..1


def suggest(src: dict[str, Spec], dst: dict[str, Spec]) -> list[Suggestion]:
    """Suggestions for unresolved source keys ``src`` against unresolved target keys ``dst``
    (both in registration order)."""
    templates, used_s, used_d = _template_pass(src, dst)
    out = _collapse_prefixes(templates, src)
    rest_s = {k: v for k, v in src.items() if k not in used_s}
    rest_d = {k: v for k, v in dst.items() if k not in used_d}
    return out + _residual_pass(rest_s, rest_d)


# ------------------------------------------------------------------ templates


def _split_key(key: str) -> tuple[str, tuple[str, ...], str] | None:
    parts = key.split(".")
    if len(parts) < 2 or "{" in key or "}" in key:
        return None
    mod = parts[:-1]
    idx = tuple(p for p in mod if p.isdigit())
    return ".".join("{}" if p.isdigit() else p for p in mod), idx, parts[-1]


def _groups(specs: dict[str, Spec]) -> dict[str, _Group]:
    groups: dict[str, _Group] = {}
    n = max(len(specs) - 1, 1)
    for pos, (key, spec) in enumerate(specs.items()):
        split = _split_key(key)
        if split is None:
            continue
        tmpl, idx, leaf = split
        g = groups.setdefault(tmpl, _Group(tmpl, rank=pos / n))
        g.members[(idx, leaf)] = (spec, key)
    return groups


def _group_sig(g: _Group) -> frozenset:
    return frozenset((idx, leaf, spec) for (idx, leaf), (spec, _k) in g.members.items())


def _group_score(a: _Group, b: _Group) -> float:
    name = difflib.SequenceMatcher(None, a.template, b.template).ratio()
    depth = 1.0 if a.template.count(".") == b.template.count(".") else 0.0
    return 0.3 * name + 0.5 * (1 - abs(a.rank - b.rank)) + 0.2 * depth


def _template_pass(src: dict[str, Spec], dst: dict[str, Spec]):
    gs = [g for g in _groups(src).values()]
    gd = [g for g in _groups(dst).values()]
    sig_s, sig_d = [_group_sig(g) for g in gs], [_group_sig(g) for g in gd]
    scores = [
        [_group_score(a, b) if sig_s[i] == sig_d[j] else None for j, b in enumerate(gd)]
        for i, a in enumerate(gs)
    ]
    out, used_s, used_d = [], set(), set()
    for i, j in _assign(scores):
        conf, runner = _confidence(scores, i, j, [g.template for g in gs], [g.template for g in gd])
        a, b = gs[i], gd[j]
        src_p, dst_p = _template_patterns(a.template, b.template)
        pairs = [(a.members[m][1], b.members[m][1]) for m in a.members]
        out.append(Suggestion(src_p, dst_p, pairs, conf, "template", runner))
        used_s.update(p[0] for p in pairs)
        used_d.update(p[1] for p in pairs)
    return out, used_s, used_d


def _template_patterns(ts: str, td: str) -> tuple[str, str]:
    names = iter("ijklmnab")
    src_names = []

    def fill_src(t: str) -> str:
        out = []
        for part in t.split("."):
            if part == "{}":
                name = next(names)
                src_names.append(name)
                out.append(f"{{{name}:int}}")
            else:
                out.append(part)
        return ".".join(out)

    src = fill_src(ts)
    it = iter(src_names)
    dst = ".".join(f"{{{next(it)}}}" if p == "{}" else p for p in td.split("."))
    return src + ".{p}", dst + ".{p}"


def _collapse_prefixes(templates: list[Suggestion], src: dict[str, Spec]) -> list[Suggestion]:
    """Template pairs sharing one prefix change become one ``{rest:*}`` rule, but only
    when that rule would claim exactly the keys they cover."""
    by_change: dict[tuple[str, str], list[Suggestion]] = {}
    for s in templates:
        a, b = s.src_pattern.split("."), s.dst_pattern.split(".")
        k = 0
        while k < min(len(a), len(b)) and a[-1 - k].replace(":int", "") == b[-1 - k]:
            k += 1
        pa, pb = ".".join(a[: len(a) - k]), ".".join(b[: len(b) - k])
        if pa and "{" not in pa and "{" not in pb and k > 1:
            by_change.setdefault((pa, pb), []).append(s)
    out = [s for s in templates]
    for (pa, pb), group in by_change.items():
        covered = {p[0] for s in group for p in s.pairs}
        claimed = {k for k in src if k.startswith(pa + ".")}
        if len(group) < 2 or covered != claimed:
            continue
        for s in group:
            out.remove(s)
        dst = f"{pb}.{{rest:*}}" if pb else "{rest:*}"
        pairs = [p for s in group for p in s.pairs]
        out.append(Suggestion(f"{pa}.{{rest:*}}", dst, pairs, min(s.confidence for s in group), "prefix"))
    return out


# ------------------------------------------------------------------ residual pairs


def _pair_score(a: str, b: str, ra: float, rb: float) -> float:
    name = difflib.SequenceMatcher(None, a, b).ratio()
    leaf = 1.0 if a.rsplit(".", 1)[-1] == b.rsplit(".", 1)[-1] else 0.0
    depth = 1.0 if a.count(".") == b.count(".") else 0.0
    return 0.3 * name + 0.2 * leaf + 0.1 * depth + 0.4 * (1 - abs(ra - rb))


def _residual_pass(src: dict[str, Spec], dst: dict[str, Spec]) -> list[Suggestion]:
    rank_s = _ranks(src)
    rank_d = _ranks(dst)
    out = []
    for spec in dict.fromkeys(src.values()):
        ks = [k for k, v in src.items() if v == spec and "{" not in k and "}" not in k]
        kd = [k for k, v in dst.items() if v == spec and "{" not in k and "}" not in k]
        if not ks or not kd:
            continue
        scores = [[_pair_score(a, b, rank_s[a], rank_d[b]) for b in kd] for a in ks]
        for i, j in _assign(scores):
            conf, runner = _confidence(scores, i, j, ks, kd)
            out.append(Suggestion(ks[i], kd[j], [(ks[i], kd[j])], conf, "pair", runner))
    return out


def _ranks(specs: dict[str, Spec]) -> dict[str, float]:
    n = max(len(specs) - 1, 1)
    return {k: i / n for i, k in enumerate(specs)}


def _confidence(scores, i: int, j: int, rows: list[str], cols: list[str]) -> tuple[float, str]:
    s = scores[i][j]
    best, name = 0.0, ""
    for jj, v in enumerate(scores[i]):
        if jj != j and v is not None and v > best:
            best, name = v, f"{rows[i]} → {cols[jj]}"
    for ii in range(len(scores)):
        v = scores[ii][j]
        if ii != i and v is not None and v > best:
            best, name = v, f"{rows[ii]} → {cols[j]}"
    conf = max(0.0, 1.0 - best / s) if s > 0 else 0.0
    return conf, name


# ------------------------------------------------------------------ assignment


def _assign(scores: list[list[float | None]]) -> list[tuple[int, int]]:
    """Maximum-score matching (None = not allowed), solved globally."""
    if not scores or not scores[0]:
        return []
    cost = [[INCOMPATIBLE if v is None else 1.0 - v for v in row] for row in scores]
    pairs = hungarian(cost)
    return [(i, j) for i, j in pairs if scores[i][j] is not None]


def hungarian(cost: list[list[float]]) -> list[tuple[int, int]]:
    """Minimum-cost assignment on a rectangular matrix (Kuhn–Munkres with potentials,
    O(n²m)); returns (row, col) pairs for min(n, m) rows/cols."""
    n, m = len(cost), len(cost[0])
    if n > m:
        return [(i, j) for j, i in hungarian([list(col) for col in zip(*cost, strict=False)])]
    inf = float("inf")
    u, v, p, way = [0.0] * (n + 1), [0.0] * (m + 1), [0] * (m + 1), [0] * (m + 1)
    for i in range(1, n + 1):
        p[0], j0 = i, 0
        minv, used = [inf] * (m + 1), [False] * (m + 1)
        while True:
            used[j0] = True
            i0, delta, j1 = p[j0], inf, 0
            row = cost[i0 - 1]
            for j in range(1, m + 1):
                if not used[j]:
                    cur = row[j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(m + 1):
                if used[j]:
                    u[p[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    return sorted((p[j] - 1, j - 1) for j in range(1, m + 1) if p[j])
