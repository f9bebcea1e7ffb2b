"""Tensor operations a rule may apply, each with a shape rule and an inverse.

An op is plain data (``{"op": "transpose", "dims": [0, 1]}``) so plans can be
written to JSON, reviewed and applied elsewhere. Every op can say, from shapes and
dtypes alone, what it produces and what undoes it; an op that cannot be undone is
*lossy* and a rule using one must say ``lossy = true`` (a resized vocabulary is a
deliberate loss; a narrowing cast by accident is not).

Ops act on a list of tensors: most map one to one; ``split`` turns one into several
and ``concat`` several into one. Shape/dtype inference is torch-free.
"""

from __future__ import annotations

import math
from typing import Any

from ..format.safetensors_io import DTYPE_SIZES
from .errors import RulesError

Spec = tuple[tuple[int, ...], str]  # (shape, safetensors dtype)

# Casts that every value survives, so casting back restores the exact bytes.
_EXACT_CASTS = {
    ("F16", "F32"),
    ("BF16", "F32"),
    ("F16", "F64"),
    ("BF16", "F64"),
    ("F32", "F64"),
    ("I8", "I16"),
    ("I8", "I32"),
    ("I8", "I64"),
    ("I16", "I32"),
    ("I16", "I64"),
    ("I32", "I64"),
    ("U8", "I16"),
    ("U8", "I32"),
    ("U8", "I64"),
    ("BOOL", "U8"),
}
_FIELDS = {
    "transpose": {"dims"},
    "reshape": {"shape"},
    "cast": {"dtype"},
    "slice_rows": {"start", "stop"},
    "pad_rows": {"rows", "value"},
    "split": {"dim", "sizes"},
    "concat": {"dim"},
}


def validate(op: Any, where: str) -> dict[str, Any]:
    """Check an op's fields (unknown fields are typos, and typos must not pass)."""
    if not isinstance(op, dict) or op.get("op") not in _FIELDS:
        raise RulesError(f"{where}: unknown op {op!r}; known ops: {', '.join(sorted(_FIELDS))}")
    extra = set(op) - _FIELDS[op["op"]] - {"op"}
    if extra:
        raise RulesError(f"{where}: op {op['op']!r} has unknown fields {sorted(extra)}")
    if op["op"] == "cast" and op.get("dtype") not in DTYPE_SIZES:
        raise RulesError(f"{where}: cast to unknown dtype {op.get('dtype')!r} (use F32, F16, BF16, …)")
    return dict(op)


def out_specs(op: dict[str, Any], specs: list[Spec], where: str) -> list[Spec]:
    """What ``op`` produces from tensors of ``specs``; raises RulesError if it cannot apply."""
    fn = _SHAPE_RULES[op["op"]]
    try:
        return fn(op, specs)
    except (ValueError, IndexError, TypeError, KeyError) as e:
        raise RulesError(f"{where}: op {op} cannot apply to {_fmt(specs)}: {e}") from e


def _one(specs: list[Spec]) -> Spec:
    if len(specs) != 1:
        raise ValueError(f"expects one tensor, got {len(specs)}")
    return specs[0]


def _dim(d: int, ndim: int) -> int:
    if not -ndim <= d < max(ndim, 1):
        raise ValueError(f"dim {d} out of range for {ndim} dims")
    return d % ndim


def _transpose(op: dict, specs: list[Spec]) -> list[Spec]:
    shape, dtype = _one(specs)
    a, b = (_dim(d, len(shape)) for d in op.get("dims", [0, 1]))
    s = list(shape)
    s[a], s[b] = s[b], s[a]
    return [(tuple(s), dtype)]


def _reshape(op: dict, specs: list[Spec]) -> list[Spec]:
    shape, dtype = _one(specs)
    new = tuple(int(d) for d in op["shape"])
    if math.prod(new) != math.prod(shape) or any(d < 0 for d in new):
        raise ValueError(f"reshape must keep the element count ({math.prod(shape)} → {math.prod(new)})")
    return [(new, dtype)]


def _cast(op: dict, specs: list[Spec]) -> list[Spec]:
    shape, _ = _one(specs)
    return [(shape, op["dtype"])]


def _slice_rows(op: dict, specs: list[Spec]) -> list[Spec]:
    shape, dtype = _one(specs)
    start, stop = int(op.get("start", 0)), int(op["stop"])
    if not shape or not 0 <= start < stop <= shape[0]:
        raise ValueError(f"rows {start}:{stop} outside 0:{shape[0] if shape else 0}")
    return [((stop - start, *shape[1:]), dtype)]


def _pad_rows(op: dict, specs: list[Spec]) -> list[Spec]:
    shape, dtype = _one(specs)
    rows = int(op["rows"])
    if not shape or rows <= 0:
        raise ValueError("pad_rows needs a tensor with rows and rows > 0")
    return [((shape[0] + rows, *shape[1:]), dtype)]


