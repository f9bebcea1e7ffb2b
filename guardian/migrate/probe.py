"""Numeric fingerprints: when names and structure leave layers tied, run the models.

Two layers of the same shape whose names share nothing (``a``, ``b`` → ``y``, ``x``)
cannot be told apart by any reading of the keys. Given the old model's factory, the
new model's factory and a probe input (``--numeric``), they can: the old model with
the old weights fixes the output, and of the ways to assign the tied layers only the
right one makes the new model reproduce it. ``resolve_ties`` tries every assignment
of the undecided rows (a bounded number of forward passes) and returns rules only
when *exactly one* assignment matches — two matching assignments are a symmetry the
probe cannot break, and then nothing is decided.

The rules it returns carry their reason in ``why`` and become ordinary rules of the
plan, so the report, the plan file and the output's provenance all show them.
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import Any

from .plan import Plan

log = logging.getLogger(__name__)

MAX_TRIALS = 720  # forward passes of the new model, at most


def resolve_ties(
    plan: Plan, source_model: dict[str, Any], target: Any, numeric: dict[str, Any]
) -> list[dict]:
    """Rules for the plan's undecided template/pair suggestions, or ``[]``."""
    classes = _classes(plan)
    if not classes or plan.problems or not target.factory:
        return []
    trials = math.prod(math.factorial(len(c)) for c in classes)
    if trials > MAX_TRIALS:
        log.info("numeric tie-break skipped: %d assignments to try (limit %d)", trials, MAX_TRIALS)
        return []
    runner = _Runner(plan, source_model, target, numeric)
    matches = []
    for choice in itertools.product(*(itertools.permutations(c) for c in classes)):
        rules = [
            {"from": s.rules[0]["from"], "to": d.rules[0]["to"]}
            for cls, perm in zip(classes, choice, strict=True)
            for s, d in zip(cls, perm, strict=True)
        ]
        diff = runner.diff(rules)
        if diff is not None and diff <= runner.atol:
            matches.append((rules, diff))
        if len(matches) > 1:
            return []  # the probe cannot break this symmetry
    if len(matches) != 1:
        return []
    rules, diff = matches[0]
    why = f"decided numerically: the only assignment of tied layers that reproduces the old outputs (max diff {diff:g})"
    return [r | {"why": why} for r in rules]


def _classes(plan: Plan) -> list[list[Any]]:
    """Undecided suggestions grouped by what they carry (leaf names, shapes, dtypes):
    within a group any source may be any target's."""
    groups: dict[tuple, list[Any]] = {}
    for s in plan.suggestions:
        decided = not s.undecided and s.confidence >= plan.threshold
        if (
            decided
            or s.kind not in ("template", "pair", "prefix")
            or len(s.rules) != 1
            or "index_map" in s.rules[0]
        ):
            continue
        sig = tuple(
            sorted(
                (t.rsplit(".", 1)[-1], tuple(plan.dst_specs[t][0]), plan.dst_specs[t][1]) for _, t in s.pairs
            )
        )
        groups.setdefault(sig, []).append(s)
    return list(groups.values())


class _Runner:
    """Plans one candidate assignment, migrates the weights in memory, runs the model."""

    def __init__(
        self, plan: Plan, source_model: dict[str, Any], target: Any, numeric: dict[str, Any]
    ) -> None:
        import torch

        from .verify import instantiate, probe_input

        self.plan, self.source_model, self.target = plan, source_model, target
        self.atol = float(numeric.get("atol", 1e-6))
        self.x = probe_input(tuple(numeric["input_shape"]), numeric.get("seed", 0), numeric.get("input_high"))
        with torch.no_grad():
            self.expected = instantiate(numeric["old"], source_model)(self.x)

    def diff(self, extra_rules: list[dict]) -> float | None:
        import torch

        from .apply import migrate_model
        from .planner import make_plan
        from .rules import parse_rules
        from .verify import instantiate

        doc = dict(self.plan.rules)
        doc["rules"] = list(doc.get("rules", [])) + extra_rules
        try:
            trial = make_plan(
                dict(self.plan.src_specs),
                self.target,
                parse_rules(doc),
                source=self.plan.source,
                auto=True,
                threshold=self.plan.threshold,
            )
        except ValueError:
            return None
        if trial.blocked:
            return None
        model = migrate_model(self.source_model, trial.entries, list(trial.dst_specs))
        try:
            with torch.no_grad():
                out = instantiate(self.target.factory, model)(self.x)
        except (RuntimeError, ValueError, KeyError):
            return None
        return float((out - self.expected).abs().max()) if out.shape == self.expected.shape else None
