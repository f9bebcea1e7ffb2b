"""State trees as JSON: the only way non-tensor state reaches the disk.

A state tree is what ``state_dict()`` methods return: nested dicts, lists and tuples
of numbers, strings, None and tensors. Tensors leave the tree (the caller stores them
in safetensors and the tree keeps ``{"__tensor__": key}``); everything else becomes
JSON with a handful of tagged forms for what JSON lacks:

    {"__float__": "nan" | "inf" | "-inf"}      non-finite floats
    {"__tuple__": [...]}                        tuples (torch state dicts use them)
    {"__dict__": [[key, value], ...]}           dicts with non-string keys, or keys
                                                that collide with a tag
    {"__bytes__": "<base64>"}                   bytes
    {"__ext__": "<tag>", "v": ...}              a small registry of extra types
                                                (torch dtypes, numpy scalars…)

This module is torch-free: tensors and extension types are recognised through
callbacks. Anything else raises ``UnsupportedStateError`` naming the key path,
because silently pickling it is exactly what guardian promises never to do.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Callable
from typing import Any

from ..errors import CorruptCheckpointError, UnsupportedStateError

TAGS = frozenset({"__float__", "__tuple__", "__dict__", "__tensor__", "__bytes__", "__ext__"})

# encode_ext(value) -> (tag, json-able payload) or None if not an extension type
ExtEncoder = Callable[[Any], "tuple[str, Any] | None"]
ExtDecoder = Callable[[str, Any], Any]


def _child(path: str, key: Any) -> str:
    return f"{path}[{key!r}]" if path else repr(key)


class Encoder:
    """Turns a state tree into JSON-able data, handing tensors to ``put_tensor``.

    ``put_tensor(path_parts, tensor) -> key`` stores the tensor and returns the key
    that will reference it.
    """

    def __init__(
        self,
        is_tensor: Callable[[Any], bool],
        put_tensor: Callable[[tuple[str, ...], Any], str],
        encode_ext: ExtEncoder | None = None,
    ) -> None:
        self._is_tensor = is_tensor
        self._put_tensor = put_tensor
        self._encode_ext = encode_ext
        # (path parts, keys) of every string-keyed dict whose order is not sorted: the
        # JSON is written with sorted keys, and a user's dict must come back in the
        # order it was built (code that iterates it, a float sum, must not change)
        self.key_orders: list[tuple[tuple[str, ...], list[str]]] = []

    def encode(self, value: Any, parts: tuple[str, ...] = (), path: str = "") -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            if math.isfinite(value):
                return float(value)
            return {"__float__": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
        if self._is_tensor(value):
            return {"__tensor__": self._put_tensor(parts, value)}
        if isinstance(value, dict):
            return self._encode_dict(value, parts, path)
        if isinstance(value, list):
            return [self.encode(v, (*parts, str(i)), _child(path, i)) for i, v in enumerate(value)]
        if isinstance(value, tuple):
            items = [self.encode(v, (*parts, str(i)), _child(path, i)) for i, v in enumerate(value)]
            return {"__tuple__": items}
        if isinstance(value, (bytes, bytearray)):
            return {"__bytes__": base64.b64encode(bytes(value)).decode("ascii")}
        ext = self._encode_ext(value) if self._encode_ext else None
        if ext is not None:
            tag, payload = ext
            return {"__ext__": tag, "v": self.encode(payload, parts, path)}
        raise UnsupportedStateError(
            f"cannot store {type(value).__module__}.{type(value).__qualname__} at "
            f"{path or '<root>'} without pickle; give the object state_dict()/load_state_dict() "
            "returning tensors, numbers, strings, lists and dicts",
            key_path=path,
        )

    def _encode_dict(self, value: dict, parts: tuple[str, ...], path: str) -> Any:
        plain = all(isinstance(k, str) for k in value) and not (TAGS & value.keys())
        if plain:
            keys = list(value)
            if any(a > b for a, b in zip(keys, keys[1:])):
                self.key_orders.append((parts, keys))
            return {k: self.encode(v, (*parts, k), _child(path, k)) for k, v in value.items()}
        pairs = []
        for k, v in value.items():
            enc_key = self.encode(k, parts, path + ".<key>")
            pairs.append([enc_key, self.encode(v, (*parts, str(k)), _child(path, k))])
        return {"__dict__": pairs}


class Decoder:
    """The inverse of ``Encoder``; ``get_tensor(key)`` supplies the stored tensors."""

    def __init__(self, get_tensor: Callable[[str], Any], decode_ext: ExtDecoder | None = None) -> None:
        self._get_tensor = get_tensor
        self._decode_ext = decode_ext

    def decode(self, value: Any, path: str = "") -> Any:
        if isinstance(value, list):
            return [self.decode(v, _child(path, i)) for i, v in enumerate(value)]
        if not isinstance(value, dict):
            return value
        tag = next(iter(value)) if len(value) in (1, 2) else None
        if tag == "__float__" and len(value) == 1:
            return _decode_float(value["__float__"], path)
        if tag == "__tuple__" and len(value) == 1:
            items = value["__tuple__"]
            if not isinstance(items, list):
                raise CorruptCheckpointError(f"state at {path or '<root>'}: malformed __tuple__ entry")
            return tuple(self.decode(v, _child(path, i)) for i, v in enumerate(items))
        if tag == "__tensor__" and len(value) == 1:
            return self._get_tensor(value["__tensor__"])
        if tag == "__bytes__" and len(value) == 1:
            return _decode_bytes(value["__bytes__"], path)
        if tag == "__dict__" and len(value) == 1:
            return self._decode_pairs(value["__dict__"], path)
        if "__ext__" in value and set(value) == {"__ext__", "v"}:
            return self._decode_extension(value, path)
        return {k: self.decode(v, _child(path, k)) for k, v in value.items()}

    def _decode_pairs(self, pairs: Any, path: str) -> dict:
        if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise CorruptCheckpointError(f"state at {path or '<root>'}: malformed __dict__ entry")
        out = {}
        for k, v in pairs:
            key = self.decode(k, path)
            try:
                out[key] = self.decode(v, _child(path, key))
            except TypeError as e:  # unhashable key in a hostile file
                raise CorruptCheckpointError(f"state at {path}: unusable dict key {k!r}") from e
        return out

    def _decode_extension(self, value: dict, path: str) -> Any:
        if self._decode_ext is None:
            raise CorruptCheckpointError(f"state at {path}: extension value needs a decoder")
        return self._decode_ext(value["__ext__"], self.decode(value["v"], path))


def _decode_bytes(text: Any, path: str) -> bytes:
    if not isinstance(text, str):
        raise CorruptCheckpointError(f"state at {path or '<root>'}: malformed __bytes__ entry")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise CorruptCheckpointError(f"state at {path or '<root>'}: __bytes__ is not base64") from e


def _decode_float(text: Any, path: str) -> float:
    if text not in ("nan", "inf", "-inf"):
        raise CorruptCheckpointError(f"state at {path}: bad float tag {text!r}")
    return float(text)


def tensor_refs(value: Any) -> list[str]:
    """Every tensor key referenced by an encoded tree, in document order."""
    out: list[str] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if len(item) == 1 and "__tensor__" in item:
                out.append(item["__tensor__"])
            else:
                stack.extend(reversed(list(item.values())))
        elif isinstance(item, list):
            stack.extend(reversed(item))
    return out


def restore_key_orders(tree: Any, orders: Any) -> None:
    """Put the dicts of a decoded ``tree`` back in the key order ``Encoder.key_orders``
    recorded (stored as ``[{"at": [parts], "keys": [...]}, ...]``), in place.

    An order that does not fit is skipped, never an error: an order list only ever
    costs the order of keys, so a hand-edited or hostile one cannot change a value or
    stop a resume."""
    if not isinstance(orders, list):
        return
    by_str: dict[int, dict[str, Any]] = {}  # id(dict with non-string keys) → str(key) → value
    for entry in orders:
        if not isinstance(entry, dict):
            continue
        at, keys = entry.get("at"), entry.get("keys")
        if not (isinstance(at, list) and isinstance(keys, list)):
            continue
        if not all(isinstance(k, str) for k in at) or not all(isinstance(k, str) for k in keys):
            continue
        node = _walk(tree, at, by_str)
        if isinstance(node, dict) and len(node) == len(keys) and set(node) == set(keys):
            items = [(k, node[k]) for k in keys]
            node.clear()
            node.update(items)


def _walk(tree: Any, parts: list[str], by_str: dict[int, dict[str, Any]]) -> Any:
    """The node at ``parts`` (dict keys, or list indices as strings), or None.
    ``by_str`` indexes dicts with non-string keys (their parts are ``str(key)``) once,
    so an optimizer state keyed by int costs one pass, not one per parameter."""
    node = tree
    for part in parts:
        if isinstance(node, dict):
            if part in node:
                node = node[part]
            else:
                index = by_str.get(id(node))
                if index is None:
                    index = by_str[id(node)] = {str(k): v for k, v in node.items() if not isinstance(k, str)}
                node = index.get(part)
        elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node
