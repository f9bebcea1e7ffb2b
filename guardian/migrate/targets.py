"""What we migrate towards: a model factory, a signature file, or a checkpoint.

A factory (``package.module:callable``) is called under ``torch.device("meta")`` so
the target model costs no memory and no initialisation time — only names, shapes,
dtypes, which entries are parameters (for the optimizer) and which share storage
(tied weights) are read. A *signature* file stores exactly that, so plans can be
made where the model code is not installed.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from ..errors import GuardianError
from ..format import reader, safetensors_io, strictjson
from ..format.layout import MANIFEST_FILE, STATE_FILE
from .errors import InputRejectedError
from .ops import Spec

SIGNATURE_FORMAT = "guardian.migrate.signature/1"
MAX_SIGNATURE_BYTES = 64 * 1024 * 1024


@dataclass
class Target:
    description: str
    specs: dict[str, Spec]
    params: list[str] = field(default_factory=list)  # parameter names, registration order
    tied: list[list[str]] = field(default_factory=list)
    factory: str | None = None
    checkpoint: str | None = None  # a target checkpoint supplies "model" init values

    def to_signature(self) -> dict[str, Any]:
        return {
            "format": SIGNATURE_FORMAT,
            "description": self.description,
            "tensors": {k: {"shape": list(s), "dtype": d} for k, (s, d) in self.specs.items()},
            "order": list(self.specs),
            "params": list(self.params),
            "tied": [list(g) for g in self.tied],
        }


def load_target(spec: str) -> Target:
    """``pkg.mod:factory``, a signature ``.json``, a checkpoint dir, or a tensor file."""
    try:
        if os.path.isdir(spec):
            return _from_checkpoint(spec)
        if os.path.isfile(spec):
            return _from_file(spec)
        if ":" in spec:
            return from_factory(spec)
    except InputRejectedError:
        raise
    except GuardianError as e:
        raise InputRejectedError(f"target {spec}: refused: {e}") from e
    raise InputRejectedError(f"target {spec!r}: not a file, checkpoint directory or package.module:factory")


def resolve_factory(spec: str) -> Any:
    """Import ``package.module:attr.attr`` (the current directory is importable, as
    with ``python -m``)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise InputRejectedError(f"target {spec!r}: write a factory as package.module:callable")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise InputRejectedError(f"target {spec!r}: cannot import it ({e})") from e
    if not callable(obj):
        raise InputRejectedError(f"target {spec!r}: is not callable")
    return obj


def build_meta(spec: str) -> Any:
    """The target model on the meta device (nothing allocated, nothing initialised)."""
    import torch

    factory = resolve_factory(spec)
    try:
        with torch.device("meta"):
            model = factory()
    except Exception as e:  # the user's constructor: report whatever it raised
        raise InputRejectedError(
            f"target {spec!r}: calling it on the meta device failed ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(model, torch.nn.Module):
        raise InputRejectedError(f"target {spec!r}: returned {type(model).__name__}, not a torch.nn.Module")
    return model


def from_factory(spec: str) -> Target:
    target = from_module(build_meta(spec), description=spec)
    target.factory = spec
    return target


def from_module(model: Any, description: str = "") -> Target:
    """Signature of a live (or meta) module: its state_dict plus tied groups."""
    from ..state.codec import tensor_spec, unwrap_module

    model = unwrap_module(model)
    sd = model.state_dict(keep_vars=True)
    specs = {k: tensor_spec(v) for k, v in sd.items() if hasattr(v, "shape")}
    by_id: dict[int, list[str]] = {}
    for k, v in sd.items():
        by_id.setdefault(id(v), []).append(k)
    tied = [names for names in by_id.values() if len(names) > 1]
    params = [n for n, _ in model.named_parameters()]
    return Target(description=description or type(model).__name__, specs=specs, params=params, tied=tied)


def _from_file(path: str) -> Target:
    if path.endswith(".json"):
        return read_signature(path)
    if path.endswith(".safetensors"):
        layout = safetensors_io.read_layout(path)
        return Target(description=path, specs={e.key: (e.shape, e.dtype) for e in layout.entries})
    from .sources import load_source

    src = load_source(path)
    return Target(description=path, specs=src.specs)


def read_signature(path: str) -> Target:
    with open(path, "rb") as f:
        data = f.read(MAX_SIGNATURE_BYTES + 1)
    obj = strictjson.loads(data, what=path, max_bytes=MAX_SIGNATURE_BYTES)
    if not isinstance(obj, dict) or obj.get("format") != SIGNATURE_FORMAT:
        raise InputRejectedError(
            f"{path}: not a guardian signature file (format {SIGNATURE_FORMAT!r} expected)"
        )
    try:
        tensors = obj["tensors"]
        order = obj.get("order", list(tensors))
        specs = {k: (tuple(int(d) for d in tensors[k]["shape"]), str(tensors[k]["dtype"])) for k in order}
        for k in specs:
            safetensors_io.check_key(k)
        return Target(
            description=str(obj.get("description", path)),
            specs=specs,
            params=[str(p) for p in obj.get("params", [])],
            tied=[[str(k) for k in g] for g in obj.get("tied", [])],
        )
    except (KeyError, TypeError, ValueError) as e:
        raise InputRejectedError(f"{path}: malformed signature file ({type(e).__name__}: {e})") from e


def write_signature(target: Target, path: str) -> None:
    """Small file, written atomically (tmp + rename)."""
    from ..smallfiles import write_small_file_atomically

    write_small_file_atomically(path, strictjson.dumps_pretty(target.to_signature()))


def _from_checkpoint(path: str) -> Target:
    """Torch-free: names and shapes come from state.json and the safetensors header."""
    if not os.path.exists(os.path.join(path, MANIFEST_FILE)):
        raise InputRejectedError(f"target {path}: a directory without {MANIFEST_FILE} is not a checkpoint")
    state = reader.load_state_json(path, STATE_FILE)
    entries = {  # an incremental checkpoint keeps its unchanged tensors in a second file
        e.key: e for f in reader.tensor_files(path) for e in safetensors_io.read_layout(f).entries
    }
    comps = state["components"]
    modules = [n for n, c in comps.items() if isinstance(c, dict) and c.get("kind") == "module"]
    if len(modules) != 1:
        raise InputRejectedError(f"target {path}: needs exactly one model component, found {modules}")
    specs = {}
    for key, ref in comps[modules[0]]["state"].items():
        if isinstance(ref, dict) and "__tensor__" in ref and ref["__tensor__"] in entries:
            e = entries[ref["__tensor__"]]
            specs[key] = (e.shape, e.dtype)
    params = _checkpoint_params(comps)
    return Target(description=path, specs=specs, params=params, checkpoint=path)


def _checkpoint_params(comps: dict[str, Any]) -> list[str]:
    for c in comps.values():
        if isinstance(c, dict) and c.get("kind") == "optimizer":
            groups = c["state"].get("param_groups", []) if isinstance(c["state"], dict) else []
            return [n for g in groups if isinstance(g, dict) for n in g.get("params", [])]
    return []
