"""Training state ⇄ checkpoint files (one ``state.json`` + one ``tensors.safetensors``).

``capture`` walks every component's state tree once: tensors are collected by
reference under readable keys (``model/conv1.weight``,
``optimizer/state/conv1.weight/exp_avg``), the rest becomes tagged JSON (see
format/tree.py). ``write_files`` streams both files through the commit protocol;
``load`` reads them back, validating the tensor file strictly before a byte of it
becomes a tensor. No pickle on either path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..commit import CheckpointTxn
from ..errors import CorruptCheckpointError
from ..format import safetensors_io, strictjson
from ..format.layout import FORMAT_ID, FORMAT_VERSION, STATE_FILE, TENSORS_FILE
from ..format.reader import load_state_json
from ..format.tree import Decoder, Encoder
from . import tensors as T


def _escape(part: str) -> str:
    return part.replace("%", "%25").replace("/", "%2F").replace("\x00", "%00").replace("\n", "%0A").replace("\r", "%0D")


@dataclass
class Snapshot:
    """A consistent view of the state at one step boundary. Tensors are *references*
    to live tensors: write them (or copy them to a staging area) before training
    continues."""

    components: dict[str, dict[str, Any]] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def state_json(self) -> bytes:
        return strictjson.dumps({"format": FORMAT_ID, "version": FORMAT_VERSION, "components": self.components})

    def layout(self) -> safetensors_io.Layout:
        specs = [(k, T.st_dtype(t), tuple(t.shape)) for k, t in self.tensors.items()]
        return safetensors_io.plan_layout(specs, metadata={"format": FORMAT_ID})


def capture(states: dict[str, tuple[str, Any]]) -> Snapshot:
    """``states``: name → (kind, state tree). Returns the encoded snapshot."""
    snap = Snapshot()

    def put(component: str):
        def _put(parts: tuple[str, ...], tensor: torch.Tensor) -> str:
            base = "/".join([_escape(component), *(_escape(p) for p in parts)])
            key, n = base, 1
            while key in snap.tensors:
                key, n = f"{base}#{n}", n + 1
            snap.tensors[key] = tensor.detach()
            return key

        return _put

    for name, (kind, tree) in states.items():
        encoder = Encoder(T.is_tensor, put(name), T.encode_ext)
        snap.components[name] = {"kind": kind, "state": encoder.encode(tree, (), name)}
    return snap


def tensor_chunks(snap: Snapshot, layout: safetensors_io.Layout) -> Iterator[memoryview | bytes]:
    yield layout.header
    for entry in layout.entries:
        if entry.nbytes:
            yield T.cpu_bytes(snap.tensors[entry.key])


def write_files(txn: CheckpointTxn, snap: Snapshot, prefix: str = "") -> None:
    """Write this snapshot's two files into a pending checkpoint (synchronously)."""
    layout = snap.layout()
    txn.add_file(prefix + TENSORS_FILE, tensor_chunks(snap, layout))
    txn.add_file(prefix + STATE_FILE, [snap.state_json()])


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    """Read every tensor of a safetensors file after validating its header strictly."""
    layout = safetensors_io.read_layout(path)
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb", buffering=0) as f:
        for e in sorted(layout.entries, key=lambda e: e.begin):
            dtype = T.ST_TO_TORCH.get(e.dtype)
            if dtype is None:
                raise CorruptCheckpointError(f"{path}: dtype {e.dtype} is not supported by this torch")
            t = torch.empty(e.shape, dtype=dtype)
            if e.nbytes:
                f.seek(layout.data_start + e.begin)
                view = memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")
                _read_exactly(f, view, path)
            out[e.key] = t
    return out


def _read_exactly(f: Any, view: memoryview, path: str) -> None:
    while view:
        n = f.readinto(view)
        if not n:
            raise CorruptCheckpointError(f"{path}: file ended early (truncated)")
        view = view[n:]


def load(ckpt_dir: str, prefix: str = "") -> dict[str, tuple[str, Any]]:
    """name → (kind, decoded state tree) for one rank's files of a checkpoint."""
    state = load_state_json(ckpt_dir, prefix + STATE_FILE)
    tensors_path = os.path.join(ckpt_dir, prefix + TENSORS_FILE)
    tensors = read_tensors(tensors_path)

    def get(key: str) -> torch.Tensor:
        try:
            return tensors[key]
        except (KeyError, TypeError):
            raise CorruptCheckpointError(f"{tensors_path}: state references missing tensor {key!r}") from None

    decoder = Decoder(get, T.decode_ext)
    out = {}
    for name, comp in state["components"].items():
        if not isinstance(comp, dict) or "kind" not in comp or "state" not in comp:
            raise CorruptCheckpointError(f"{ckpt_dir}: malformed component {name!r}")
        out[name] = (comp["kind"], decoder.decode(comp["state"], name))
    return out
