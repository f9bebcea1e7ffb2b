"""The Python API: plan → review → apply, the one-shot ``migrate``, ``revert`` and
``signature``. The CLI is a thin layer over these functions."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..format import strictjson
from .apply import (
    RECORD_FORMAT,
    add_new_params,
    manifest_fields,
    migrate_model,
    migrate_optimizer,
    restore_groups,
    write_checkpoint,
)
from .errors import InputRejectedError, LossyRevertError, PlanBlockedError, StalePlanError, VerificationError
from .plan import DEFAULT_THRESHOLD, Plan, plan_from_json
from .planner import make_plan
from .rules import Rules, load_rules, parse_rules
from .sources import Source, load_source, model_digest
from .targets import Target, from_module, load_target, write_signature

MAX_PLAN_BYTES = 256 * 1024 * 1024


@dataclass
class Result:
    """What ``apply``/``migrate``/``revert`` did."""

    path: str
    plan: Plan
    notes: list[str] = field(default_factory=list)
    numeric_diff: float | None = None


def _as_target(to: Any) -> Target:
    if isinstance(to, Target):
        return to
    if isinstance(to, str):
        return load_target(to)
    import torch

    if isinstance(to, torch.nn.Module):
        return from_module(to)
    raise InputRejectedError(f"target {to!r}: expected a factory string, a path, a Target or an nn.Module")


def _as_rules(rules: Any) -> Rules:
    if rules is None or isinstance(rules, Rules):
        return rules or Rules()
    if isinstance(rules, dict):
        return parse_rules(rules)
    return load_rules(rules)


def plan(
    src: str | os.PathLike[str],
    to: Any,
    rules: Any = None,
    *,
    auto: bool = False,
    threshold: float = DEFAULT_THRESHOLD,
    component: str | None = None,
    accept_guesses: bool = False,
) -> Plan:
    """Plan a migration; writes nothing. ``accept_guesses`` (with ``auto``) also applies
    suggestions below ``threshold`` and ties, each listed in ``plan.guesses``."""
    source = load_source(src, component)
    return plan_source(
        source,
        _as_target(to),
        _as_rules(rules),
        auto=auto,
        threshold=threshold,
        accept_guesses=accept_guesses,
    )


def plan_source(
    source: Source,
    target: Target,
    rules: Rules,
    *,
    auto: bool = False,
    threshold: float = DEFAULT_THRESHOLD,
    accept_guesses: bool = False,
) -> Plan:
    info = source.describe() | {"model_digest": model_digest(source.model), "order": list(source.model)}
    p = make_plan(
        source.specs,
        target,
        rules,
        source=info,
        auto=auto,
        threshold=threshold,
        values=source.model,
        accept_guesses=accept_guesses,
    )
    p.notes.extend(source.notes)
    return p


def save_plan(p: Plan, path: str) -> None:
    from ..smallfiles import write_small_file_atomically

    write_small_file_atomically(path, strictjson.dumps_pretty(p.to_json()))


def load_plan(path: str) -> Plan:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PLAN_BYTES + 1)
    except OSError as e:
        raise InputRejectedError(f"{path}: cannot read the plan ({e.strerror})") from e
    try:
        obj = strictjson.loads(data, what=path, max_bytes=MAX_PLAN_BYTES)
    except ValueError as e:
        raise InputRejectedError(str(e)) from e
    return plan_from_json(obj, path)


def apply(
    src: str | os.PathLike[str],
    p: Plan | str,
    dst: str | os.PathLike[str],
    *,
    force: bool = False,
    target: Target | None = None,
) -> Result:
    """Execute a reviewed plan. Refuses a blocked plan and a plan made for other bytes."""
    p = load_plan(p) if isinstance(p, str) else p
    if p.blocked:
        raise PlanBlockedError(
            f"the plan is blocked ({len(p.issues)} unresolved rows, {len(p.problems)} problems); "
            "fix the rules and plan again",
            p,
        )
    source = load_source(src, p.source.get("component") if p.source.get("kind") == "guardian" else None)
    if source.fingerprint != p.source.get("fingerprint"):
        raise StalePlanError(
            f"{src}: its contents changed since the plan was made (fingerprint "
            f"{source.fingerprint} ≠ {p.source.get('fingerprint')}); plan again"
        )
    notes: list[str] = []
    init = _init_values(p, target)
    model = migrate_model(source.model, p.entries, list(p.dst_specs), init)
    components = _migrate_components(source, model, p, p.entries, notes, reverse=False)
    record = _record(source, p)
    fields = manifest_fields(source.manifest)
    extra = dict(fields.pop("extra", {}))
    extra["migration"] = record
    path = write_checkpoint(os.fspath(dst), components, fields, extra, source.path, force)
    _check_written(path, source.component, model)
    return Result(path=path, plan=p, notes=notes)


def _init_values(p: Plan, target: Target | None) -> dict[str, Any] | None:
    """The new model's own values for expect_missing keys with init = "model"."""
    wanted = [e.dsts[0] for e in p.entries if e.status == "MISSING-EXPECTED" and e.init == "model"]
    if not wanted:
        return None
    factory = p.target.get("factory") or (target.factory if target else None)
    checkpoint = p.target.get("checkpoint") or (target.checkpoint if target else None)
    if factory:
        import torch

        from .targets import resolve_factory

        # a fixed seed makes the new parameters reproducible; forking keeps the caller's
        # global RNG exactly as it was (a library must not reseed its user's training)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return dict(resolve_factory(factory)().state_dict())
    if checkpoint:
        return load_source(checkpoint).model
    return None


