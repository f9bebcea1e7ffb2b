"""Planning: from source keys, a target and rules to a reviewed, checkable plan.

Stages, each seeing only what the earlier ones left (a key is claimed once):

    wrappers   strip module./_orig_mod./FSDP/checkpoint wrapper segments where the
               target confirms it (or every source key is wrapped and no target key is)
    rules      user rules, first match wins; each claim is proven invertible
    identity   same name in the target
    expected   [[expect_missing]] target keys the new model initialises
    auto       suggestions (structure → fusions → prefix → pairs); applied only with
               ``auto`` and at or above the confidence threshold — ties and
               undecided fusions never, unless ``accept_guesses`` — otherwise reported

Then the checks of checks.py, all before any byte is written. Planning is
torch-free except for the optional tied-weight value comparison.
"""

from __future__ import annotations

import difflib
from collections import Counter
from typing import Any

from . import checks
from . import ops as ops_mod
from .auto import Suggestion, suggest
from .checks import fmt_spec as _fmt
from .errors import RulesError
from .ops import Spec
from .patterns import IndexArithmeticError
from .plan import DEFAULT_THRESHOLD, Entry, Issue, Plan
from .rules import Rule, Rules, rule_snippet
from .wrappers import ANYWHERE_WRAPPERS, LEADING_WRAPPERS, wrapper_names


