"""The plan as people and programs read it.

Rows are grouped by template (indices collapsed to ``{i}``) so 24 identical
transformer blocks make one line, each with its status, counts, parameters, bytes,
the rule behind it and a concrete hint. ``to_json`` is the machine form, versioned
by ``REPORT_SCHEMA``; add fields, never change their meaning.
"""

from __future__ import annotations

import math
import re
from typing import Any

from ..format.safetensors_io import DTYPE_SIZES
from .errors import EXIT_BLOCKED, EXIT_CLEAN
from .plan import Plan

REPORT_SCHEMA = "guardian.migrate.report/1"
STATUS_ORDER = (
    "UNCHANGED",
    "RENAMED",
    "TRANSFORMED",
    "DROPPED",
    "MISSING-EXPECTED",
    "GUESSED",
    "MISSING",
    "UNEXPECTED",
    "MISMATCH",
    "AMBIGUOUS",
    "SUGGESTED",
)
_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)")


def template(key: str) -> str:
    """Indices collapsed to ``{i}`` and the leaf to ``{p}``: one row per layer template."""
    head, dot, _leaf = _INDEX.sub("{i}", key).rpartition(".")
    return f"{head}.{{p}}" if dot else key


def _size(spec: Any) -> tuple[int, int]:
    shape, dtype = spec
    n = math.prod(shape)
    return n, n * DTYPE_SIZES.get(dtype, 0)


def rows(plan: Plan) -> list[dict[str, Any]]:
    """One dict per (status, rule, source template, target template)."""
    groups: dict[tuple, dict[str, Any]] = {}
    for e in plan.entries:
        specs = e.src_specs or e.dst_specs
        _add(
            groups,
            e.status,
            e.rule,
            e.srcs,
            e.dsts,
            specs,
            e.reason or (f"init: {e.init}" if e.init else ""),
            e.confidence,
        )
    for i in plan.issues:
        specs = [plan.src_specs[s] for s in i.srcs if s in plan.src_specs] or [
            plan.dst_specs[d] for d in i.dsts if d in plan.dst_specs
        ]
        _add(groups, i.status, i.rule or i.group, i.srcs, i.dsts, specs, i.hint, i.confidence, i.message)
    return sorted(groups.values(), key=lambda r: (STATUS_ORDER.index(r["status"]), r["source"], r["target"]))


def _add(
    groups: dict,
    status: str,
    rule: str,
    srcs: list[str],
    dsts: list[str],
    specs: list,
    hint: str,
    confidence: float | None,
    message: str = "",
) -> None:
    src_t = " + ".join(template(s) for s in srcs)
    dst_t = " + ".join(template(d) for d in dsts)
    row = groups.setdefault(
        (status, rule, src_t, dst_t),
        {
            "status": status,
            "source": src_t,
            "target": dst_t,
            "rule": rule,
            "count": 0,
            "params": 0,
            "bytes": 0,
            "hint": hint,
            "confidence": confidence,
            "message": message,
            "keys": [],
        },
    )
    row["count"] += 1
    for spec in specs:
        n, b = _size(spec)
        row["params"] += n
        row["bytes"] += b
    row["keys"].append({"from": srcs, "to": dsts})


def summary(plan: Plan) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for r in rows(plan):
        s = out.setdefault(r["status"], {"count": 0, "params": 0, "bytes": 0})
        for k in s:
            s[k] += r[k]
    return out


def to_json(plan: Plan) -> dict[str, Any]:
    return {
        "schema": REPORT_SCHEMA,
        "status": plan.verdict,
        "exit_code": EXIT_BLOCKED if plan.blocked else EXIT_CLEAN,
        "lossy": plan.lossy,
        "source": plan.source,
        "target": plan.target,
        "summary": summary(plan),
        "rows": rows(plan),
        "problems": list(plan.problems),
        "diagnosis": list(plan.diagnosis),
        "suggestions": [s.to_json() for s in plan.suggestions],
        "applied_suggestions": list(plan.applied),
        "accepted_guesses": list(plan.guesses),
        "notes": list(plan.notes),
    }


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


RED, RESET = "\x1b[1;31m", "\x1b[0m"


def render(plan: Plan, color: bool = False) -> str:
    """The human table. ``color``: show accepted guesses in red (for a terminal)."""
    lines = [f"migrate {plan.source.get('path', '?')} → {plan.target.get('description', '?')}", ""]
    table = [("STATUS", "SOURCE → TARGET", "N", "PARAMS", "BYTES", "RULE")]
    hints = []
    for r in rows(plan):
        status = r["status"] + (
            f"({r['confidence']:.2f})"
            if r["status"] in ("SUGGESTED", "GUESSED") and r["confidence"] is not None
            else ""
        )
        arrow = f"{r['source'] or '∅'} → {r['target'] or '∅'}"
        table.append(
            (status, arrow, str(r["count"]), f"{r['params']:,}", _human_bytes(r["bytes"]), r["rule"] or "-")
        )
        if r["status"] in (
            "MISSING",
            "UNEXPECTED",
            "MISMATCH",
            "AMBIGUOUS",
            "SUGGESTED",
            "DROPPED",
            "GUESSED",
        ) and (r["hint"] or r["message"]):
            hints.append((r["status"], arrow, r["message"], r["hint"]))
    widths = [min(max(len(row[i]) for row in table), 60) for i in range(len(table[0]))]
    for row in table:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())
    lines.append("")
    counts = ", ".join(f"{s}: {v['count']}" for s, v in summary(plan).items())
    lines.append(f"totals: {counts}")
    for status, arrow, message, hint in hints:
        lines.append(f"\n{status} {arrow}")
        if message:
            lines.append(f"  {message}")
        if hint:
            lines.extend("  " + h for h in hint.strip().splitlines())
    for d in plan.diagnosis:
        lines.append(f"\nDIAGNOSIS: {d}")
    for p in plan.problems:
        lines.append(f"\nPROBLEM: {p}")
    for n in plan.notes:
        lines.append(f"note: {n}")
    if plan.applied:
        lines.append("\napplied suggestions (written into the plan):")
        lines.extend("  " + a["rule"].strip().replace("\n", "\n  ") for a in plan.applied)
    lines.extend(_guess_lines(plan, color))
    verdict = {
        "blocked": "BLOCKED: resolve the rows and problems above",
        "guessed": f"GUESSED: {len(plan.guesses)} mapping(s) applied without confidence (--accept-guesses); "
        "NOT CLEAN — check each one, or name it in a rules file",
        "clean": "CLEAN: nothing unresolved",
    }[plan.verdict]
    if plan.verdict == "guessed" and color:
        verdict = RED + verdict + RESET
    lines.append(
        f"\n{verdict}{' (lossy: revert will need --force-lossy)' if plan.lossy and not plan.blocked else ''}"
    )
    return "\n".join(lines)


def _guess_lines(plan: Plan, color: bool) -> list[str]:
    if not plan.guesses:
        return []
    head = "\n!!! GUESSES ACCEPTED (recorded in the output's provenance) !!!"
    out = [RED + head + RESET if color else head]
    for g in plan.guesses:
        out.append(f"  {g['from']} → {g['to']}  (confidence {g['confidence']:.2f}; {g['guess']})")
    return out