def _migrate_components(
    source: Source, model: dict[str, Any], p: Plan, entries: list, notes: list[str], reverse: bool
) -> dict[str, tuple[str, Any]]:
    components = dict(source.components or {})
    components[source.component] = ("module", model)
    new_params = [
        e.dsts[0] for e in entries if e.status == "MISSING-EXPECTED" and e.dsts[0] in p.target_params
    ]
    for name, (kind, tree) in list(components.items()):
        if kind != "optimizer" or not isinstance(tree, dict):
            continue
        order = None if reverse else p.target_params
        tree = migrate_optimizer(tree, entries, source.prefix, order, notes)
        if not reverse:
            tree = add_new_params(tree, new_params, source.prefix, notes)
        components[name] = (kind, tree)
    return components


def _record(source: Source, p: Plan) -> dict[str, Any]:
    groups = {
        n: [list(g["params"]) for g in t.get("param_groups", [])]
        for n, (k, t) in (source.components or {}).items()
        if k == "optimizer" and isinstance(t, dict)
    }
    return {
        "format": RECORD_FORMAT,
        "source": p.source,
        "source_manifest": manifest_fields(source.manifest),
        "param_groups_before": groups,
        "lossy": p.lossy,
        "verdict": p.verdict,
        "accepted_guesses": [
            {"from": g["from"], "to": g["to"], "confidence": g["confidence"], "guess": g["guess"]}
            for g in p.guesses
        ],
        "plan": p.to_json(),
    }


def _check_written(path: str, component: str, model: dict[str, Any]) -> None:
    """Read the output back (hashes verified) and compare the model to what we meant."""
    src = load_source(path, component)
    if model_digest(src.model) != model_digest(model):
        raise VerificationError(
            f"{path}: the written model differs from the migrated one (disk or write error)"
        )