def _split(op: dict, specs: list[Spec]) -> list[Spec]:
    shape, dtype = _one(specs)
    d = _dim(int(op.get("dim", 0)), len(shape))
    sizes = [int(s) for s in op["sizes"]]
    if sum(sizes) != shape[d] or any(s <= 0 for s in sizes):
        raise ValueError(f"sizes {sizes} do not add up to dim {d} of size {shape[d]}")
    return [(tuple(s if i == d else n for i, n in enumerate(shape)), dtype) for s in sizes]


def _concat(op: dict, specs: list[Spec]) -> list[Spec]:
    if len(specs) < 2:
        raise ValueError("concat needs at least two tensors")
    shape0, dtype = specs[0]
    d = _dim(int(op.get("dim", 0)), len(shape0))
    for shape, dt in specs[1:]:
        rest = [n for i, n in enumerate(shape) if i != d]
        if dt != dtype or len(shape) != len(shape0) or rest != [n for i, n in enumerate(shape0) if i != d]:
            raise ValueError("tensors differ outside the concat dim")
    total = sum(s[0][d] for s in specs)
    return [(tuple(total if i == d else n for i, n in enumerate(shape0)), dtype)]


_SHAPE_RULES = {
    "transpose": _transpose,
    "reshape": _reshape,
    "cast": _cast,
    "slice_rows": _slice_rows,
    "pad_rows": _pad_rows,
    "split": _split,
    "concat": _concat,
}


def inverse(op: dict[str, Any], specs: list[Spec]) -> dict[str, Any] | None:
    """The op that undoes ``op`` on tensors of ``specs``, or None when ``op`` is lossy."""
    kind = op["op"]
    if kind == "transpose":
        return dict(op)
    if kind == "reshape":
        return {"op": "reshape", "shape": list(specs[0][0])}
    if kind == "cast":
        src = specs[0][1]
        return (
            {"op": "cast", "dtype": src} if src == op["dtype"] or (src, op["dtype"]) in _EXACT_CASTS else None
        )
    if kind == "pad_rows":
        return {"op": "slice_rows", "start": 0, "stop": specs[0][0][0]}
    if kind == "slice_rows":
        full = int(op.get("start", 0)) == 0 and int(op["stop"]) == specs[0][0][0]
        return {"op": "slice_rows", "start": 0, "stop": specs[0][0][0]} if full else None
    if kind == "split":
        return {"op": "concat", "dim": int(op.get("dim", 0))}
    if kind == "concat":
        d = _dim(int(op.get("dim", 0)), len(specs[0][0]))
        return {"op": "split", "dim": d, "sizes": [s[0][d] for s in specs]}
    return None


def chain(ops: list[dict[str, Any]], specs: list[Spec], where: str) -> tuple[list[Spec], list[dict] | None]:
    """Run shape inference through ``ops``; return the output specs and the inverse
    chain (None if any op is lossy)."""
    inv: list[dict] | None = []
    for op in ops:
        undo = inverse(op, specs)
        specs = out_specs(op, specs, where)
        if undo is None or inv is None:
            inv = None
        else:
            inv.insert(0, undo)
    return specs, inv


def run(ops: list[dict[str, Any]], tensors: list[Any]) -> list[Any]:
    """Apply ``ops`` to real tensors (torch imported here so planning stays torch-free)."""
    import torch

    from ..state.codec import torch_dtype

    for op in ops:
        kind = op["op"]
        if kind == "transpose":
            a, b = op.get("dims", [0, 1])
            tensors = [tensors[0].transpose(a, b).contiguous()]
        elif kind == "reshape":
            tensors = [tensors[0].reshape(tuple(op["shape"])).clone()]
        elif kind == "cast":
            tensors = [tensors[0].to(torch_dtype(op["dtype"]))]
        elif kind == "slice_rows":
            tensors = [tensors[0][int(op.get("start", 0)) : int(op["stop"])].clone()]
        elif kind == "pad_rows":
            t = tensors[0]
            pad = torch.full((int(op["rows"]), *t.shape[1:]), float(op.get("value", 0.0)), dtype=t.dtype)
            tensors = [torch.cat([t, pad], 0)]
        elif kind == "split":
            parts = torch.split(tensors[0], [int(s) for s in op["sizes"]], dim=int(op.get("dim", 0)))
            tensors = [p.contiguous() for p in parts]
        elif kind == "concat":
            tensors = [torch.cat(tensors, dim=int(op.get("dim", 0)))]
    return tensors


def describe(ops: list[dict[str, Any]]) -> str:
    return ", ".join(
        op["op"] + "(" + ", ".join(f"{k}={v}" for k, v in op.items() if k != "op") + ")" for op in ops
    )


def _fmt(specs: list[Spec]) -> str:
    return ", ".join(f"{list(s)} {d}" for s, d in specs)
