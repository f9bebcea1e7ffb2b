"""Finding the training state inside whatever the user hands to ``protect()``.

Accepted: an object whose attributes hold the pieces (a Trainer), a dict, explicit
keyword arguments, or a mix. Containers one level deep (``self.optimizers = [a, b]``)
are searched too. The same object reachable under two names is stored once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import NothingToProtectError
from . import components as C
from .rng import GeneratorState, is_generator

log = logging.getLogger(__name__)

RESERVED = {"rng", "progress", "policy", "extra"}


def _classify(value: Any) -> str | None:
    if isinstance(value, nn.Module):
        return "module"
    if isinstance(value, torch.optim.Optimizer):
        return "optimizer"
    if C.is_scheduler(value):
        return "scheduler"
    if C.is_scaler(value):
        return "scaler"
    if is_generator(value):
        return "generator"
    if isinstance(value, torch.utils.data.DataLoader):
        return "dataloader"
    if isinstance(value, C.Stateful) and not isinstance(value, type):
        return "stateful"
    return None


def is_training_object(value: Any) -> bool:
    """True for anything ``protect()`` saves or reads (a DataLoader's position)."""
    return _classify(value) is not None


def _candidates(trainer: Any) -> list[tuple[str, Any]]:
    if trainer is None:
        return []
    if isinstance(trainer, Mapping):
        items = list(trainer.items())
    elif _classify(trainer) in ("module", "optimizer", "scheduler", "scaler"):
        items = [("model" if isinstance(trainer, nn.Module) else type(trainer).__name__.lower(), trainer)]
        if isinstance(trainer, nn.Module):  # a LightningModule-like object: look at its other attributes
            items += [(k, v) for k, v in vars(trainer).items() if not k.startswith("_")]
    else:
        items = list(vars(trainer).items())
    out = []
    for name, value in items:
        name = str(name)
        if isinstance(value, (list, tuple)) and any(_classify(v) for v in value):
            out += [(f"{name}.{i}", v) for i, v in enumerate(value)]
        elif isinstance(value, Mapping) and any(_classify(v) for v in value.values()):
            out += [(f"{name}.{k}", v) for k, v in value.items()]
        else:
            out.append((name, value))
    return out


def discover(trainer: Any, explicit: Mapping[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    """``({name: adapter}, [dataloaders])``, in a stable order: modules first, then
    optimizers, schedulers, scalers and the rest, so loading happens in a safe order."""
    found: dict[str, tuple[str, Any]] = {}
    seen: set[int] = set()
    loaders: list[Any] = []
    for name, value in list(explicit.items()) + _candidates(trainer):
        kind = _classify(value)
        if kind is None:
            continue
        obj = C.unwrap_module(value) if kind == "module" else value
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if kind == "dataloader":
            loaders.append(obj)
            continue
        clean = name.lstrip("_") or name
        if clean in RESERVED or clean in found:
            clean = f"{clean}_{kind}"
        found[clean] = (kind, obj)
    if not found:
        raise NothingToProtectError(
            "protect() found no model, optimizer, scheduler, scaler or object with "
            "state_dict()/load_state_dict() in what it was given. Pass the trainer object "
            "that holds them, a dict, or keywords: protect(model=model, optimizer=opt)."
        )
    return _adapt(found), loaders


ORDER = ("module", "optimizer", "scheduler", "scaler", "generator", "stateful")


def _adapt(found: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    modules = {n: obj for n, (k, obj) in found.items() if k == "module"}
    names = param_name_map(modules)
    out: dict[str, Any] = {}
    for kind in ORDER:
        for name, (k, obj) in found.items():
            if k != kind:
                continue
            if kind == "module":
                out[name] = C.ModuleState(obj)
            elif kind == "optimizer":
                out[name] = C.OptimizerState(obj, names)
            elif kind == "generator":
                out[name] = GeneratorState(obj)
            else:
                out[name] = C.PassThroughState(obj, kind)
    return out


def param_name_map(modules: dict[str, nn.Module]) -> dict[int, str]:
    """id(parameter) → name. With one model, names are plain ('conv1.weight'); with
    several they are prefixed by the model's name ('generator.conv1.weight')."""
    names: dict[int, str] = {}
    single = len(modules) == 1
    for mod_name, module in modules.items():
        for pname, p in module.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), pname if single else f"{mod_name}.{pname}")
    return names


def describe(components: dict[str, Any], loaders: list[Any]) -> str:
    parts = []
    for name, adapter in components.items():
        detail = type(
            getattr(adapter, "obj", None)
            or getattr(adapter, "module", None)
            or getattr(adapter, "optimizer", None)
            or getattr(adapter, "gen", None)
        ).__name__
        parts.append(f"{name} ({adapter.kind}: {detail})")
    if loaders:
        parts.append(f"{len(loaders)} DataLoader(s)")
    return ", ".join(parts)
