"""Adapters that give every kind of training object the same two methods.

Each adapter has a ``kind`` and ``state_dict()``/``load_state_dict()`` in guardian's
terms — which differ from torch's where torch's form is unsafe to resume from:
optimizer state is keyed by parameter *name*, not position, so a reordered or
renamed model can never silently receive another parameter's moments.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..errors import CorruptCheckpointError, StateMismatchError
from .validate import dtype_family


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


def unwrap_module(module: nn.Module) -> nn.Module:
    """Strip DDP/DataParallel (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        else:
            return module


class ModuleState:
    kind = "module"

    def __init__(self, module: nn.Module) -> None:
        self.module = unwrap_module(module)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.module.state_dict())

    def check_state(self, state: dict[str, Any], where: str = "model") -> None:
        check_module_state(self.module, state, where)

    def load_state_dict(self, state: dict[str, torch.Tensor], where: str = "model") -> None:
        check_module_state(self.module, state, where)
        self.module.load_state_dict(state, strict=True)


def _check_module_values(state: Any, live: dict[str, Any], where: str) -> None:
    if not isinstance(state, dict):
        raise CorruptCheckpointError(
            f"the checkpoint's {where!r} is a {type(state).__name__}, not a state dict"
        )
    bad = [
        k for k, v in state.items() if not isinstance(v, torch.Tensor) and not str(k).endswith("_extra_state")
    ]
    swapped = [
        f"{k}: stored {state[k].dtype}, model {live[k].dtype}"
        for k in sorted(set(live) & set(state))
        if isinstance(state[k], torch.Tensor)
        and isinstance(live[k], torch.Tensor)
        and dtype_family(state[k].dtype) != dtype_family(live[k].dtype)
    ]
    if bad:
        raise CorruptCheckpointError(
            f"the checkpoint's {where!r} holds values that are not tensors: "
            + "; ".join(f"{str(k)[:80]!r}" for k in bad[:5])
        )
    if swapped:  # a forged file, or a model that changed a buffer's dtype while training
        raise CorruptCheckpointError(
            f"the checkpoint's {where!r} stores values of another dtype family than the model has now ("
            + "; ".join(swapped[:5])
            + "). guardian does not convert across dtype families (a forged file looks like this), "
            "so this checkpoint is not used. If your model re-assigns a buffer with another dtype "
            "while it trains, register the buffer with that dtype from the start (or convert in "
            "load_state_dict), then resume"
        )


def check_module_state(module: nn.Module, state: dict[str, Any], where: str) -> None:
    """Name every missing, unexpected and mis-shaped key before torch's own load.

    A stored value that is not a tensor, or whose dtype is of another family than
    the live one (F32 stored as I32: same width, bytes reinterpreted), cannot have
    been saved from this model by guardian: that is ``CorruptCheckpointError``."""
    live = module.state_dict()
    _check_module_values(state, live, where)
    missing = sorted(set(live) - set(state))
    unexpected = sorted(set(state) - set(live))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(live[k].shape)}"
        for k in sorted(set(live) & set(state))
        if isinstance(state[k], torch.Tensor) and tuple(state[k].shape) != tuple(live[k].shape)
    ]
    if not (missing or unexpected or mismatched):
        return
    lines = [f"the checkpoint's {where!r} does not fit the model:"]
    if missing:
        lines.append(f"  missing from the checkpoint ({len(missing)}): {', '.join(missing[:20])}")
    if unexpected:
        lines.append(f"  not in the model ({len(unexpected)}): {', '.join(unexpected[:20])}")
    if mismatched:
        lines.append(f"  shape mismatch ({len(mismatched)}): " + "; ".join(mismatched[:20]))
    lines.append(
        "  If layers were renamed or wrapped, carry the checkpoint over with `guardian migrate`; "
        "if the architecture changed, start a new run directory."
    )
    raise StateMismatchError("\n".join(lines))


