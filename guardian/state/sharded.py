"""Sharded tensors (DTensor, FSDP2 ``fully_shard``) stored without pickle, resharded on load.

Why not torch.distributed.checkpoint: its ``.metadata`` file is a pickle, and
guardian promises that loading never executes code. So each rank stores *its own
shard* as an ordinary tensor in its own ``rank-0000R/tensors.safetensors``, and the
state tree keeps a tagged description of where that shard sits::

    {"__ext__": "dtensor", "v": {
        "global_shape": [7, 5], "dtype": "float32",
        "mesh_shape": [2], "placements": ["S0"], "coordinate": [1],
        "offsets": [4, 0], "local_shape": [3, 5],
        "local": {"__tensor__": "model/0.weight/local"}   # or null, see below
    }}

Placements are written ``"S<dim>"`` (Shard) and ``"R"`` (Replicate). Partial and
_StridedShard (FSDP2 + tensor parallel) are refused at save time: their local
tensor is not one rectangular region of the global tensor.

Replicated data is stored once: only the rank whose coordinate is 0 along every
``Replicate`` mesh dim writes ``local``; its replicas write ``null``. On a 2-D
(shard, replicate) HSDP mesh that divides the bytes written by the replica count,
and the stored regions of all ranks tile the global tensor exactly — which is what
the loader checks: a hole or an overlap is a ``CorruptCheckpointError`` naming the
tensor, never silent zeros.

Loading: every saved rank's record for a tensor path is gathered (``walk_pairs``),
the live value's placement says which region this rank needs (``reshard``), and
only the overlapping pieces are read — from in-memory tensors, or straight from the
files with ``pread`` when the records were loaded lazily (``load_rank(lazy=True)``).
A different world size therefore just means different regions.

Offsets follow DTensor's own rule (torch.chunk semantics, applied mesh dim by mesh
dim, empty shards at offset = size): ``shard_region`` re-implements it without a
process group, and the tests check it against torch's private helper.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import CorruptCheckpointError, StateMismatchError
from ..format.layout import TENSORS_FILE, rank_prefix
from . import snapshot
from .dtensor import (
    Box,
    DTensor,
    LazyTensor,
    ShardRecord,
    intersect,
    is_dtensor,
    placement_codes,
    record_from_full,
    shard_region,
    volume,
)

# ---------------------------------------------------------------------------- assembling


def check_tiling(records: Sequence[ShardRecord], path: str = "") -> list[ShardRecord]:
    """The records that hold data, after proving they tile the global tensor exactly.

    Same shape and dtype everywhere, every region inside the tensor, volumes adding
    up to the tensor's, and no two regions overlapping: together, no holes either.
    """
    where = f"sharded tensor at {path or '<root>'}"
    if not records:
        raise CorruptCheckpointError(f"{where}: no saved rank holds a record for it")
    first = records[0]
    for r in records:
        if (r.global_shape, r.dtype) != (first.global_shape, first.dtype):
            raise CorruptCheckpointError(
                f"{where}: ranks disagree on shape/dtype ({first.global_shape} {first.dtype} vs "
                f"{r.global_shape} {r.dtype}); the checkpoint mixes ranks from different saves"
            )
    holding = [r for r in records if r.data is not None and volume(r.box) > 0]
    covered = sum(volume(r.box) for r in holding)
    total = math.prod(first.global_shape)
    _check_disjoint(holding, where)
    if covered != total:
        raise CorruptCheckpointError(
            f"{where}: saved shards cover {covered} of {total} elements — a rank's part is missing "
            f"({len(records)} records found, mesh {list(first.mesh_shape)})"
        )
    return holding


def _check_disjoint(records: Sequence[ShardRecord], where: str) -> None:
    """Sweep along the dim with the most distinct offsets, so sharded layouts stay
    near-linear (a pairwise check over thousands of ranks would not)."""
    if not records or not records[0].global_shape:
        if len(records) > 1:
            raise CorruptCheckpointError(f"{where}: {len(records)} ranks each store the whole scalar")
        return
    ndim = len(records[0].global_shape)
    sweep = max(range(ndim), key=lambda d: len({r.offsets[d] for r in records}))
    active: list[ShardRecord] = []
    for r in sorted(records, key=lambda r: r.offsets[sweep]):
        active = [a for a in active if a.offsets[sweep] + a.local_shape[sweep] > r.offsets[sweep]]
        for a in active:
            if intersect(a.box, r.box) is not None:
                raise CorruptCheckpointError(
                    f"{where}: the shards saved at mesh coordinates {list(a.coordinate)} and "
                    f"{list(r.coordinate)} overlap ({a.box} and {r.box})"
                )
        active.append(r)


def assemble_region(records: Sequence[ShardRecord], box: Box, path: str = "") -> torch.Tensor:
    """The region ``box`` of the global tensor, copied from whichever records overlap it.
    Only overlapping pieces are read; lazy records read only the rows they span."""
    holding = check_tiling(records, path)
    out = torch.empty(box[1], dtype=records[0].dtype)
    filled = 0
    for rec in holding:
        part = intersect(rec.box, box)
        if part is None:
            continue
        index = tuple(slice(o - b, o - b + s) for o, b, s in zip(part[0], box[0], part[1]))
        out[index] = rec.read(part)
        filled += volume(part)
    if filled != volume(box):  # cannot happen after check_tiling; kept as the invariant
        raise CorruptCheckpointError(f"sharded tensor at {path or '<root>'}: region {box} not fully covered")
    return out


def assemble_full(records: Sequence[ShardRecord], path: str = "") -> torch.Tensor:
    """The whole tensor (a world-size-1 target, or a plain live tensor)."""
    if not records:
        raise CorruptCheckpointError(f"sharded tensor at {path or '<root>'}: no records")
    shape = records[0].global_shape
    return assemble_region(records, ((0,) * len(shape), shape), path)


def target_box(target: Any, path: str = "") -> Box:
    """The global region the live DTensor ``target`` holds on this rank."""
    mesh = target.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise StateMismatchError(f"{path or '<root>'}: this rank is not part of the live tensor's mesh")
    codes = placement_codes(target.placements, path)
    return shard_region(tuple(target.shape), tuple(mesh.shape), codes, coordinate)


def reshard(records: Sequence[ShardRecord], target: Any, path: str = "") -> Any:
    """This rank's part of the saved tensor, laid out like ``target``.

    ``records``: every saved rank's record for this tensor path. A DTensor target
    gives a DTensor on the same mesh and placements; anything else the full tensor.
    """
    if not is_dtensor(target):
        return assemble_full(records, path)
    shape = tuple(target.shape)
    if records and records[0].global_shape != shape:
        raise StateMismatchError(
            f"{path or '<root>'}: the checkpoint holds shape {records[0].global_shape}, "
            f"the live tensor is {shape}"
        )
    local = assemble_region(records, target_box(target, path), path).to(target.device)
    return DTensor.from_local(
        local, target.device_mesh, target.placements, run_check=False, shape=target.shape,
        stride=target.stride(),
    )  # fmt: skip


_MISSING = object()
TargetFor = Callable[[tuple[Any, ...]], Any]


def walk_pairs(
    loaded_tree_by_rank: Sequence[Any],
    live_tree: Any,
    *,
    rank: int | None = None,
    target_for: TargetFor | None = None,
) -> Any:
    """The saved tree with every sharded position resharded for this rank.

    The *saved* tree's shape wins (a fresh optimizer has no state yet, and the
    saved state must not be dropped for it); the live tree only says where each
    tensor goes: a live DTensor gives a DTensor with its placements, a live plain
    tensor (or none) the full tensor. Where the live tree has nothing,
    ``target_for(key_path)`` may name a target (see ``params_as_targets``).
    Non-sharded leaves come from this rank's saved tree, or rank 0's when this
    rank did not exist at save time. ``LazyTensor`` leaves are read.
    """
    if not loaded_tree_by_rank:
        raise CorruptCheckpointError("no saved rank trees to load")
    walker = _Walker(loaded_tree_by_rank, target_for)
    ref = _reference_rank(len(loaded_tree_by_rank), rank)
    return walker.walk(loaded_tree_by_rank[ref], live_tree, (), "")


def _reference_rank(saved_world: int, rank: int | None) -> int:
    if rank is None:
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return rank if rank < saved_world else 0


class _Walker:
    def __init__(self, trees: Sequence[Any], target_for: TargetFor | None) -> None:
        self.trees = trees
        self.target_for = target_for

    def walk(self, saved: Any, live: Any, parts: tuple[Any, ...], path: str) -> Any:
        if isinstance(saved, ShardRecord):
            return self._place(self._records(parts, path), live, parts, path)
        if isinstance(saved, dict):
            return {k: self.walk(v, _get(live, k), (*parts, k), _child(path, k)) for k, v in saved.items()}
        if isinstance(saved, (list, tuple)):
            items = [self.walk(v, _get(live, i), (*parts, i), _child(path, i)) for i, v in enumerate(saved)]
            return items if isinstance(saved, list) else tuple(items)
        if isinstance(saved, (torch.Tensor, LazyTensor)) and is_dtensor(self._target(live, parts)):
            return self._place([record_from_full(saved)], live, parts, path)  # saved unsharded
        return saved.read() if isinstance(saved, LazyTensor) else saved

    def _target(self, live: Any, parts: tuple[Any, ...]) -> Any:
        if live is _MISSING and self.target_for is not None:
            return self.target_for(parts)
        return live

    def _place(self, records: list[ShardRecord], live: Any, parts: tuple[Any, ...], path: str) -> Any:
        target = self._target(live, parts)
        if live is _MISSING and is_dtensor(target) and tuple(target.shape) != records[0].global_shape:
            target = None  # a fallback target of another shape (say a factored moment): keep it whole
        return reshard(records, target, path)

    def _records(self, parts: tuple[Any, ...], path: str) -> list[ShardRecord]:
        out = []
        for r, tree in enumerate(self.trees):
            node = tree
            for key in parts:
                node = _get(node, key)
            if not isinstance(node, ShardRecord):
                raise CorruptCheckpointError(
                    f"sharded tensor at {path}: saved rank {r} has no shard record there "
                    "(its files come from a different save or model)"
                )
            out.append(node)
        return out


def _get(node: Any, key: Any) -> Any:
    try:
        return node[key]
    except (KeyError, IndexError, TypeError):
        return _MISSING


def _child(path: str, key: Any) -> str:
    return f"{path}[{key!r}]" if path else repr(key)


def params_as_targets(named_params: dict[str, Any], state_key: str = "state") -> TargetFor:
    """``target_for`` for optimizer state keyed by parameter name (guardian's
    ``OptimizerState`` form ``{"state": {name: {"exp_avg": …}}}``): a fresh
    optimizer has no state yet, so each moment takes its parameter's placement."""

    def target(parts: tuple[Any, ...]) -> Any:
        if len(parts) >= 3 and parts[0] == state_key:
            return named_params.get(parts[1])
        return None

    return target


