"""Planning: from source keys, a target and rules to a reviewed, checkable plan.

Stages, each seeing only what the earlier ones left (a key is claimed once):

    wrappers   strip module./_orig_mod./FSDP/checkpoint wrapper segments where the
               target confirms it (or every source key is wrapped and no target key is)
    rules      user rules, first match wins
    identity   same name in the target
    expected   [[expect_missing]] target keys the new model initialises
    auto       suggestions (template → prefix → pairs); applied only with ``auto``
               and at or above the confidence threshold, otherwise reported

Then the checks, all before any byte is written: every output key exists in the
target with the same shape and dtype, no target key is produced twice (injective),
every target key is resolved, every source key is used or dropped, every rule
claimed something, tied target weights receive equal values, and lossy ops were
declared. A plan with any issue or problem is *blocked*.

Planning is torch-free except for the optional tied-weight value comparison.
"""

from __future__ import annotations

import difflib
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from . import ops as ops_mod
from .auto import Suggestion, suggest
from .errors import InputRejectedError, RulesError
from .ops import Spec
from .rules import Rule, Rules, parse_rules, rule_snippet

PLAN_FORMAT = "guardian.migrate.plan/1"
DEFAULT_THRESHOLD = 0.8
OK_STATUSES = ("UNCHANGED", "RENAMED", "TRANSFORMED", "DROPPED", "MISSING-EXPECTED")
ISSUE_STATUSES = ("MISMATCH", "MISSING", "UNEXPECTED", "AMBIGUOUS", "SUGGESTED")
LEADING_WRAPPERS = ("module", "_orig_mod")
ANYWHERE_WRAPPERS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


@dataclass
class Entry:
    """One resolved row: ``srcs`` → ``dsts`` through ``ops``. ``inverse_ops`` is None
    when the row cannot be undone exactly (lossy op, drop)."""

    status: str
    srcs: list[str]
    dsts: list[str]
    rule: str
    ops: list[dict[str, Any]] = field(default_factory=list)
    inverse_ops: list[dict[str, Any]] | None = field(default_factory=list)
    src_specs: list[Spec] = field(default_factory=list)
    dst_specs: list[Spec] = field(default_factory=list)
    reason: str = ""
    confidence: float | None = None
    init: str | None = None

    @property
    def lossy(self) -> bool:
        return self.inverse_ops is None and self.status != "MISSING-EXPECTED"


@dataclass
class Issue:
    """An unresolved row; its presence blocks the plan."""

    status: str
    srcs: list[str]
    dsts: list[str]
    rule: str
    message: str
    hint: str = ""
    confidence: float | None = None
    group: str = ""


@dataclass
class Plan:
    source: dict[str, Any]
    target: dict[str, Any]
    rules: dict[str, Any]
    entries: list[Entry] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    suggestions: list[Suggestion] = field(default_factory=list)
    applied: list[dict[str, Any]] = field(default_factory=list)
    diagnosis: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    src_specs: dict[str, Spec] = field(default_factory=dict)
    dst_specs: dict[str, Spec] = field(default_factory=dict)
    target_params: list[str] = field(default_factory=list)
    auto: bool = False
    threshold: float = DEFAULT_THRESHOLD

    @property
    def blocked(self) -> bool:
        return bool(self.issues or self.problems)

    @property
    def lossy(self) -> bool:
        return any(e.lossy for e in self.entries)

    def inverse(self) -> list[Entry]:
        """Entries that undo this plan (lossy rows are skipped; check ``lossy`` first)."""
        out = []
        for e in self.entries:
            if e.status == "MISSING-EXPECTED":
                out.append(
                    Entry(
                        "DROPPED",
                        e.dsts,
                        [],
                        f"inverse of {e.rule}",
                        reason="added by the migration",
                        inverse_ops=None,
                        src_specs=e.dst_specs,
                    )
                )
            elif not e.lossy:
                status = "UNCHANGED" if e.status == "UNCHANGED" else e.status
                out.append(
                    Entry(
                        status,
                        e.dsts,
                        e.srcs,
                        f"inverse of {e.rule}",
                        list(e.inverse_ops or []),
                        list(e.ops),
                        e.dst_specs,
                        e.src_specs,
                    )
                )
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "source": self.source,
            "target": self.target,
            "rules": self.rules,
            "auto": self.auto,
            "threshold": self.threshold,
            "applied_suggestions": self.applied,
            "entries": [_entry_json(e) for e in self.entries],
            "inverse": [_entry_json(e) for e in self.inverse()],
            "lossy": self.lossy,
            "blocked": self.blocked,
            "issues": [asdict(i) for i in self.issues],
            "problems": list(self.problems),
            "diagnosis": list(self.diagnosis),
            "notes": list(self.notes),
            "src_specs": {k: [list(s), d] for k, (s, d) in self.src_specs.items()},
            "dst_specs": {k: [list(s), d] for k, (s, d) in self.dst_specs.items()},
            "target_params": list(self.target_params),
        }