class OptimizerState:
    """Optimizer state keyed by parameter name (torch keys it by position)."""

    kind = "optimizer"

    def __init__(self, optimizer: torch.optim.Optimizer, names: dict[int, str]) -> None:
        self.optimizer = optimizer
        self._names = names

    def named_params(self) -> dict[str, torch.Tensor]:
        """Parameter name → parameter, in the names this optimizer's state is saved under."""
        return {
            name: p
            for group, names in zip(self.optimizer.param_groups, self.param_names())
            for p, name in zip(group["params"], names)
        }

    def param_names(self) -> list[list[str]]:
        out = []
        for gi, group in enumerate(self.optimizer.param_groups):
            out.append(
                [self._names.get(id(p), f"<unnamed:{gi}:{pi}>") for pi, p in enumerate(group["params"])]
            )
        return out

    def state_dict(self) -> dict[str, Any]:
        sd = self.optimizer.state_dict()
        flat = [n for group in self.param_names() for n in group]
        state = {flat[idx]: s for idx, s in sd["state"].items()}
        groups = []
        for group, names in zip(sd["param_groups"], self.param_names()):
            g = {k: v for k, v in group.items() if k not in ("params", "param_names")}
            g["params"] = names
            groups.append(g)
        return {"state": state, "param_groups": groups}

    def check_state(self, state: dict[str, Any], where: str = "optimizer") -> None:
        """Raise ``StateMismatchError`` unless ``state`` was saved over the same named
        parameters (``CorruptCheckpointError`` when it is not an optimizer state at all)."""
        check_optimizer_structure(state, where)
        live_groups = self.param_names()
        saved_groups = [g["params"] for g in state["param_groups"]]
        if live_groups != saved_groups:
            raise StateMismatchError(_group_mismatch(where, saved_groups, live_groups))
        known = {n for group in live_groups for n in group}
        unknown = sorted(set(state["state"]) - known)
        if unknown:
            raise StateMismatchError(f"{where!r}: state for unknown parameters {unknown[:10]}")

    def load_state_dict(self, state: dict[str, Any], where: str = "optimizer") -> None:
        self.check_state(state, where)
        live_groups = self.param_names()
        flat = [n for group in live_groups for n in group]
        index = {name: i for i, name in enumerate(flat)}
        torch_sd = {
            "state": {index[name]: s for name, s in state["state"].items()},
            "param_groups": [],
        }
        start = 0
        for g, names in zip(state["param_groups"], live_groups):
            group = {k: v for k, v in g.items() if k != "params"}
            group["params"] = list(range(start, start + len(names)))
            if "param_names" in self.optimizer.state_dict()["param_groups"][0]:
                group["param_names"] = list(names)
            start += len(names)
            torch_sd["param_groups"].append(group)
        self.optimizer.load_state_dict(torch_sd)


def check_optimizer_structure(state: Any, where: str) -> None:
    """The shape of a saved optimizer state: ``{"state": {name: {...}}, "param_groups":
    [{"params": [name, ...], ...}, ...]}``. Anything else is forged or damaged."""
    problem = None
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict):
        problem = "has no 'state' object"
    elif not isinstance(state.get("param_groups"), list):
        problem = f"has param_groups of type {type(state.get('param_groups')).__name__}, not a list"
    elif not all(
        isinstance(g, dict)
        and isinstance(g.get("params"), list)
        and all(isinstance(n, str) for n in g["params"])
        for g in state["param_groups"]
    ):
        problem = "has a param group without a list of parameter names"
    elif not all(isinstance(v, dict) for v in state["state"].values()):
        problem = "has per-parameter state that is not an object"
    if problem:
        raise CorruptCheckpointError(f"the checkpoint's {where!r} {problem}: not a saved optimizer state")


def _group_mismatch(where: str, saved: list[list[str]], live: list[list[str]]) -> str:
    saved_set = {n for g in saved for n in g}
    live_set = {n for g in live for n in g}
    parts = [f"the checkpoint's {where!r} was built over different parameters than the live optimizer:"]
    if saved_set - live_set:
        parts.append(f"  only in the checkpoint: {sorted(saved_set - live_set)[:20]}")
    if live_set - saved_set:
        parts.append(f"  only in the live optimizer: {sorted(live_set - saved_set)[:20]}")
    if saved_set == live_set:
        parts.append("  same parameters, different grouping or order of param_groups")
    if saved_set - live_set and live_set - saved_set:  # names on both sides: perhaps renamed
        parts.append("  Renamed layers can be carried over with `guardian migrate`.")
    elif saved_set != live_set:
        parts.append(
            "  Build the optimizer over the same parameters as the run that saved it (a parameter "
            "was added to it or left out since), or start a new run with another dir=."
        )
    return "\n".join(parts)


class PassThroughState:
    """Schedulers, GradScaler and user objects: torch's own state_dict is already safe."""

    def __init__(self, obj: Any, kind: str) -> None:
        self.obj = obj
        self.kind = kind

    def state_dict(self) -> Any:
        return self.obj.state_dict()

    def check_state(self, state: Any, where: str = "") -> None:
        """torch's schedulers and GradScaler save a dict; anything else is forged."""
        if self.kind in ("scheduler", "scaler") and not isinstance(state, dict):
            raise CorruptCheckpointError(
                f"the checkpoint's {where!r} is a {type(state).__name__}, not a {self.kind} state dict"
            )

    def load_state_dict(self, state: Any, where: str = "") -> None:
        self.obj.load_state_dict(state)


def is_scheduler(value: Any) -> bool:
    sched = torch.optim.lr_scheduler
    return isinstance(value, (sched.LRScheduler, sched.ReduceLROnPlateau))


def is_scaler(value: Any) -> bool:
    scaler_types = [torch.amp.GradScaler]
    if hasattr(torch, "cuda") and hasattr(torch.cuda, "amp") and hasattr(torch.cuda.amp, "GradScaler"):
        scaler_types.append(torch.cuda.amp.GradScaler)
    return isinstance(value, tuple(scaler_types))
