"""torch ⇄ safetensors: dtypes, raw bytes, and the few non-tensor types torch state holds."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..errors import CorruptCheckpointError

TORCH_TO_ST: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.uint16: "U16",
    torch.int32: "I32",
    torch.uint32: "U32",
    torch.int64: "I64",
    torch.uint64: "U64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.complex64: "C64",
}
for _name, _st in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        TORCH_TO_ST[getattr(torch, _name)] = _st
ST_TO_TORCH = {v: k for k, v in TORCH_TO_ST.items()}


def is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def st_dtype(t: torch.Tensor) -> str:
    try:
        return TORCH_TO_ST[t.dtype]
    except KeyError:
        raise CorruptCheckpointError(f"tensor dtype {t.dtype} has no safetensors equivalent") from None


def cpu_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes as a flat view (copies only if the tensor is not contiguous CPU)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def encode_ext(value: Any) -> tuple[str, Any] | None:
    """Non-tensor objects that appear inside torch/numpy state dicts."""
    if isinstance(value, torch.dtype):
        return "torch.dtype", str(value).removeprefix("torch.")
    if isinstance(value, torch.device):
        return "torch.device", str(value)
    if isinstance(value, np.ndarray):
        return "numpy.ndarray", {
            "dtype": value.dtype.str,
            "shape": list(value.shape),
            "data": value.ravel().tolist(),
        }
    if isinstance(value, np.generic):
        return "numpy.scalar", {"dtype": value.dtype.str, "value": value.item()}
    return None


def decode_ext(tag: str, payload: Any) -> Any:
    try:
        if tag == "torch.dtype":
            dtype = getattr(torch, payload)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(payload)
            return dtype
        if tag == "torch.device":
            return torch.device(payload)
        if tag == "numpy.ndarray":
            return _numpy_array(payload)
        if tag == "numpy.scalar":
            return plain_numpy_dtype(payload["dtype"]).type(payload["value"])
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as e:
        raise CorruptCheckpointError(f"malformed {tag} value {str(payload)[:120]}") from e
    raise CorruptCheckpointError(f"unknown value type {tag!r} (written by a newer guardian?)")


MAX_NUMPY_ITEMSIZE = 16


def plain_numpy_dtype(spec: Any) -> np.dtype:
    """A numeric numpy dtype from its string form — never a sub-array dtype
    (``"(1000000000,)u1"`` would make each element a GiB), a structured one, or
    objects: those never appear in the state guardian saves."""
    if not isinstance(spec, str) or len(spec) > 8:
        raise ValueError(f"not a plain dtype: {str(spec)[:40]!r}")
    dtype = np.dtype(spec)
    if (
        dtype.kind not in "biufc"
        or dtype.subdtype is not None
        or dtype.fields
        or dtype.itemsize > MAX_NUMPY_ITEMSIZE
    ):
        raise ValueError(f"not a plain numeric dtype: {spec!r}")
    return dtype


def _numpy_array(payload: Any) -> np.ndarray:
    """The stored array, after checking that shape and data agree (nothing is
    allocated beyond the numbers the file really holds)."""
    dtype = plain_numpy_dtype(payload["dtype"])
    shape, data = payload["shape"], payload["data"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape) or len(shape) > 32:
        raise ValueError("bad shape")
    if not isinstance(data, list) or math.prod(shape) != len(data):
        raise ValueError("shape and data disagree")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) or dtype.kind == "b" for x in data):
        raise ValueError("non-numeric data")
    return np.array(data, dtype=dtype).reshape(shape)
