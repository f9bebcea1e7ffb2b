"""The plan: what a migration will do, row by row, as reviewed and as recorded.

A plan is made by ``planner.make_plan`` (stages: wrappers → rules → identity →
expected → auto, then the checks of ``checks.py``) and is plain data from then on:
it round-trips through JSON (``to_json``/``plan_from_json``) so it can be reviewed,
applied later, and recorded in the output for ``revert``.

Three verdicts: *blocked* (something unresolved — nothing may be written), *guessed*
(every row resolved, but some only because the user passed ``accept_guesses``:
below the confidence threshold or a tie; each is listed in ``guesses`` and in the
output's provenance) and *clean*. A guess is never called clean.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from . import ops as ops_mod
from .errors import InputRejectedError
from .ops import Spec
from .rules import parse_rules

PLAN_FORMAT = "guardian.migrate.plan/1"
DEFAULT_THRESHOLD = 0.8
OK_STATUSES = ("UNCHANGED", "RENAMED", "TRANSFORMED", "DROPPED", "MISSING-EXPECTED", "GUESSED")
ISSUE_STATUSES = ("MISMATCH", "MISSING", "UNEXPECTED", "AMBIGUOUS", "SUGGESTED")


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
    suggestions: list[Any] = field(default_factory=list)  # auto.Suggestion
    applied: list[dict[str, Any]] = field(default_factory=list)
    guesses: list[dict[str, Any]] = field(default_factory=list)  # applied only by accept_guesses
    diagnosis: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    src_specs: dict[str, Spec] = field(default_factory=dict)
    dst_specs: dict[str, Spec] = field(default_factory=dict)
    target_params: list[str] = field(default_factory=list)
    auto: bool = False
    threshold: float = DEFAULT_THRESHOLD
    accept_guesses: bool = False

    @property
    def blocked(self) -> bool:
        return bool(self.issues or self.problems)

    @property
    def guessed(self) -> bool:
        return bool(self.guesses)

    @property
    def verdict(self) -> str:
        """``blocked`` | ``guessed`` | ``clean`` (clean never holds a guess)."""
        return "blocked" if self.blocked else "guessed" if self.guessed else "clean"

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
            "accept_guesses": self.accept_guesses,
            "accepted_guesses": self.guesses,
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
            accept_guesses=bool(obj.get("accept_guesses", False)),
        )
        plan.guesses = list(obj.get("accepted_guesses", []))
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
