"""JSON that a hostile checkpoint cannot abuse.

Checkpoint metadata is read with bounded size and nesting, and with duplicate keys
rejected (two parsers could otherwise disagree about what a file says). Writing is
canonical (sorted keys, no NaN literals) so hashes of JSON are stable.
"""

from __future__ import annotations

import json
import math
from typing import Any

from ..errors import CorruptCheckpointError, UnsafeCheckpointError

MAX_JSON_BYTES = 256 * 1024 * 1024
MAX_DEPTH = 200

# What parsing costs in memory, estimated from the raw bytes before parsing: every
# container becomes a Python list/dict (~80 bytes with its GC header and slot), every
# other value at least a pointer in its container. Real checkpoint metadata (tensor
# entries, parameter names, RNG words, numbers) stays well under COST_RATIO bytes
# of Python per byte of JSON; a file of tiny lists (``[[],[],…]``) needs ~25 and is
# refused before the parser allocates anything. Files under COST_FLOOR always pass.
CONTAINER_COST = 80
VALUE_COST = 8
COST_RATIO = 12
COST_FLOOR = 1 << 20


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise UnsafeCheckpointError(f"duplicate JSON key {key!r}")
        out[key] = value
    return out


def _depth(value: Any, limit: int) -> int:
    """Iterative depth check: recursion on hostile input must not blow the stack."""
    stack = [(value, 1)]
    deepest = 0
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > limit:
            return depth
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def _reject_constant(name: str) -> Any:
    raise UnsafeCheckpointError(f"non-standard JSON constant {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to inf, which no valid file holds
        raise UnsafeCheckpointError(f"number {text[:40]!r} is out of range")
    return value


def parse_cost(data: bytes | str) -> int:
    """An upper estimate of the Python memory ``json.loads(data)`` would build."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    containers = raw.count(b"[") + raw.count(b"{")
    return CONTAINER_COST * containers + VALUE_COST * (raw.count(b",") + raw.count(b":"))


def loads(data: bytes | str, *, what: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse untrusted JSON; ``what`` names the file for error messages.

    Refused before parsing: more than ``max_bytes``, or a structure that would cost
    far more memory than its size (see ``COST_RATIO``)."""
    if len(data) > max_bytes:
        raise UnsafeCheckpointError(f"{what}: {len(data)} bytes of JSON exceeds the {max_bytes}-byte limit")
    cost = parse_cost(data)
    if cost > COST_FLOOR and cost > COST_RATIO * len(data):
        raise UnsafeCheckpointError(
            f"{what}: {len(data)} bytes of JSON made of ~{cost // CONTAINER_COST} tiny lists/objects would "
            "take far more memory to parse than any checkpoint metadata needs; refusing it"
        )
    try:
        value = json.loads(
            data,
            object_pairs_hook=_reject_duplicates,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
        )
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{what}: {e}") from e
    except RecursionError as e:
        raise UnsafeCheckpointError(f"{what}: JSON nested too deeply") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"{what}: not valid JSON ({e})") from e
    if _depth(value, MAX_DEPTH) > MAX_DEPTH:
        raise UnsafeCheckpointError(f"{what}: JSON nested deeper than {MAX_DEPTH} levels")
    return value


def dumps(value: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, compact, no NaN/Infinity literals, ASCII-only
    (escapes keep lone surrogates — os.fsdecode's non-UTF-8 paths — round-tripping)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("ascii")


def dumps_pretty(value: Any) -> bytes:
    """Human-readable canonical JSON, for files people open (manifest, run status)."""
    return (json.dumps(value, sort_keys=True, indent=1, allow_nan=False) + "\n").encode("ascii")