# ---------------------------------------------------------------------------- reading rank files


def lazy_tensors(tensors_path: str) -> dict[str, LazyTensor]:
    """key → LazyTensor for a validated safetensors file; no tensor byte is read."""
    layout, entries = snapshot.stored_tensors(tensors_path)
    return {
        e.key: LazyTensor(tensors_path, layout.data_start + e.begin, dtype, e.shape) for e, dtype in entries
    }


def load_rank(ckpt_dir: str, prefix: str = "", *, lazy: bool = True) -> dict[str, tuple[str, Any]]:
    """name → (kind, tree) for one saved rank, DTensors as ``ShardRecord``s.

    ``lazy``: tensors stay on disk as ``LazyTensor`` until ``walk_pairs`` reads the
    regions this rank needs — foreign ranks' shards are never loaded whole.
    """
    tensors_path = os.path.join(ckpt_dir, prefix + TENSORS_FILE)
    tensors: dict[str, Any] = lazy_tensors(tensors_path) if lazy else snapshot.read_tensors(tensors_path)
    return snapshot.decode_components(ckpt_dir, prefix, tensors_path, tensors)


def load_all_ranks(
    ckpt_dir: str, saved_world_size: int, *, lazy: bool = True
) -> list[dict[str, tuple[str, Any]]]:
    """``load_rank`` for every rank of a multi-rank checkpoint, in rank order — the
    ``loaded_tree_by_rank`` that ``walk_pairs`` wants (per component)."""
    return [
        load_rank(ckpt_dir, rank_prefix(r, saved_world_size), lazy=lazy)
        for r in range(max(1, saved_world_size))
    ]
