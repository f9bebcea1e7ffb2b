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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CorruptCheckpointError, StateMismatchError, UnsupportedStateError
from ..format.layout import TENSORS_FILE, rank_prefix
from . import snapshot  # module, not names: snapshot may import this module (no cycle at import time)
from . import tensors as T

try:  # torch builds without distributed support still save and load plain state
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - depends on the torch build
    DTensor = Replicate = Shard = None  # type: ignore[assignment,misc]

TAG = "dtensor"
REPLICATE = "R"

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, shape) of a region of the global tensor


# ---------------------------------------------------------------------------- regions


def shard_region(
    global_shape: Sequence[int],
    mesh_shape: Sequence[int],
    placements: Sequence[str],
    coordinate: Sequence[int],
) -> Box:
    """``(offsets, local_shape)`` of the shard at ``coordinate``, exactly as DTensor cuts it.

    Each ``S<d>`` mesh dim splits the *current* extent of tensor dim ``d`` into
    ``torch.chunk`` pieces (ceil-sized, trailing pieces short or empty), so nested
    shards of the same dim compose. Empty shards sit at offset = global size, like
    DTensor's ``compute_local_shape_and_global_offset``.
    """
    offsets, shape = [0] * len(global_shape), list(global_shape)
    for mesh_dim, code in enumerate(placements):
        if code == REPLICATE:
            continue
        dim, n, c = _shard_dim(code), mesh_shape[mesh_dim], coordinate[mesh_dim]
        chunk = -(-shape[dim] // n) if shape[dim] else 0
        start = min(c * chunk, shape[dim])
        shape[dim] = max(0, min(shape[dim], start + chunk) - start)
        offsets[dim] += start
    for d, size in enumerate(shape):
        if size == 0:
            offsets[d] = global_shape[d]
    return tuple(offsets), tuple(shape)


def owns_data(placements: Sequence[str], coordinate: Sequence[int]) -> bool:
    """Whether this rank stores its shard: replicas other than coordinate 0 do not."""
    return all(c == 0 for code, c in zip(placements, coordinate) if code == REPLICATE)


def _shard_dim(code: str) -> int:
    return int(code[1:])


def _intersect(a: Box, b: Box) -> Box | None:
    offsets, shape = [], []
    for ao, as_, bo, bs in zip(a[0], a[1], b[0], b[1]):
        lo, hi = max(ao, bo), min(ao + as_, bo + bs)
        if hi <= lo:
            return None
        offsets.append(lo)
        shape.append(hi - lo)
    return tuple(offsets), tuple(shape)


def _volume(box: Box) -> int:
    return math.prod(box[1])


# ---------------------------------------------------------------------------- encoding


def is_plain_tensor(value: Any) -> bool:
    """The Encoder's ``is_tensor``: a DTensor *is* a torch.Tensor, but must go through
    ``encode_ext`` (its bytes are only this rank's shard, not the tensor)."""
    return isinstance(value, torch.Tensor) and not is_dtensor(value)


def is_dtensor(value: Any) -> bool:
    return DTensor is not None and isinstance(value, DTensor)


def placement_codes(placements: Iterable[Any], where: str = "") -> list[str]:
    """DTensor placements as ``"S<dim>"``/``"R"``; anything else cannot be stored as a region."""
    codes = []
    for p in placements:
        if type(p) is Shard:
            codes.append(f"S{p.dim}")
        elif type(p) is Replicate:
            codes.append(REPLICATE)
        else:
            raise UnsupportedStateError(
                f"cannot store the DTensor at {where or '<unknown path>'} with placement {p!r}: guardian stores "
                "Shard(dim) and Replicate only; redistribute it (e.g. Partial → Replicate) before saving",
                key_path=where,
            )
    return codes


def encode_dtensor(dt: Any, where: str = "") -> tuple[str, dict[str, Any]] | None:
    """``("dtensor", payload)`` for a DTensor, None for anything else.

    The payload is JSON-able except ``local``: this rank's shard as a plain
    contiguous tensor (stored in safetensors by the Encoder), or None for a replica
    that another rank stores. The local shape is checked against DTensor's own, so a
    placement we would mis-describe fails the save instead of corrupting the load.
    """
    if not is_dtensor(dt):
        return None
    mesh = dt.device_mesh
    codes = placement_codes(dt.placements, where)
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise UnsupportedStateError(f"DTensor at {where or '<root>'}: this rank is not in its mesh", where)
    offsets, local_shape = shard_region(tuple(dt.shape), tuple(mesh.shape), codes, coordinate)
    local = dt.to_local().detach()
    if tuple(local.shape) != local_shape:
        raise UnsupportedStateError(
            f"DTensor at {where or '<root>'}: local shard {tuple(local.shape)} is not the {local_shape} "
            f"that {codes} on mesh {tuple(mesh.shape)} gives (padded or custom sharding?)",
            key_path=where,
        )
    return TAG, {
        "global_shape": list(dt.shape),
        "dtype": str(dt.dtype).removeprefix("torch."),
        "mesh_shape": list(mesh.shape),
        "placements": codes,
        "coordinate": list(coordinate),
        "offsets": list(offsets),
        "local_shape": list(local_shape),
        "local": local.contiguous() if owns_data(codes, coordinate) else None,
    }


def encode_ext(value: Any) -> tuple[str, Any] | None:
    """Drop-in for ``tensors.encode_ext`` that also stores DTensors."""
    return encode_dtensor(value) or T.encode_ext(value)


def decode_ext(tag: str, payload: Any) -> Any:
    """Drop-in for ``tensors.decode_ext``: a DTensor comes back as a ``ShardRecord``."""
    if tag == TAG:
        return decode_dtensor(payload)
    return T.decode_ext(tag, payload)


# ---------------------------------------------------------------------------- records


@dataclass(frozen=True)
class LazyTensor:
    """A tensor still on disk: reading a region touches only the rows it spans."""

    file: str
    begin: int  # absolute byte offset of element 0 in ``file``
    dtype: torch.dtype
    shape: tuple[int, ...]

    def read(self) -> torch.Tensor:
        return self.read_region((0,) * len(self.shape), self.shape)

    def read_region(self, offsets: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
        """Rows ``offsets[0] : offsets[0]+shape[0]`` are contiguous on disk (C order):
        one pread for them, then the other dims are sliced in memory."""
        if not self.shape:
            return self._pread(0, ())
        row = math.prod(self.shape[1:])
        block = self._pread(offsets[0] * row, (shape[0], *self.shape[1:]))
        index = (slice(None),) + tuple(slice(o, o + s) for o, s in zip(offsets[1:], shape[1:]))
        return block[index]

    def _pread(self, first_element: int, shape: tuple[int, ...]) -> torch.Tensor:
        out = torch.empty(shape, dtype=self.dtype)
        if out.numel() == 0:
            return out
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy()).cast("B")
        fd = os.open(self.file, os.O_RDONLY | os.O_CLOEXEC)
        try:
            snapshot._preadv_exactly(fd, [view], self.begin + first_element * out.element_size(), self.file)
        finally:
            os.close(fd)
        return out


Data = torch.Tensor | LazyTensor | None


@dataclass(frozen=True)
class ShardRecord:
    """What one saved rank's file says about one sharded tensor."""

    global_shape: tuple[int, ...]
    dtype: torch.dtype
    mesh_shape: tuple[int, ...]
    placements: tuple[str, ...]
    coordinate: tuple[int, ...]
    offsets: tuple[int, ...]
    local_shape: tuple[int, ...]
    data: Data  # None: a replica whose bytes another rank stored

    @property
    def box(self) -> Box:
        return self.offsets, self.local_shape

    def read(self, box: Box) -> torch.Tensor:
        """The part of the global region ``box`` (inside this shard) held by this record."""
        local = tuple(o - s for o, s in zip(box[0], self.offsets))
        if isinstance(self.data, LazyTensor):
            return self.data.read_region(local, box[1])
        index = tuple(slice(o, o + s) for o, s in zip(local, box[1]))
        return self.data[index]  # type: ignore[index]


def record_from_full(tensor: torch.Tensor | LazyTensor) -> ShardRecord:
    """A plain (unsharded) saved tensor seen as the only shard of itself, so a
    checkpoint written at world size 1 reshards into live DTensors (a lazy one
    reading only this rank's region)."""
    shape = tuple(tensor.shape)
    return ShardRecord(shape, tensor.dtype, (1,), (REPLICATE,), (0,), (0,) * len(shape), shape, tensor)


def decode_dtensor(payload: Any, path: str = "") -> ShardRecord:
    """Validate a stored payload into a ``ShardRecord``.

    The offsets are recomputed from shape, mesh and placements and must agree: a
    bit flip there would otherwise put correct bytes in the wrong place.
    """
    where = f"sharded tensor at {path}" if path else "a sharded tensor entry"
    try:
        rec = _record_fields(payload)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CorruptCheckpointError(f"{where}: malformed dtensor entry ({e})") from e
    expected = shard_region(rec.global_shape, rec.mesh_shape, rec.placements, rec.coordinate)
    if expected != rec.box:
        raise CorruptCheckpointError(
            f"{where}: stored region {rec.box} disagrees with placements {list(rec.placements)} on mesh "
            f"{list(rec.mesh_shape)} at {list(rec.coordinate)}, which give {expected}"
        )
    if rec.data is None and owns_data(rec.placements, rec.coordinate):
        raise CorruptCheckpointError(f"{where}: rank at {list(rec.coordinate)} should hold data but has none")
    if rec.data is not None and (rec.data.dtype, tuple(rec.data.shape)) != (rec.dtype, rec.local_shape):
        raise CorruptCheckpointError(
            f"{where}: stored shard is {rec.data.dtype} {tuple(rec.data.shape)}, "
            f"the entry says {rec.dtype} {rec.local_shape}"
        )
    return rec


def _record_fields(p: dict[str, Any]) -> ShardRecord:
    ints = lambda key: tuple(_nonneg(v) for v in p[key])  # noqa: E731
    dtype = getattr(torch, p["dtype"])
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype {p['dtype']!r}")
    placements = tuple(p["placements"])
    for code in placements:
        if code != REPLICATE and not (isinstance(code, str) and code[:1] == "S" and code[1:].isdigit()):
            raise ValueError(f"placement {code!r}")
    rec = ShardRecord(
        ints("global_shape"), dtype, ints("mesh_shape"), placements, ints("coordinate"),
        ints("offsets"), ints("local_shape"), p["local"],
    )  # fmt: skip
    ndim = len(rec.global_shape)
    if not (len(rec.mesh_shape) == len(placements) == len(rec.coordinate)):
        raise ValueError("mesh_shape, placements and coordinate differ in length")
    if len(rec.offsets) != ndim or len(rec.local_shape) != ndim:
        raise ValueError("offsets/local_shape do not match the tensor's rank")
    if any(c >= n for c, n in zip(rec.coordinate, rec.mesh_shape)):
        raise ValueError("coordinate outside the mesh")
    if any(code != REPLICATE and _shard_dim(code) >= ndim for code in placements):
        raise ValueError("shard dim beyond the tensor's rank")
    if rec.data is not None and not isinstance(rec.data, (torch.Tensor, LazyTensor)):
        raise ValueError("local is not a tensor")
    return rec


def _nonneg(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"{v!r} is not a non-negative integer")
    return v


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
    holding = [r for r in records if r.data is not None and _volume(r.box) > 0]
    covered = sum(_volume(r.box) for r in holding)
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
            if _intersect(a.box, r.box) is not None:
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
        part = _intersect(rec.box, box)
        if part is None:
            continue
        index = tuple(slice(o - b, o - b + s) for o, b, s in zip(part[0], box[0], part[1]))
        out[index] = rec.read(part)
        filled += _volume(part)
    if filled != _volume(box):  # cannot happen after check_tiling; kept as the invariant
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


# ---------------------------------------------------------------------------- trees


def contains_dtensor(tree: Any) -> bool:
    """Whether a state tree holds a DTensor (the component is then stored per rank)."""
    if is_dtensor(tree):
        return True
    if isinstance(tree, dict):
        return any(contains_dtensor(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return any(contains_dtensor(v) for v in tree)
    return False


def contains_records(tree: Any) -> bool:
    """Whether a loaded tree holds sharded records (it then needs ``walk_pairs``)."""
    if isinstance(tree, ShardRecord):
        return True
    if isinstance(tree, dict):
        return any(contains_records(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return any(contains_records(v) for v in tree)
    return False


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


def global_meta(tree: Any) -> Any:
    """Records → meta tensors of the *global* shape, so ``load_meta`` results can be
    checked against live DTensors (whose ``.shape`` is global) before any read."""
    if isinstance(tree, ShardRecord):
        return torch.empty(tree.global_shape, dtype=tree.dtype, device="meta")
    if isinstance(tree, dict):
        return {k: global_meta(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [global_meta(v) for v in tree]
    if isinstance(tree, tuple):
        return tuple(global_meta(v) for v in tree)
    return tree


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
