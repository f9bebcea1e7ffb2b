"""The safetensors container, read and laid out without torch.

We write the standard format (8-byte little-endian header length, JSON header,
contiguous data) so any safetensors reader can open our files, but we build the
layout ourselves: the writer needs to know every offset up front to stage tensors
into one preallocated buffer and write it with large sequential (O_DIRECT) writes.

The parser is strict, because a checkpoint may come from anywhere: bounded header,
known dtypes, shapes that match byte ranges, ranges that tile the data exactly
(no holes, no overlaps — so no polyglot files), keys without NUL or newlines.
"""

from __future__ import annotations

import math
import os
import struct
import threading
from dataclasses import dataclass

from ..errors import CorruptCheckpointError, UnsafeCheckpointError, UnsupportedStateError
from . import safeio, strictjson

MAX_HEADER_BYTES = 100 * 1024 * 1024
# A header's budget grows with the data it describes: every tensor guardian stores
# with a non-empty shape has data, and even a checkpoint of one-element tensors with
# long names needs far less than HEADER_PER_DATA_BYTE header bytes per data byte.
# Checked from the file size before the header is read; enforced on save too.
HEADER_BASE_BUDGET = 1 << 20
HEADER_PER_DATA_BYTE = 64
MAX_DIMS = 64
MAX_EXTENT = 2**62  # product of the non-zero dims: torch's stride arithmetic must not overflow
HEADER_ALIGN = 8

DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes sit inside the data section of a file."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Layout:
    """A complete file image: the header bytes and where each tensor goes."""

    header: bytes  # including the 8-byte length prefix and padding
    entries: tuple[TensorEntry, ...]
    metadata: dict[str, str]

    @property
    def data_start(self) -> int:
        return len(self.header)

    @property
    def total_bytes(self) -> int:
        return len(self.header) + (self.entries[-1].end if self.entries else 0)


def check_key(key: str, what: str = "") -> None:
    if not key or "\x00" in key or "\n" in key or "\r" in key:
        where = f"{what}: " if what else ""
        raise UnsafeCheckpointError(f"{where}tensor key {key!r} is empty or holds NUL/newline characters")


_RECENT_LAYOUTS: dict[tuple, Layout] = {}  # a training run saves the same shapes every time
_RECENT_LIMIT = 4
_recent_lock = threading.Lock()