def migrate(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    to: Any,
    rules: Any = None,
    *,
    auto: bool = False,
    threshold: float = DEFAULT_THRESHOLD,
    force: bool = False,
    component: str | None = None,
    numeric: dict[str, Any] | None = None,
    accept_guesses: bool = False,
) -> Result:
    """One shot: plan, refuse if anything is unresolved, apply, verify.

    ``numeric``: {"old": factory, "input_shape": (...), "atol": 1e-6, "seed": 0,
    "input_high": None} (``input_high``: integer probes, e.g. a vocabulary size)
    adds the old-vs-new output comparison; ``result.numeric_diff`` is the largest
    absolute difference. ``accept_guesses``: see ``plan``; the output's migration
    record lists every guess.
    """
    target = _as_target(to)
    source = load_source(src, component)
    rules = _as_rules(rules)
    p = plan_source(source, target, rules, auto=auto, threshold=threshold, accept_guesses=accept_guesses)
    if p.blocked and auto and numeric and target.factory:
        p = _break_ties_numerically(p, source, target, rules, numeric, threshold, accept_guesses)
    if p.blocked:
        raise PlanBlockedError(
            f"{src}: migration blocked ({len(p.issues)} unresolved rows, "
            f"{len(p.problems)} problems); see the report",
            p,
        )
    result = apply(src, p, dst, force=force, target=target)
    migrated = load_source(result.path, source.component).model
    from .verify import verify_numeric, verify_structure

    verify_structure(migrated, target)
    if numeric and target.factory:
        result.numeric_diff = verify_numeric(
            numeric["old"],
            source.model,
            target.factory,
            migrated,
            tuple(numeric["input_shape"]),
            seed=numeric.get("seed", 0),
            atol=numeric.get("atol", 1e-6),
            input_high=numeric.get("input_high"),
        )
    return result


def _break_ties_numerically(
    p: Plan,
    source: Source,
    target: Target,
    rules: Rules,
    numeric: dict[str, Any],
    threshold: float,
    guesses: bool,
) -> Plan:
    """Settle tied rows by running both models (probe.py); the decision becomes rules
    with a ``why``, so the plan and the output's provenance show how it was made."""
    from .probe import resolve_ties

    decided = resolve_ties(p, source.model, target, numeric)
    if not decided:
        return p
    doc = rules.to_json()
    doc["rules"] = list(doc["rules"]) + decided
    again = plan_source(
        source, target, parse_rules(doc), auto=True, threshold=threshold, accept_guesses=guesses
    )
    again.notes.append(f"{len(decided)} tied mapping(s) decided numerically; they are rules in the plan")
    return again


def revert(
    migrated: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    force: bool = False,
    force_lossy: bool = False,
) -> Result:
    """Undo a migration recorded in ``migrated``'s manifest; exact unless the plan was lossy."""
    source = load_source(migrated, None if _single_model(migrated) else _recorded_component(migrated))
    record = (source.manifest.extra if source.manifest else {}).get("migration")
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise InputRejectedError(
            f"{migrated}: not written by guardian migrate (no migration record); nothing to revert"
        )
    p = plan_from_json(record["plan"], f"{migrated} (recorded plan)")
    if p.lossy and not force_lossy:
        lossy = [f"{e.srcs} ({e.rule})" for e in p.entries if e.lossy]
        raise LossyRevertError(
            f"{migrated}: the migration was lossy ({'; '.join(lossy[:5])}); revert cannot "
            "restore those tensors. Pass --force-lossy to revert the rest anyway."
        )
    notes: list[str] = []
    inverse = p.inverse()
    model = migrate_model(source.model, inverse, list(p.source.get("order", [])))
    components = _migrate_components(source, model, p, inverse, notes, reverse=True)
    for name, before in record.get("param_groups_before", {}).items():
        if name in components:
            components[name] = ("optimizer", restore_groups(components[name][1], before, notes))
    fields = dict(record.get("source_manifest", {}))
    extra = dict(fields.pop("extra", {}))
    path = write_checkpoint(os.fspath(dst), components, fields, extra, source.path, force)
    if not p.lossy and model_digest(model) != p.source.get("model_digest"):
        raise VerificationError(f"{path}: the reverted model does not match the original's digest")
    return Result(path=path, plan=p, notes=notes)


def _single_model(path: Any) -> bool:
    from ..format import reader

    state = reader.load_state_json(os.fspath(path))
    return (
        sum(1 for c in state["components"].values() if isinstance(c, dict) and c.get("kind") == "module") <= 1
    )


def _recorded_component(path: Any) -> str | None:
    from ..format import manifest as manifest_mod

    rec = manifest_mod.read(os.fspath(path)).extra.get("migration", {})
    return rec.get("source", {}).get("component") if isinstance(rec, dict) else None


def signature(to: Any, out: str) -> Target:
    """Save the target's keys, shapes, dtypes, parameter order and tied groups."""
    target = _as_target(to)
    write_signature(target, out)
    return target
