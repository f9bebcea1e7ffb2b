"""State trees ⇄ checkpoint files, for tools that rewrite checkpoints (``guardian migrate``).

The live library captures and restores state through ``snapshot``, ``tensors`` and
``components``; a tool that only reads a checkpoint's trees, changes them and writes
them back needs a handful of those functions, and should not depend on how they are
spread over the three modules. This module is that narrow door:

    read_components(dir)        name → (kind, tree); model state dicts in the order
                                their modules registered them (see ``capture``), and
                                which components that order is known for
    read_tensor_file(path)      a validated ``.safetensors`` file as name → tensor
    write_components(txn, ...)  trees into a pending checkpoint (commit protocol)
    tensor_spec / torch_dtype / tensor_bytes / unwrap_module

Everything here keeps the library's guarantees: strict validation before a byte
becomes a tensor, no pickle, writes only through ``CheckpointTxn``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from ..commit import CheckpointTxn
from ..format.layout import STATE_FILE
from ..format.reader import load_state_json
from . import snapshot
from . import tensors as T
from .components import unwrap_module

log = logging.getLogger(__name__)

Spec = tuple[tuple[int, ...], str]

__all__ = [
    "Spec",
    "StoredState",
    "read_components",
    "read_tensor_file",
    "write_components",
    "tensor_spec",
    "torch_dtype",
    "tensor_bytes",
    "unwrap_module",
]


@dataclass
class StoredState:
    """A checkpoint's components; ``ordered`` names the model components whose keys
    are in registration order (checkpoints written before the order was recorded, or
    with an unusable order list, come back sorted — a matcher must not trust that)."""

    components: dict[str, tuple[str, Any]]
    ordered: set[str] = field(default_factory=set)


def read_components(ckpt_dir: str) -> StoredState:
    """Every component of a (single-rank) checkpoint, tensors read and verified.

    Model state dicts come back in their registration order when the checkpoint
    recorded it (``state.json`` itself is written with sorted keys); an order list
    that is not exactly a permutation of the stored keys is ignored, so a hand-edited
    or hostile list can only cost the order, never a tensor.
    """
    out = StoredState(snapshot.load(ckpt_dir))
    orders = _recorded_orders(ckpt_dir)
    for name, (kind, tree) in list(out.components.items()):
        order = orders.get(name)
        if kind == "module" and isinstance(tree, dict) and order is not None and _fits(tree, order, name):
            out.components[name] = (kind, {k: tree[k] for k in order})
            out.ordered.add(name)
    return out


def _recorded_orders(ckpt_dir: str) -> dict[str, list[str]]:
    state = load_state_json(ckpt_dir, STATE_FILE)
    out = {}
    for name, comp in state.get("components", {}).items():
        order = comp.get("order") if isinstance(comp, dict) else None
        if isinstance(order, list) and all(isinstance(k, str) for k in order):
            out[name] = order
    return out


def _fits(tree: dict[str, Any], order: list[str], name: str) -> bool:
    if len(order) != len(tree) or set(order) != set(tree):
        log.warning("component %r: recorded key order does not match its keys; using sorted order", name)
        return False
    return True


def read_tensor_file(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file, in file order, header validated first."""
    return snapshot.read_tensors(path)


def write_components(txn: CheckpointTxn, components: dict[str, tuple[str, Any]]) -> dict[str, str]:
    """Encode ``components`` (name → (kind, tree)) into ``txn``'s files; returns name → kind
    for the manifest. The caller commits ``txn``."""
    snap = snapshot.capture(components)
    snapshot.write_files(txn, snap)
    return {n: c["kind"] for n, c in snap.components.items()}


def tensor_spec(t: torch.Tensor) -> Spec:
    """``(shape, safetensors dtype name)``: what planning compares, torch-free afterwards."""
    return tuple(int(d) for d in t.shape), T.st_dtype(t)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (``KeyError`` if this torch lacks it)."""
    return T.ST_TO_TORCH[name]


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's bytes as a flat view (hashing, comparisons)."""
    return T.cpu_bytes(t)
