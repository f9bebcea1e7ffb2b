"""Executing a plan: model tensors, the optimizer state that follows them, and the
output checkpoint (written only through ``CheckpointTxn``).

Optimizer state is keyed by parameter name in guardian checkpoints, so the plan's
rows apply to it directly: a renamed parameter's ``exp_avg``/``square_avg``/
``momentum_buffer``… move with it, a transformed one has the same ops applied to
every state tensor of the parameter's shape (scalars such as ``step`` are copied),
and a lossy row resets that parameter's state — which the notes say, because a
silently reset Adam moment changes training.
"""

from __future__ import annotations

import os
from typing import Any

from ..format.manifest import Manifest
from . import ops as ops_mod
from .errors import DestinationExistsError, InputRejectedError
from .plan import Entry

RECORD_FORMAT = "guardian.migrate.record/1"


def _is_tensor(v: Any) -> bool:
    import torch

    return isinstance(v, torch.Tensor)


def migrate_model(
    model: dict[str, Any], entries: list[Entry], order: list[str], init_values: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The migrated flat state dict, ordered like ``order`` (the target's key order).

    Rows without ops reuse the source tensor object (no copy). Non-tensor entries
    (``_extra_state``) that no row consumed are carried under their own names.
    """
    out: dict[str, Any] = {}
    consumed: set[str] = set()
    for e in entries:
        consumed.update(e.srcs)
        if e.status == "DROPPED":
            continue
        if e.status == "MISSING-EXPECTED":
            out[e.dsts[0]] = _initial_value(e, init_values)
            continue
        for dst, t in zip(e.dsts, ops_mod.run(e.ops, [model[s] for s in e.srcs]), strict=False):
            out[dst] = t
    for k, v in model.items():
        if k not in consumed and not _is_tensor(v):
            out[k] = v
    rank = {k: i for i, k in enumerate(order)}
    return dict(sorted(out.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def _initial_value(e: Entry, init_values: dict[str, Any] | None) -> Any:
    import torch

    from ..state.codec import torch_dtype

    dst, (shape, dtype) = e.dsts[0], e.dst_specs[0]
    if e.init == "zeros":
        return torch.zeros(shape, dtype=torch_dtype(dtype))
    if init_values is None or dst not in init_values:
        raise InputRejectedError(
            f"{e.rule}: {dst} should come from the new model's initialisation, but the target "
            "(a signature or tensor file) cannot provide it; use a factory or checkpoint target, "
            'or init = "zeros"'
        )
    return init_values[dst].detach().clone()


# ------------------------------------------------------------------ optimizer


def migrate_optimizer(
    tree: dict[str, Any], entries: list[Entry], prefix: str, param_order: list[str] | None, notes: list[str]
) -> dict[str, Any]:
    """Rename/transform per-parameter state and rewrite the param-group name lists."""
    state = tree.get("state", {})
    touched = {prefix + s for e in entries for s in e.srcs}
    new_state = {n: s for n, s in state.items() if n not in touched}
    for e in entries:
        names = [prefix + s for s in e.srcs]
        if not any(n in state for n in names):
            continue
        moved = _move_state([state.get(n) for n in names], e, notes)
        for d, st in zip(e.dsts, moved or [], strict=False):
            new_state[prefix + d] = st
    groups = _rewrite_groups(tree.get("param_groups", []), entries, prefix, notes)
    if param_order:
        groups = [_ordered(g, [prefix + p for p in param_order]) for g in groups]
    return {**tree, "state": new_state, "param_groups": groups}


def _move_state(states: list[Any], e: Entry, notes: list[str]) -> list[Any] | None:
    who = ", ".join(e.dsts) or ", ".join(e.srcs)
    if e.status == "DROPPED":
        notes.append(f"optimizer state of {', '.join(e.srcs)} dropped with the parameter")
        return None
    if e.lossy:
        notes.append(f"optimizer state of {who} reset: {e.rule} is lossy, so its moments no longer apply")
        return None
    if any(s is None for s in states) or any(set(s) != set(states[0]) for s in states):
        notes.append(f"optimizer state of {who} reset: the merged parameters had different state fields")
        return None
    if not e.ops:
        return [states[0]] * len(e.dsts)
    out: list[dict[str, Any]] = [{} for _ in e.dsts]
    for field in states[0]:
        values = _move_field([s[field] for s in states], e)
        if values is None:
            notes.append(
                f"optimizer state of {who} reset: field {field!r} cannot follow {ops_mod.describe(e.ops)}"
            )
            return None
        for o, v in zip(out, values, strict=False):
            o[field] = v
    return out


def _move_field(values: list[Any], e: Entry) -> list[Any] | None:
    """Tensors of the parameter's shape go through the ops; anything else must agree
    across the sources and is copied (``step``, ``None`` momentum buffers)."""
    from ..state.codec import tensor_spec

    if all(_is_tensor(v) for v in values) and all(
        tensor_spec(v)[0] == spec[0] for v, spec in zip(values, e.src_specs, strict=False)
    ):
        return ops_mod.run(e.ops, values)
    first = values[0]
    for v in values[1:]:
        same = (
            (_is_tensor(v) and _is_tensor(first) and v.shape == first.shape and bool((v == first).all()))
            if _is_tensor(v)
            else v == first
        )
        if not same:
            return None
    return [first] * len(e.dsts)


def _rewrite_groups(
    groups: list[dict[str, Any]], entries: list[Entry], prefix: str, notes: list[str]
) -> list[dict[str, Any]]:
    rename: dict[str, list[str]] = {}
    for e in entries:
        if e.status == "MISSING-EXPECTED" or not e.srcs:
            continue
        names = [prefix + s for s in e.srcs]
        rename[names[0]] = [] if e.status == "DROPPED" else [prefix + d for d in e.dsts]
        for n in names[1:]:
            rename[n] = []
    out = []
    for g in groups:
        params = [new for n in g["params"] for new in rename.get(n, [n])]
        out.append({**g, "params": params})
    return out


def add_new_params(tree: dict[str, Any], new: list[str], prefix: str, notes: list[str]) -> dict[str, Any]:
    """Parameters the migration added (expect_missing) join the only param group, if
    there is exactly one; otherwise the user must say where."""
    if not new:
        return tree
    groups = tree.get("param_groups", [])
    if len(groups) != 1:
        notes.append(
            f"new parameters {new} are in no optimizer param group ({len(groups)} groups); "
            "add them to the right group before resuming"
        )
        return tree
    notes.append(f"new parameters {new} added to param group 0 with fresh optimizer state")
    g = dict(groups[0])
    g["params"] = list(g["params"]) + [prefix + n for n in new if prefix + n not in g["params"]]
    return {**tree, "param_groups": [g]}


def _ordered(group: dict[str, Any], order: list[str]) -> dict[str, Any]:
    """Sort a group's names into the target's registration order. Safe because state is
    keyed by name; needed because guardian matches groups against the live optimizer."""
    rank = {n: i for i, n in enumerate(order)}
    params = sorted(group["params"], key=lambda n: (rank.get(n, len(rank)),))
    return {**group, "params": params}


def restore_groups(tree: dict[str, Any], before: list[list[str]], notes: list[str]) -> dict[str, Any]:
    """Revert: put each group's names back in the recorded original order."""
    groups = tree.get("param_groups", [])
    if len(groups) != len(before) or any(
        set(g["params"]) != set(b) for g, b in zip(groups, before, strict=False)
    ):
        notes.append("optimizer param groups could not be restored to their recorded order")
        return tree
    return {**tree, "param_groups": [{**g, "params": list(b)} for g, b in zip(groups, before, strict=False)]}


# ------------------------------------------------------------------ output


def check_destination(dst: str, source_path: str, force: bool) -> tuple[str, str]:
    """``(parent, name)``; refuses the source itself (the input is never modified) and an
    existing destination unless forced."""
    dst_abs = os.path.abspath(dst)
    src_abs = os.path.abspath(source_path)
    if dst_abs == src_abs or dst_abs.startswith(src_abs.rstrip("/") + "/"):
        raise InputRejectedError(
            f"{dst}: the output must not be (or be inside) the source {source_path}; "
            "the input is never modified"
        )
    if os.path.lexists(dst_abs) and not force:
        raise DestinationExistsError(
            f"{dst}: already exists; choose another output or pass --force to replace it"
        )
    if os.path.lexists(dst_abs) and not os.path.isdir(dst_abs):
        raise InputRejectedError(f"{dst}: exists and is not a checkpoint directory; refusing to replace it")
    parent, name = os.path.split(dst_abs)
    os.makedirs(parent, exist_ok=True)
    return parent, name


def write_checkpoint(
    dst: str,
    components: dict[str, tuple[str, Any]],
    fields: dict[str, Any],
    extra: dict[str, Any],
    source_path: str,
    force: bool,
) -> str:
    """Write ``components`` as a checkpoint at ``dst`` through the commit protocol."""
    from ..commit import CheckpointTxn, delete_checkpoint
    from ..state.codec import write_components

    parent, name = check_destination(dst, source_path, force)
    with CheckpointTxn(parent, name) as txn:
        kinds = write_components(txn, components)
        man = Manifest(
            name=name,
            step=int(fields.get("step", 0)),
            epoch=int(fields.get("epoch", 0)),
            seq=int(fields.get("seq", 0)),
            files={},
            reason=list(fields.get("reason", ["migrate"])),
            metrics=dict(fields.get("metrics", {})),
            batch_in_epoch=int(fields.get("batch_in_epoch", 0)),
            components={n: {"kind": k} for n, k in kinds.items()},
            extra=extra,
        )
        if os.path.lexists(os.path.join(parent, name)):  # force: the old output goes only now
            delete_checkpoint(parent, name)
        return txn.commit(man)


def manifest_fields(man: Manifest | None) -> dict[str, Any]:
    if man is None:
        return {"reason": ["migrate"]}
    return {
        "step": man.step,
        "epoch": man.epoch,
        "seq": man.seq,
        "reason": list(man.reason),
        "metrics": dict(man.metrics),
        "batch_in_epoch": man.batch_in_epoch,
        "name": man.name,
        "extra": dict(man.extra),
    }
