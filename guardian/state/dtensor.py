"""DTensor (FSDP2 ``fully_shard``) state in checkpoint trees: the codec and its records.

Each rank stores *its own shard* of a DTensor as an ordinary tensor, and the state tree
keeps a tagged description of where that shard sits::

    {"__ext__": "dtensor", "v": {
        "global_shape": [7, 5], "dtype": "float32",
        "mesh_shape": [2], "placements": ["S0"], "coordinate": [1],
        "offsets": [4, 0], "local_shape": [3, 5],
        "local": {"__tensor__": "model/0.weight/local"}   # or null: a replica
    }}

Placements are written ``"S<dim>"`` (Shard) and ``"R"`` (Replicate); Partial and
_StridedShard are refused at save time (their local tensor is not one rectangular
region). Only the rank whose coordinate is 0 along every ``Replicate`` mesh dim writes
``local``. Decoding validates every field and recomputes the region from shape, mesh
and placements: a stored region that disagrees is a ``CorruptCheckpointError``.

This module is the codec only (what ``snapshot`` needs to write and read trees);
resharding a loaded checkpoint onto a live placement is ``sharded``'s.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CorruptCheckpointError, UnsupportedStateError
from . import tensors as T
from .fileread import preadv_exactly

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


def intersect(a: Box, b: Box) -> Box | None:
    offsets, shape = [], []
    for ao, as_, bo, bs in zip(a[0], a[1], b[0], b[1]):
        lo, hi = max(ao, bo), min(ao + as_, bo + bs)
        if hi <= lo:
            return None
        offsets.append(lo)
        shape.append(hi - lo)
    return tuple(offsets), tuple(shape)


def volume(box: Box) -> int:
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
            preadv_exactly(fd, [view], self.begin + first_element * out.element_size(), self.file)
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