def _entry_json(e: Entry) -> dict[str, Any]:
    d = asdict(e)
    d["src_specs"] = [[list(s), t] for s, t in e.src_specs]
    d["dst_specs"] = [[list(s), t] for s, t in e.dst_specs]
    return d


def plan_from_json(obj: Any, what: str = "plan") -> Plan:
    """Rebuild a plan written by ``Plan.to_json`` (format checked, rules recompiled)."""
    if not isinstance(obj, dict) or obj.get("format") != PLAN_FORMAT:
        raise InputRejectedError(f"{what}: not a guardian migration plan (format {PLAN_FORMAT!r} expected)")
    try:
        parse_rules(obj["rules"], what)  # a tampered rule set must still compile
        plan = Plan(
            source=dict(obj["source"]),
            target=dict(obj["target"]),
            rules=obj["rules"],
            auto=bool(obj.get("auto")),
            threshold=float(obj.get("threshold", DEFAULT_THRESHOLD)),
        )
        plan.entries = [_entry_from(e) for e in obj["entries"]]
        plan.issues = [Issue(**i) for i in obj.get("issues", [])]
        plan.problems = [str(p) for p in obj.get("problems", [])]
        plan.applied = list(obj.get("applied_suggestions", []))
        plan.diagnosis = [str(p) for p in obj.get("diagnosis", [])]
        plan.notes = [str(p) for p in obj.get("notes", [])]
        plan.src_specs = {k: (tuple(s), d) for k, (s, d) in obj.get("src_specs", {}).items()}
        plan.dst_specs = {k: (tuple(s), d) for k, (s, d) in obj.get("dst_specs", {}).items()}
        plan.target_params = [str(p) for p in obj.get("target_params", [])]
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, InputRejectedError):
            raise
        raise InputRejectedError(f"{what}: malformed plan ({type(e).__name__}: {e})") from e
    return plan


def _entry_from(d: dict[str, Any]) -> Entry:
    e = Entry(**d)
    for op in e.ops:
        ops_mod.validate(op, e.rule)
    e.src_specs = [(tuple(s), t) for s, t in e.src_specs]
    e.dst_specs = [(tuple(s), t) for s, t in e.dst_specs]
    return e


# ============================================================== planning


def strip_wrappers(key: str) -> str:
    parts = key.split(".")
    while len(parts) > 1 and parts[0] in LEADING_WRAPPERS:
        parts = parts[1:]
    kept = [p for p in parts if p not in ANYWHERE_WRAPPERS]
    return ".".join(kept) if kept else key


def _wrapper_names(src: list[str], target: dict[str, Spec]) -> dict[str, str]:
    """Source key → the name the rules see (wrappers stripped where confirmed)."""
    canon_t: dict[str, list[str]] = {}
    for t in target:
        canon_t.setdefault(strip_wrappers(t), []).append(t)
    target_clean = all(strip_wrappers(t) == t for t in target)
    all_wrapped = bool(src) and all(strip_wrappers(k) != k for k in src)
    out = {}
    for k in src:
        s = strip_wrappers(k)
        if k in target or s == k and len(canon_t.get(s, [])) != 1:
            out[k] = k
        elif s != k and (s in target or (all_wrapped and target_clean)):
            out[k] = s
        elif len(canon_t.get(s, [])) == 1:
            out[k] = canon_t[s][0]
        else:
            out[k] = k
    return out