class Planner:
    """Holds the working state of one planning run (claims, hits, rows)."""

    def __init__(self, src: dict[str, Spec], target: Any, rules: Rules, ordered: bool = True) -> None:
        self.src, self.target, self.rules, self.ordered = src, target, rules, ordered
        self.tspecs: dict[str, Spec] = dict(target.specs)
        self.work = wrapper_names(list(src), self.tspecs)
        self.orig = {w: k for k, w in self.work.items()}
        self.claimed: set[str] = set()  # source keys
        self.produced: set[str] = set()  # target keys
        self.hits: Counter[str] = Counter()
        self.entries: list[Entry] = []
        self.issues: list[Issue] = []
        self.problems: list[str] = []
        self.identity_matched = 0
        self.identity_mismatch: list[tuple[str, Spec, Spec]] = []
        self.applied: list[dict[str, Any]] = []
        self.guesses: list[dict[str, Any]] = []

    def wrapper_label(self, k: str) -> str:
        w = self.work[k]
        if w == k:
            return ""
        gone = [p for p in k.split(".") if p in LEADING_WRAPPERS + ANYWHERE_WRAPPERS]
        return "wrapper " + ("-" + "/".join(dict.fromkeys(gone)) if gone else f"{k} → {w}")

    # ---------------------------------------------------------- rules
    def run_rules(self) -> None:
        for k in self.src:
            if k in self.claimed:
                continue
            for rule in self.rules.rules:
                try:
                    got = rule.claim(self.work[k])
                except IndexArithmeticError as e:
                    self.hits[rule.label] += 1
                    self.problems.append(f"{rule.describe()}: cannot map {self.work[k]!r}: {e}")
                    break
                if got is not None:
                    self.hits[rule.label] += 1
                    self._apply_rule(rule, k, got)
                    break

    def _apply_rule(self, rule: Rule, k: str, got: tuple[list[str], list[str]]) -> None:
        srcs_w, dsts = got
        srcs = [self.orig.get(w, w) for w in srcs_w]
        absent = [s for s in srcs if s not in self.src]
        taken = [s for s in srcs if s in self.claimed]
        if absent or taken:
            what = f"{absent} are not in the source" if absent else f"{taken} were already claimed"
            self.problems.append(f"{rule.describe()}: claims {srcs_w[0]!r} but {what}")
            self.claimed.update(s for s in srcs if s in self.src)
            return
        self.claimed.update(srcs)
        label = " + ".join(x for x in (self.wrapper_label(k), rule.describe()) if x)
        if rule.drop is not None:
            self.entries.append(
                Entry(
                    "DROPPED",
                    srcs,
                    [],
                    label,
                    inverse_ops=None,
                    reason=rule.drop,
                    src_specs=[self.src[s] for s in srcs],
                )
            )
            return
        back = _unclaim(rule, dsts[0])
        if back != srcs_w[0]:
            fix = (
                "fix inverse_regex/inverse_to"
                if rule.regex is not None
                else "write indices without leading zeros"
            )
            self.problems.append(
                f"{rule.describe()}: not invertible on {srcs_w[0]!r}: maps to {dsts[0]!r}, whose inverse is "
                f"{back!r}; {fix}"
            )
        self._transform_entry(rule, srcs, dsts, label)

    def _transform_entry(self, rule: Rule, srcs: list[str], dsts: list[str], label: str) -> None:
        specs = [self.src[s] for s in srcs]
        try:
            out, inv = ops_mod.chain(rule.ops, specs, rule.describe())
        except RulesError as e:
            self.issues.append(Issue("MISMATCH", srcs, dsts, label, str(e), "fix the op's parameters"))
            self.produced.update(dsts)
            return
        if len(out) != len(dsts):
            self.problems.append(
                f"{rule.describe()}: ops produce {len(out)} tensors for {len(dsts)} 'to' keys"
            )
            return
        if inv is None and not rule.lossy:
            self.problems.append(
                f"{rule.describe()}: op {ops_mod.describe(rule.ops)} loses information on {srcs[0]!r} "
                "(it cannot be reverted); add `lossy = true` to the rule if that is intended"
            )
        status = "TRANSFORMED" if rule.ops else ("UNCHANGED" if srcs == dsts else "RENAMED")
        self.entries.append(Entry(status, srcs, dsts, label, list(rule.ops), inv, specs, out))

    # ---------------------------------------------------------- identity & expected
    def run_identity(self) -> None:
        for k in self.src:
            w = self.work[k]
            if k in self.claimed or w not in self.tspecs:
                continue
            self.claimed.add(k)
            self.identity_matched += 1
            if self.src[k] != self.tspecs[w]:
                self.identity_mismatch.append((w, self.src[k], self.tspecs[w]))
            status = "UNCHANGED" if w == k else "RENAMED"
            self.entries.append(
                Entry(
                    status,
                    [k],
                    [w],
                    self.wrapper_label(k) or "same name",
                    [],
                    [],
                    [self.src[k]],
                    [self.src[k]],
                )
            )

    def run_expected(self) -> None:
        self.produced.update(d for e in self.entries for d in e.dsts)
        for t, spec in self.tspecs.items():
            if t in self.produced:
                continue
            for em in self.rules.expect_missing:
                if em.pattern.match(t) is not None:
                    self.hits[em.label] += 1
                    self.produced.add(t)
                    self.entries.append(
                        Entry(
                            "MISSING-EXPECTED",
                            [],
                            [t],
                            em.label,
                            inverse_ops=None,
                            dst_specs=[spec],
                            reason=em.why,
                            init=em.init,
                        )
                    )
                    break

    # ---------------------------------------------------------- auto
    def run_auto(self, auto: bool, threshold: float, accept_guesses: bool) -> list[Suggestion]:
        """Suggestions for what is left. With ``auto``, confident ones become rows; with
        ``accept_guesses`` too, every other one becomes a GUESSED row and is listed in
        ``self.guesses``; otherwise each is an issue that blocks the plan."""
        left_s = {self.work[k]: self.src[k] for k in self.src if k not in self.claimed}
        left_t = {t: s for t, s in self.tspecs.items() if t not in self.produced}
        suggestions = suggest(left_s, left_t, ordered=self.ordered)
        for s in suggestions:
            confident = not s.undecided and s.confidence >= threshold
            if auto and (confident or accept_guesses):
                (self.applied if confident else self.guesses).append(s.to_json() | _why_guess(s, threshold))
                self._rows_from(s, "RENAMED" if confident else "GUESSED")
            else:
                self._issues_from(s, threshold)
            for srcs, dsts, _ops in s.rows():
                self.claimed.update(self.orig.get(w, w) for w in srcs)
                self.produced.update(dsts)
        return suggestions

    def _rows_from(self, s: Suggestion, status: str) -> None:
        for srcs_w, dsts, ops in s.rows():
            srcs = [self.orig.get(w, w) for w in srcs_w]
            label = " + ".join(
                x
                for x in (self.wrapper_label(srcs[0]), f"auto {s.kind}: {s.src_pattern} → {s.dst_pattern}")
                if x
            )
            specs = [self.src[k] for k in srcs]
            out, inv = ops_mod.chain(ops, specs, label) if ops else (specs, [])
            row_status = "TRANSFORMED" if ops and status != "GUESSED" else status
            self.entries.append(
                Entry(row_status, srcs, dsts, label, list(ops), inv, specs, out, confidence=s.confidence)
            )

    def _issues_from(self, s: Suggestion, threshold: float) -> None:
        """SUGGESTED rows carry a ready-to-paste rule (the unique best candidate);
        AMBIGUOUS rows (ties, unknown fusion orders) name the candidates and no rule."""
        group = f"{s.src_pattern} → {s.dst_pattern}"
        for srcs_w, dsts, _ops in s.rows():
            shown = f"{' + '.join(srcs_w)} → {' + '.join(dsts)}"
            if s.undecided:
                rivals = "; ".join(s.tied[:4]) or s.runner_up
                msg = s.message or f"{shown} is only one of several equally good fits"
                msg += f" (tied with {rivals})" if rivals and not s.message else ""
                hint = "no single rule fits the evidence: write the right one yourself (rules file)"
                status = "AMBIGUOUS"
            else:
                msg = f"looks like {shown} (confidence {s.confidence:.2f} < threshold {threshold:.2f}"
                msg += f"; runner-up {s.runner_up})" if s.runner_up else ")"
                hint, status = s.snippet(), "SUGGESTED"
            srcs = [self.orig.get(w, w) for w in srcs_w]
            self.issues.append(
                Issue(status, srcs, dsts, f"auto {s.kind}", msg, hint, s.confidence, group=group)
            )

    def run_leftovers(self) -> None:
        left_t = [t for t in self.tspecs if t not in self.produced]
        for k in self.src:
            if k in self.claimed:
                continue
            w = self.work[k]
            close = difflib.get_close_matches(w, left_t, n=1, cutoff=0.6)
            hint = (
                f"map it: {rule_snippet(w, close[0]).strip()}"
                if close
                else f'drop it: [[rules]] from = "{w}" drop = "why it is no longer needed"'
            )
            self.issues.append(
                Issue("UNEXPECTED", [k], [], "", f"{k} {_fmt(self.src[k])} has no place in the target", hint)
            )
        for t in left_t:
            hint = f'if the new model initialises it: [[expect_missing]] pattern = "{t}"'
            self.issues.append(
                Issue(
                    "MISSING", [], [t], "", f"{t} {_fmt(self.tspecs[t])} is not provided by the source", hint
                )
            )


