"""Reading what we migrate from: guardian checkpoints, safetensors files, and
plain PyTorch ``.pt``/``.pth`` state dicts.

``.pt`` files are pickles, and unpickling runs arbitrary code. They are read only
with ``torch.load(weights_only=True)``, which allows tensors and plain containers
and nothing else; when that refuses a file we refuse it too — there is no
fallback to full unpickling, because "the migration tool ran my checkpoint's code"
is not a failure mode a checkpoint library may have.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import GuardianError
from ..format import reader, safetensors_io
from ..format.hashing import hash_file, new_hasher
from ..format.manifest import Manifest
from .errors import InputRejectedError, PicklePayloadError
from .ops import Spec

MODULE_KIND = "module"
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")


@dataclass
class Source:
    """A loaded source. ``model`` holds the tensors being migrated under the key
    names the rules see; ``prefix`` turns a key into its optimizer parameter name."""

    path: str
    kind: str  # "guardian" | "safetensors" | "torch"
    model: dict[str, Any]
    fingerprint: str
    component: str = "model"
    prefix: str = ""
    components: dict[str, tuple[str, Any]] | None = None
    manifest: Manifest | None = None
    notes: list[str] = field(default_factory=list)
    ordered: bool = True  # keys in registration order (a .safetensors file is sorted)

    @property
    def specs(self) -> dict[str, Spec]:
        return {k: tensor_spec(t) for k, t in self.model.items() if _is_tensor(t)}

    def describe(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "kind": self.kind,
            "fingerprint": self.fingerprint,
            "component": self.component,
            "prefix": self.prefix,
            "ordered": self.ordered,
        }


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def tensor_spec(t: Any) -> Spec:
    from ..state.codec import tensor_spec as spec_of

    return spec_of(t)


def load_source(path: str | os.PathLike[str], component: str | None = None) -> Source:
    """Open ``path`` by what it is; every failure is an ``InputRejectedError`` subclass."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputRejectedError(f"{path}: no such checkpoint or file")
    try:
        if os.path.isdir(path):
            return _load_guardian(path, component)
        if path.endswith(".safetensors"):
            return _load_safetensors(path)
        if path.endswith((".pt", ".pth", ".bin")):
            return _load_torch(path)
    except InputRejectedError:
        raise
    except GuardianError as e:
        raise InputRejectedError(f"{path}: refused: {e}") from e
    raise InputRejectedError(f"{path}: not a guardian checkpoint directory, .safetensors, .pt or .pth file")


def _load_guardian(path: str, component: str | None) -> Source:
    from ..state.codec import read_components

    info = reader.inspect_checkpoint(path, verify=True)
    man = info.manifest
    if man is None or not info.valid:  # valid implies a manifest; the check says so to mypy
        raise InputRejectedError(f"{path}: not a valid checkpoint: " + "; ".join(info.problems))
    if man.world_size > 1:
        raise InputRejectedError(
            f"{path}: multi-rank checkpoints (world_size={man.world_size}) are not supported yet"
        )
    fingerprint = reader.checkpoint_digest(reader.component_summaries(path, man))
    stored = read_components(path)
    components = stored.components
    name = choose_component(components, component, path)
    modules = [n for n, (k, _) in components.items() if k == MODULE_KIND]
    prefix = "" if len(modules) == 1 else f"{name}."
    model = components[name][1]
    if not isinstance(model, dict):
        raise InputRejectedError(f"{path}: component {name!r} is not a flat state dict")
    check_keys(model, path)
    return Source(
        path=path,
        kind="guardian",
        model=dict(model),
        fingerprint=fingerprint,
        component=name,
        prefix=prefix,
        components=components,
        manifest=man,
        ordered=name in stored.ordered,
    )


def choose_component(components: dict[str, tuple[str, Any]], wanted: str | None, path: str) -> str:
    """The model component to migrate: the only one, or the one named."""
    modules = [n for n, (k, _) in components.items() if k == MODULE_KIND]
    if wanted is not None:
        if wanted not in modules:
            raise InputRejectedError(
                f"{path}: no model component {wanted!r} (models: {', '.join(modules) or 'none'})"
            )
        return wanted
    if len(modules) == 1:
        return modules[0]
    if not modules:
        raise InputRejectedError(f"{path}: holds no model component to migrate")
    raise InputRejectedError(
        f"{path}: holds several models ({', '.join(modules)}); choose one with --component NAME"
    )


def _load_safetensors(path: str) -> Source:
    from ..state.codec import read_tensor_file

    safetensors_io.read_layout(path)  # strict validation before any tensor is built
    tensors = read_tensor_file(path)
    return Source(path=path, kind="safetensors", model=tensors, fingerprint=hash_file(path)[0], ordered=False)


def _load_torch(path: str) -> Source:
    """weights_only=True only (see the module docstring); refusing is the safe answer."""
    import pickle  # only for the exception class torch.load(weights_only=True) raises; nothing is unpickled here

    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PicklePayloadError(
            f"{path}: refused: the file holds Python objects that torch.load(weights_only=True) "
            f"will not load ({first}). guardian never fully unpickles a file, because that runs "
            "arbitrary code. Re-save it as a plain state dict (torch.save(model.state_dict(), path)) "
            "or as .safetensors from trusted code."
        ) from e
    state, note = _find_state_dict(obj, path)
    check_keys(state, path)
    src = Source(path=path, kind="torch", model=state, fingerprint=hash_file(path)[0])
    if note:
        src.notes.append(note)
    return src


def _find_state_dict(obj: Any, path: str) -> tuple[dict[str, Any], str]:
    if _is_state_dict(obj):
        return dict(obj), ""
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if _is_state_dict(obj.get(key)):
                others = sorted(str(k) for k in obj if k != key)
                return dict(obj[key]), f"used {key!r} from {path}; ignored {others}" if others else ""
    raise InputRejectedError(
        f"{path}: no state dict found (expected a dict of tensors, or one under {', '.join(STATE_DICT_KEYS)})"
    )


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and _is_tensor(v) for k, v in obj.items())
    )


def check_keys(state: dict[str, Any], path: str) -> None:
    """Keys with NUL or newlines would break reports, logs and safetensors headers."""
    for key in state:
        if not isinstance(key, str) or not key or any(c in key for c in "\x00\n\r"):
            raise InputRejectedError(f"{path}: refused: key {key!r} is empty or holds NUL/newline characters")


def model_digest(model: dict[str, Any]) -> str:
    """A canonical hash of a flat state dict (names, dtypes, shapes, bytes), order-free."""
    from ..format import strictjson
    from ..state.codec import tensor_bytes

    h = new_hasher()
    for key in sorted(model):
        t = model[key]
        if not _is_tensor(t):
            h.update(strictjson.dumps([key, repr(t)]))
            continue
        shape, dtype = tensor_spec(t)
        h.update(strictjson.dumps([key, dtype, list(shape)]))
        h.update(tensor_bytes(t))
    return h.hexdigest()
