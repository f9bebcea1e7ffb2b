"""Is a verified checkpoint actually restorable? Checked on meta tensors, before any
live object is touched.

The integrity hashes in a manifest are unkeyed: anyone who edits a checkpoint can
re-hash it, and ``verify`` will pass. So everything the resume code is about to
hand to ``random.setstate``, ``torch.set_rng_state``, an optimizer or the progress
counters is validated here as if the bytes were hostile — types, sizes, dtypes,
ranges, and the checkpoint's consistency with itself (an optimizer moment must have
its parameter's stored shape and kind of dtype).

The contract with the resume code: ``check_restorable(meta, path)`` runs in the meta
pass (after ``snapshot.load_meta`` and each adapter's ``check_state``) and raises
``CorruptCheckpointError`` for anything internally inconsistent or hostile; the
caller then sets that checkpoint aside and tries the next older one. A mismatch
between a well-formed checkpoint and the *live* objects is the adapters' business
and stays ``StateMismatchError`` (the user's to fix; never set aside).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import fields
from typing import Any

import numpy as np
import torch

from ..errors import CorruptCheckpointError
from ..policies import PolicyState

MAX_COUNTER = 2**63 - 1
PROGRESS_COUNTERS = ("epoch", "global_step", "batch_in_epoch", "batches_total")
# Per-parameter optimizer state that always has its parameter's shape (torch.optim).
MIRRORS_PARAM = frozenset(
    {
        "exp_avg",
        "exp_avg_sq",
        "max_exp_avg_sq",
        "momentum_buffer",
        "sum",
        "square_avg",
        "acc_delta",
        "grad_avg",
        "exp_inf",
        "ax",
        "prev",
        "step_size",
    }
)
MT_WORDS = 624
PYTHON_STATE_WORDS = MT_WORDS + 1  # 624 words + the position
MAX_DEVICE_STATE_BYTES = 1 << 16


def check_restorable(meta: dict[str, tuple[str, Any]], path: str) -> None:
    """Raise ``CorruptCheckpointError`` unless the reserved components (``rng``,
    ``progress``, ``policy``, ``extra``) and the cross-component facts of ``meta``
    (name → (kind, tree) with meta tensors, as ``snapshot.load_meta`` returns) could
    be restored as they are."""
    problems: list[str] = []
    for name, check in (("progress", _check_progress), ("rng", _check_rng)):
        if name not in meta:
            problems.append(f"the {name!r} component is missing")
            continue
        problems += _run(check, meta[name], name)
    for name, check in (("policy", _check_policy), ("extra", _check_extra)):
        if name in meta:
            problems += _run(check, meta[name], name)
    problems += _check_optimizers_against_modules(meta)
    if problems:
        raise CorruptCheckpointError(
            f"{path} verifies but cannot be restored (forged or damaged state): " + "; ".join(problems[:10]),
            problems,
        )


def _run(check: Any, entry: Any, name: str) -> list[str]:
    if not isinstance(entry, tuple) or len(entry) != 2:
        return [f"{name}: malformed component"]
    kind, tree = entry
    if kind != name:
        return [f"{name}: stored as kind {str(kind)[:40]!r}, expected {name!r}"]
    return [f"{name}: {p}" for p in check(tree)]


# ---------------------------------------------------------------------- progress


def _check_progress(tree: Any) -> list[str]:
    if not isinstance(tree, dict):
        return [f"expected an object, got {type(tree).__name__}"]
    problems = [p for key in PROGRESS_COUNTERS for p in _counter(tree, key)]
    start = tree.get("epoch_start")
    if start is not None:
        if not isinstance(start, dict):
            problems.append("epoch_start is not an object")
        else:
            problems += [
                f"epoch_start.torch {p}" for p in generator_state_problems(start.get("torch"), "cpu")
            ]
            problems += _generator_list(start.get("generators"), "epoch_start.generators", allow_none=False)
    problems += _generator_list(tree.get("loader_generators"), "loader_generators", allow_none=True)
    return problems


def _counter(tree: dict[str, Any], key: str) -> list[str]:
    value = tree.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        return [f"{key} is {_show(value)}, not an integer"]
    if not 0 <= value <= MAX_COUNTER:
        return [f"{key} is {value}, out of range"]
    return []


def _generator_list(value: Any, where: str, *, allow_none: bool) -> list[str]:
    if value is None and allow_none:
        return []
    if not isinstance(value, list):
        return [f"{where} is {_show(value)}, not a list"]
    return [f"{where}[{i}] {p}" for i, s in enumerate(value) for p in generator_state_problems(s, "any")]


# ---------------------------------------------------------------------- RNG


def generator_state_problems(state: Any, device: str) -> list[str]:
    """A torch generator state: a 1-D uint8 tensor of the size this torch uses
    (``device`` "cpu"), or of a small device-generator size ("cuda"/"any")."""
    if not isinstance(state, torch.Tensor):
        return [f"is {_show(state)}, not a tensor"]
    if state.dtype != torch.uint8 or state.dim() != 1:
        return [f"is a {state.dtype} tensor of shape {tuple(state.shape)}, not a 1-D uint8 state"]
    cpu_size = torch.get_rng_state().numel()
    n = state.numel()
    if device == "cpu" and n != cpu_size:
        return [f"holds {n} bytes; a CPU generator state has {cpu_size}"]
    if n == 0 or n > max(cpu_size, MAX_DEVICE_STATE_BYTES):
        return [f"holds {n} bytes; no generator state has that size"]
    return []


def python_state_problems(state: Any) -> list[str]:
    """``random.getstate()``: (3, 625 ints — 624 32-bit words and a position ≤ 624, gauss)."""
    if not isinstance(state, (tuple, list)) or len(state) != 3:
        return [f"is {_show(state)}, not a (version, words, gauss) triple"]
    version, words, gauss = state
    if version != 3 or isinstance(version, bool):
        return [f"has version {_show(version)}, expected 3"]
    if not isinstance(words, (tuple, list)) or len(words) != PYTHON_STATE_WORDS:
        return [f"holds {_show(words)} instead of {PYTHON_STATE_WORDS} integers"]
    if not all(type(w) is int and 0 <= w < 2**32 for w in words) or words[-1] > MT_WORDS:
        return ["holds words outside 0..2**32-1 or a position past 624"]
    if gauss is not None and not _finite(gauss):
        return [f"has gauss {_show(gauss)}, not a number or None"]
    return []


def numpy_legacy_problems(state: Any) -> list[str]:
    """``np.random.get_state(legacy=True)``: ('MT19937', uint32[624], pos, has_gauss, gauss)."""
    if not isinstance(state, (tuple, list)) or len(state) != 5:
        return [f"is {_show(state)}, not numpy's 5-field legacy state"]
    name, key, pos, has_gauss, gauss = state
    if name != "MT19937":
        return [f"names bit generator {_show(name)}, expected 'MT19937'"]
    if not isinstance(key, np.ndarray) or key.dtype != np.uint32 or key.shape != (MT_WORDS,):
        return [f"key is {_show(key)}, not uint32[{MT_WORDS}]"]
    if type(pos) is not int or not 0 <= pos <= MT_WORDS:
        return [f"position {_show(pos)} is out of range"]
    if has_gauss not in (0, 1) or isinstance(has_gauss, float) or not _finite(gauss):
        return ["cached gaussian fields are malformed"]
    return []


def numpy_generator_problems(state: Any) -> list[str]:
    """``np.random.Generator.bit_generator.state``: a dict naming a known bit generator."""
    if not isinstance(state, dict) or not isinstance(state.get("bit_generator"), str):
        return [f"is {_show(state)}, not a numpy bit-generator state"]
    if state["bit_generator"] not in ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64"):
        return [f"names unknown bit generator {state['bit_generator'][:40]!r}"]
    if not isinstance(state.get("state"), dict):
        return ["has no 'state' object"]
    return []


def _check_rng(tree: Any) -> list[str]:
    if not isinstance(tree, dict):
        return [f"expected an object, got {type(tree).__name__}"]
    problems = [f"python {p}" for p in python_state_problems(tree.get("python"))]
    problems += [f"numpy {p}" for p in numpy_legacy_problems(tree.get("numpy"))]
    problems += [f"torch {p}" for p in generator_state_problems(tree.get("torch"), "cpu")]
    cuda = tree.get("cuda")
    if cuda is not None:
        if not isinstance(cuda, list):
            problems.append(f"cuda is {_show(cuda)}, not a list")
        else:
            problems += [
                f"cuda[{i}] {p}" for i, s in enumerate(cuda) for p in generator_state_problems(s, "cuda")
            ]
    return problems


# ---------------------------------------------------------------------- policy, extra


_POLICY_TYPES = {f.name: f.type for f in fields(PolicyState)}


def _check_policy(tree: Any) -> list[str]:
    if not isinstance(tree, dict):
        return [f"expected an object, got {type(tree).__name__}"]
    problems = []
    for key, value in tree.items():
        declared = _POLICY_TYPES.get(key)
        if declared is None:
            continue  # written by a newer guardian; load_state_dict ignores it
        if "bool" in str(declared):
            ok = isinstance(value, bool)
        elif "float" in str(declared):
            ok = value is None or (not isinstance(value, bool) and _finite(value))
        else:
            ok = (value is None and "None" in str(declared)) or (
                type(value) is int and 0 <= value <= MAX_COUNTER
            )
        if not ok:
            problems.append(f"{key} is {_show(value)}, expected {declared}")
    return problems


def _check_extra(tree: Any) -> list[str]:
    if not isinstance(tree, dict):
        return [f"expected an object, got {type(tree).__name__}"]
    for where, value in _walk(tree):
        if isinstance(value, dict) and not all(isinstance(k, str) for k in value):
            return [f"{where} has non-string keys"]
        if not isinstance(value, (dict, list, tuple, str, int, float, bool, bytes, type(None))):
            return [f"{where} is a {type(value).__name__}; extras hold JSON-able values only"]
    return []


def _walk(tree: Any) -> Iterator[tuple[str, Any]]:
    stack: list[tuple[str, Any]] = [("extra", tree)]
    while stack:
        where, value = stack.pop()
        yield where, value
        if isinstance(value, dict):
            stack.extend((f"{where}[{k!r}]", v) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(value))


# ---------------------------------------------------------------------- optimizer ⇄ model


def _check_optimizers_against_modules(meta: dict[str, tuple[str, Any]]) -> list[str]:
    """Each optimizer moment that mirrors a parameter must have the shape and the kind
    of dtype the checkpoint stores for that parameter (a swapped shape or an F32→I32
    swap would otherwise be loaded into the live optimizer)."""
    modules = {n: tree for n, (kind, tree) in meta.items() if kind == "module" and isinstance(tree, dict)}
    problems = []
    for name, (kind, tree) in meta.items():
        if kind != "optimizer" or not isinstance(tree, dict) or not isinstance(tree.get("state"), dict):
            continue
        for pname, pstate in tree["state"].items():
            param = _stored_param(modules, pname)
            if not isinstance(pstate, dict) or not isinstance(param, torch.Tensor):
                continue
            for key, value in pstate.items():
                if key in MIRRORS_PARAM and isinstance(value, torch.Tensor):
                    problems += _mirror_problems(f"{name}[{pname!r}][{key!r}]", value, param)
    return problems


def _stored_param(modules: dict[str, Any], pname: Any) -> Any:
    if not isinstance(pname, str):
        return None
    if len(modules) == 1:
        return next(iter(modules.values())).get(pname)
    head, _, rest = pname.partition(".")
    return modules.get(head, {}).get(rest)


def _mirror_problems(where: str, value: torch.Tensor, param: torch.Tensor) -> list[str]:
    if tuple(value.shape) != tuple(param.shape):
        return [f"{where} has shape {tuple(value.shape)} but its parameter is stored as {tuple(param.shape)}"]
    if dtype_family(value.dtype) != dtype_family(param.dtype):
        return [f"{where} is {value.dtype} but its parameter is stored as {param.dtype}"]
    return []


def dtype_family(dtype: torch.dtype) -> str:
    """float / complex / int / bool: a width-preserving swap between families (F32→I32)
    reinterprets bytes; a change within a family is an ordinary cast."""
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "float"
    return "int"


def _finite(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