def _unclaim(rule: Rule, dst: str) -> str | None:
    try:
        return rule.unclaim(dst)
    except IndexArithmeticError:
        return None


def _why_guess(s: Suggestion, threshold: float) -> dict[str, Any]:
    if s.undecided:
        return {"guess": "tie" if s.rules or s.tied else "undecided"}
    return {"guess": f"confidence {s.confidence:.2f} below threshold {threshold:.2f}"}


def make_plan(
    src_specs: dict[str, Spec],
    target: Any,
    rules: Rules,
    *,
    source: dict[str, Any] | None = None,
    auto: bool = False,
    threshold: float = DEFAULT_THRESHOLD,
    values: Any = None,
    accept_guesses: bool = False,
) -> Plan:
    """Plan a migration of ``src_specs`` (name → (shape, dtype), in order) to ``target``.

    ``accept_guesses`` (with ``auto``) applies suggestions below the threshold and ties
    too, as GUESSED rows listed in ``plan.guesses`` — the plan is then never "clean".
    ``values`` (name → tensor) lets the tied-weight check compare contents when two
    tied target keys are fed from different source keys.
    """
    info = source or {}
    ordered = bool(info.get("ordered", info.get("kind") != "safetensors"))  # a tensor file is sorted
    p = Planner(dict(src_specs), target, rules, ordered)
    p.run_rules()
    p.run_identity()
    p.run_expected()
    suggestions = p.run_auto(auto, threshold, accept_guesses)
    p.run_leftovers()
    checks.check_outputs(p)
    checks.check_dead_rules(p)
    checks.check_tied(p, values)
    plan = Plan(
        source=dict(source or {}),
        target={
            "description": target.description,
            "factory": target.factory,
            "checkpoint": getattr(target, "checkpoint", None),
        },
        rules=rules.to_json(),
        entries=p.entries,
        issues=p.issues,
        problems=p.problems,
        suggestions=suggestions,
        applied=p.applied,
        guesses=p.guesses,
        diagnosis=checks.diagnose(p),
        src_specs=dict(src_specs),
        dst_specs=dict(target.specs),
        target_params=list(target.params),
        auto=auto,
        threshold=threshold,
        accept_guesses=accept_guesses,
    )
    return plan