class _Planner:
    """Holds the working state of one planning run (claims, hits, rows)."""

    def __init__(self, src: dict[str, Spec], target: Any, rules: Rules) -> None:
        self.src, self.target, self.rules = src, target, rules
        self.tspecs: dict[str, Spec] = dict(target.specs)
        self.work = _wrapper_names(list(src), self.tspecs)
        self.orig = {w: k for k, w in self.work.items()}
        self.claimed: set[str] = set()  # source keys
        self.produced: set[str] = set()  # target keys
        self.hits: Counter[str] = Counter()
        self.entries: list[Entry] = []
        self.issues: list[Issue] = []
        self.problems: list[str] = []
        self.identity_matched = 0
        self.identity_mismatch: list[tuple[str, Spec, Spec]] = []

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
                got = rule.claim(self.work[k])
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
        if rule.regex is not None and rule.regex.unmap(dsts[0]) != srcs_w[0]:
            self.problems.append(
                f"{rule.describe()}: not invertible on {srcs_w[0]!r}: maps to {dsts[0]!r}, whose inverse is "
                f"{rule.regex.unmap(dsts[0])!r}; fix inverse_regex/inverse_to"
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
    def run_auto(self, auto: bool, threshold: float) -> tuple[list[Suggestion], list[dict]]:
        left_s = {self.work[k]: self.src[k] for k in self.src if k not in self.claimed}
        left_t = {t: s for t, s in self.tspecs.items() if t not in self.produced}
        suggestions = suggest(left_s, left_t)
        applied = []
        for s in suggestions:
            if auto and s.confidence >= threshold:
                applied.append(s.to_json())
                for w, t in s.pairs:
                    k = self.orig.get(w, w)
                    rule = " + ".join(
                        x
                        for x in (self.wrapper_label(k), f"auto {s.kind}: {s.src_pattern} → {s.dst_pattern}")
                        if x
                    )
                    self.entries.append(
                        Entry(
                            "RENAMED",
                            [k],
                            [t],
                            rule,
                            [],
                            [],
                            [self.src[k]],
                            [self.src[k]],
                            confidence=s.confidence,
                        )
                    )
            else:
                status = "AMBIGUOUS" if s.confidence <= 0.0 else "SUGGESTED"
                for w, t in s.pairs:
                    msg = f"looks like {w} → {t} (confidence {s.confidence:.2f}"
                    msg += f"; runner-up {s.runner_up})" if s.runner_up else ")"
                    hint = (
                        s.snippet()
                        if s.confidence > 0
                        else f"several targets fit equally well; write a rule:\n{rule_snippet(w, t)}"
                    )
                    self.issues.append(
                        Issue(
                            status,
                            [self.orig.get(w, w)],
                            [t],
                            f"auto {s.kind}",
                            msg,
                            hint,
                            s.confidence,
                            group=f"{s.src_pattern} → {s.dst_pattern}",
                        )
                    )
            for w, t in s.pairs:
                self.claimed.add(self.orig.get(w, w))
                self.produced.add(t)
        return suggestions, applied

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

    # ---------------------------------------------------------- checks
    def check_outputs(self) -> None:
        """Injectivity first (on every row), then each row against the target."""
        counts = Counter(d for e in self.entries for d in e.dsts)
        for dst, n in counts.items():
            if n > 1:
                who = [f"{e.srcs} ({e.rule})" for e in self.entries if dst in e.dsts]
                self.problems.append(
                    f"not injective: {dst!r} would be written {n} times, from " + "; ".join(who)
                )
        self.entries = [e for e in self.entries if not self._check_entry(e)]

    def _check_entry(self, e: Entry) -> bool:
        if e.status == "MISSING-EXPECTED":
            return False
        for dst, spec in zip(e.dsts, e.dst_specs, strict=False):
            if dst not in self.tspecs:
                close = difflib.get_close_matches(dst, list(self.tspecs), n=1, cutoff=0.6)
                hint = (
                    f"did you mean {close[0]!r}? fix the rule's 'to'"
                    if close
                    else "fix the rule's 'to' pattern"
                )
                self.issues.append(
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
            if spec != self.tspecs[dst]:
                self.issues.append(
                    Issue(
                        "MISMATCH",
                        e.srcs,
                        [dst],
                        e.rule,
                        f"{dst}: source gives {_fmt(spec)}, target wants {_fmt(self.tspecs[dst])}",
                        mismatch_hint(e.srcs[0] if e.srcs else dst, dst, spec, self.tspecs[dst]),
                    )
                )
                return True
        return False

    def check_dead_rules(self) -> None:
        for rule in self.rules.rules:
            if not self.hits[rule.label]:
                self.problems.append(
                    f"dead rule: {rule.describe()} matched no key; a dead rule usually hides a typo — fix or remove it"
                )
        for em in self.rules.expect_missing:
            if not self.hits[em.label]:
                self.problems.append(
                    f"dead rule: {em.label} pattern {em.pattern.text!r} matched no missing target key; remove it"
                )

    def check_tied(self, values: Any) -> None:
        by_dst = {d: e for e in self.entries for d in e.dsts}
        for group in getattr(self.target, "tied", []):
            feeds = [by_dst.get(d) for d in group]
            if any(f is None for f in feeds):
                continue
            sigs = {(tuple(f.srcs), repr(f.ops), f.dsts.index(d)) for f, d in zip(feeds, group, strict=False)}
            if len(sigs) == 1 or (values is not None and _same_values(values, feeds, group)):
                continue
            self.problems.append(
                f"tied weights: the target shares one tensor between {group}, but the migrated values differ "
                f"({'; '.join(f'{d} ← {f.srcs}' for f, d in zip(feeds, group, strict=False))}); map them from the same source tensor"
            )

    def diagnose(self) -> list[str]:
        n = len(self.identity_mismatch)
        if n < 2 or self.identity_matched < 0.5 * len(self.tspecs):  # most names must match
            return []
        ratios = set()
        for _k, (a, _), (b, _) in self.identity_mismatch:
            if len(a) == len(b):
                ratios.update(round(y / x, 3) for x, y in zip(a, b, strict=False) if x != y and x)
        key, (a, _), (b, _) = self.identity_mismatch[0]
        factor = f"; every differing dimension changes by ×{ratios.pop():g}" if len(ratios) == 1 else ""
        return [
            f"the target's configuration differs: {n} of {self.identity_matched} tensors with matching names "
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


def _fmt(spec: Spec) -> str:
    return f"{list(spec[0])} {spec[1]}"


def make_plan(
    src_specs: dict[str, Spec],
    target: Any,
    rules: Rules,
    *,
    source: dict[str, Any] | None = None,
    auto: bool = False,
    threshold: float = DEFAULT_THRESHOLD,
    values: Any = None,
) -> Plan:
    """Plan a migration of ``src_specs`` (name → (shape, dtype), in order) to ``target``.

    ``values`` (name → tensor) lets the tied-weight check compare contents when two
    tied target keys are fed from different source keys.
    """
    p = _Planner(dict(src_specs), target, rules)
    p.run_rules()
    p.run_identity()
    p.run_expected()
    suggestions, applied = p.run_auto(auto, threshold)
    p.run_leftovers()
    p.check_outputs()
    p.check_dead_rules()
    p.check_tied(values)
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
        applied=applied,
        diagnosis=p.diagnose(),
        src_specs=dict(src_specs),
        dst_specs=dict(target.specs),
        target_params=list(target.params),
        auto=auto,
        threshold=threshold,
    )
    return plan