def plan_layout(
    specs: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> Layout:
    """Lay out ``(key, dtype, shape)`` tensors back to back, in the given order.

    The few most recent layouts are remembered: every save of a run has the same
    specs, and the header of hundreds of tensors is JSON worth a millisecond of the
    training thread's stall each time. Nothing changes a ``Layout`` once planned, so
    sharing one is safe."""
    cache_key: tuple | None = (tuple(specs), tuple(sorted((metadata or {}).items())))
    try:
        with _recent_lock:
            hit = _RECENT_LAYOUTS.get(cache_key)
    except TypeError:  # a shape given as a list: plan it, uncached
        hit, cache_key = None, None
    if hit is not None:
        return hit
    layout = _plan_layout(specs, metadata)
    if cache_key is not None:
        with _recent_lock:
            _RECENT_LAYOUTS[cache_key] = layout
            while len(_RECENT_LAYOUTS) > _RECENT_LIMIT:
                del _RECENT_LAYOUTS[next(iter(_RECENT_LAYOUTS))]
    return layout


def _plan_layout(specs: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None) -> Layout:
    header_obj: dict[str, object] = {}
    entries = []
    offset = 0
    for key, dtype, shape in specs:
        check_key(key)
        if key in header_obj or key == "__metadata__":
            raise UnsafeCheckpointError(f"tensor key {key!r} appears twice")
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        entries.append(TensorEntry(key, dtype, tuple(shape), offset, offset + nbytes))
        header_obj[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header_obj["__metadata__"] = dict(metadata)
    body = strictjson.dumps(header_obj)
    pad = (-(8 + len(body))) % HEADER_ALIGN
    body += b" " * pad
    if len(body) > header_budget(offset):
        raise UnsupportedStateError(
            f"{len(specs)} tensors holding only {offset} bytes need a {len(body)}-byte safetensors header, "
            "more than guardian will read back; store many tiny tensors as one larger tensor"
        )
    header = struct.pack("<Q", len(body)) + body
    return Layout(header=header, entries=tuple(entries), metadata=dict(metadata or {}))


def header_budget(data_bytes: int) -> int:
    """The largest header a file with ``data_bytes`` of tensor data may have."""
    return min(MAX_HEADER_BYTES, HEADER_BASE_BUDGET + HEADER_PER_DATA_BYTE * data_bytes)


def read_layout(path: str | os.PathLike[str]) -> Layout:
    """Parse and validate a safetensors file's header; never reads tensor data.
    The file is opened without following a symlink and without blocking."""
    what = os.fspath(path)
    head, name = os.path.split(what)
    try:
        fd, st = safeio.open_regular(head or ".", name)
    except FileNotFoundError as e:
        raise CorruptCheckpointError(f"{what}: missing") from e
    try:
        return read_layout_fd(fd, st.st_size, what)
    finally:
        os.close(fd)


def read_layout_fd(fd: int, size: int, what: str) -> Layout:
    """``read_layout`` on an open descriptor of a file of ``size`` bytes."""
    if size < 8:
        raise CorruptCheckpointError(f"{what}: {size} bytes is too short for a safetensors file")
    (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    if n > size - 8 or n > header_budget(size - 8 - n):
        raise UnsafeCheckpointError(
            f"{what}: header claims {n} bytes but the file has {size} "
            "(truncated, corrupt, or not a safetensors file)"
        )
    raw = os.pread(fd, n, 8)
    if len(raw) != n:
        raise CorruptCheckpointError(f"{what}: header truncated")
    header_obj = strictjson.loads(raw, what=f"{what} (safetensors header)", max_bytes=MAX_HEADER_BYTES)
    return _validate(header_obj, header=struct.pack("<Q", n) + raw, file_size=size, what=what)


def _validate(header_obj: object, *, header: bytes, file_size: int, what: str) -> Layout:
    if not isinstance(header_obj, dict):
        raise CorruptCheckpointError(f"{what}: safetensors header is not a JSON object")
    metadata = header_obj.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CorruptCheckpointError(f"{what}: __metadata__ must map strings to strings")
    entries = [_entry(key, value, what) for key, value in header_obj.items()]
    entries.sort(key=lambda e: (e.begin, e.end))
    expected = 0
    for e in entries:
        if e.begin != expected:
            raise UnsafeCheckpointError(
                f"{what}: tensor {e.key!r} starts at {e.begin}, expected {expected} "
                "(data ranges must tile the file with no holes or overlaps)"
            )
        expected = e.end
    data_len = file_size - len(header)
    if expected != data_len:
        raise CorruptCheckpointError(
            f"{what}: tensors cover {expected} bytes but the file holds {data_len} bytes of data "
            "(truncated or padded)"
        )
    return Layout(header=header, entries=tuple(entries), metadata=metadata)


def _entry(key: object, value: object, what: str) -> TensorEntry:
    if not isinstance(key, str):
        raise CorruptCheckpointError(f"{what}: non-string tensor key")
    check_key(key, what)
    if not isinstance(value, dict):
        raise CorruptCheckpointError(f"{what}: entry {key!r} is not an object")
    dtype, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise CorruptCheckpointError(f"{what}: tensor {key!r} has unknown dtype {dtype!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**48 for d in shape)
        or math.prod(max(d, 1) for d in shape) * DTYPE_SIZES[dtype] > MAX_EXTENT
    ):
        raise CorruptCheckpointError(f"{what}: tensor {key!r} has an invalid shape {str(shape)[:200]}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise UnsafeCheckpointError(f"{what}: tensor {key!r} has invalid data_offsets {offsets!r}")
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise CorruptCheckpointError(
            f"{what}: tensor {key!r} shape {shape} {dtype} needs {nbytes} bytes "
            f"but its range holds {offsets[1] - offsets[0]}"
        )
    return TensorEntry(key, dtype, tuple(shape), offsets[0], offsets[1])
