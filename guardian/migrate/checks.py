"""The checks a plan must pass before any byte is written, and the diagnoses that
turn a wall of mismatches into one sentence.

Each function takes the planner (``planner.Planner``) whose rows it checks and adds
issues or problems to it: outputs (injective, present in the target, same shape and
dtype), dead rules, tied weights, and "the target's configuration differs".
"""

from __future__ import annotations

import difflib
import math
from collections import Counter
from typing import Any

from . import ops as ops_mod
from .ops import Spec
from .plan import Entry, Issue


def check_outputs(p: Any) -> None:
    """Injectivity first (on every row), then each row against the target."""
    counts = Counter(d for e in p.entries for d in e.dsts)
    for dst, n in counts.items():
        if n > 1:
            who = [f"{e.srcs} ({e.rule})" for e in p.entries if dst in e.dsts]
            p.problems.append(f"not injective: {dst!r} would be written {n} times, from " + "; ".join(who))
    p.entries = [e for e in p.entries if not _check_entry(p, e)]


def _check_entry(p: Any, e: Entry) -> bool:
    if e.status == "MISSING-EXPECTED":
        return False
    for dst, spec in zip(e.dsts, e.dst_specs, strict=False):
        if dst not in p.tspecs:
            close = difflib.get_close_matches(dst, list(p.tspecs), n=1, cutoff=0.6)
            hint = (
                f"did you mean {close[0]!r}? fix the rule's 'to'" if close else "fix the rule's 'to' pattern"
            )
            p.issues.append(
                Issue(
                    "UNEXPECTED",
                    e.srcs,
                    [dst],
                    e.rule,
                    f"{e.rule} writes {dst!r}, which the target does not have",
                    hint,
                )
            )
            return True
        if spec != p.tspecs[dst]:
            p.issues.append(
                Issue(
                    "MISMATCH",
                    e.srcs,
                    [dst],
                    e.rule,
                    f"{dst}: source gives {fmt_spec(spec)}, target wants {fmt_spec(p.tspecs[dst])}",
                    mismatch_hint(e.srcs[0] if e.srcs else dst, dst, spec, p.tspecs[dst]),
                )
            )
            return True
    return False


def check_dead_rules(p: Any) -> None:
    for rule in p.rules.rules:
        if not p.hits[rule.label]:
            p.problems.append(
                f"dead rule: {rule.describe()} matched no key; a dead rule usually hides a typo — fix or remove it"
            )
    for em in p.rules.expect_missing:
        if not p.hits[em.label]:
            p.problems.append(
                f"dead rule: {em.label} pattern {em.pattern.text!r} matched no missing target key; remove it"
            )


def check_tied(p: Any, values: Any) -> None:
    by_dst = {d: e for e in p.entries for d in e.dsts}
    for group in getattr(p.target, "tied", []):
        feeds: list[Entry] = [by_dst[d] for d in group if d in by_dst]
        if len(feeds) < len(group):  # a tied tensor that no row writes: nothing to compare
            continue
        sigs = {(tuple(f.srcs), repr(f.ops), f.dsts.index(d)) for f, d in zip(feeds, group, strict=False)}
        if len(sigs) == 1 or (values is not None and _same_values(values, feeds, group)):
            continue
        p.problems.append(
            f"tied weights: the target shares one tensor between {group}, but the migrated values differ "
            f"({'; '.join(f'{d} ← {f.srcs}' for f, d in zip(feeds, group, strict=False))}); map them from the same source tensor"
        )


def diagnose(p: Any) -> list[str]:
    n = len(p.identity_mismatch)
    if n < 2 or p.identity_matched < 0.5 * len(p.tspecs):  # most names must match
        return []
    ratios: set[float] = set()
    for _k, (a, _), (b, _) in p.identity_mismatch:
        if len(a) == len(b):
            ratios.update(round(y / x, 3) for x, y in zip(a, b, strict=False) if x != y and x)
    key, (a, _), (b, _) = p.identity_mismatch[0]
    factor = f"; every differing dimension changes by ×{ratios.pop():g}" if len(ratios) == 1 else ""
    return [
        f"the target's configuration differs: {n} of {p.identity_matched} tensors with matching names "
        f"have different shapes (e.g. {key}: {list(a)} → {list(b)}){factor}. Build the target with the "
        "source's configuration (width, depth, vocabulary), or migrate to a target of that configuration."
    ]


def _same_values(values: Any, feeds: list[Entry], group: list[str]) -> bool:
    import torch

    outs = []
    for f, d in zip(feeds, group, strict=False):
        outs.append(ops_mod.run(f.ops, [values[s] for s in f.srcs])[f.dsts.index(d)])
    return all(torch.equal(outs[0], o) for o in outs[1:])


def mismatch_hint(src: str, dst: str, a: Spec, b: Spec) -> str:
    """A concrete op that would fix the mismatch, when one is evident."""
    (sa, da), (sb, db) = a, b
    if sa == sb and da != db:
        return f'add ops = [{{op = "cast", dtype = "{db}"}}] to a rule for {src}'
    if len(sa) == 2 and tuple(reversed(sa)) == sb:
        return (
            f'transposed: [[rules]] from = "{src}" to = "{dst}" ops = [{{op = "transpose", dims = [0, 1]}}]'
        )
    if math.prod(sa) == math.prod(sb):
        return f'same element count: ops = [{{op = "reshape", shape = {list(sb)}}}]'
    if len(sa) == len(sb) and sa[1:] == sb[1:] and sa:
        if sb[0] > sa[0]:
            return f'{sb[0] - sa[0]} more rows (vocabulary grew?): ops = [{{op = "pad_rows", rows = {sb[0] - sa[0]}}}]'
        return f'{sa[0] - sb[0]} fewer rows: ops = [{{op = "slice_rows", start = 0, stop = {sb[0]}}}], lossy = true'
    return "different architecture here; drop the source key and let the new model initialise it (expect_missing)"


def fmt_spec(spec: Spec) -> str:
    return f"{list(spec[0])} {spec[1]}"
