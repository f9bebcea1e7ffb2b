"""What every benchmark script here shares: the baseline (torch.save + fsync), a timer,
a manifest for a bare writer call, the pass/fail check against a script's targets and
the printed summary. One copy, so every script measures the baseline the same way."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from guardian.format.manifest import Manifest
from guardian.smallfiles import fsync_dir
from guardian.state import snapshot as snap_mod


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def torch_save(path: str, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """The baseline every ratio is taken against: torch.save, durable (file and entry)."""
    with open(path, "wb") as f:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(os.path.dirname(path))


def manifest_for(name: str, snap: snap_mod.Snapshot, reason: str = "bench") -> Manifest:
    """A manifest for a writer called directly (no protect()): step 1, no metrics."""
    return Manifest(
        name=name,
        step=1,
        epoch=0,
        seq=1,
        files={},
        reason=[reason],
        metrics={},
        batch_in_epoch=0,
        extra={},
        components={n: {"kind": c["kind"]} for n, c in snap.components.items()},
    )


def check_targets(summary: dict[str, Any], targets: dict[str, tuple[str, float]]) -> dict[str, bool]:
    """``targets``: key → ("<=" or ">=", bound); keys the summary lacks are left out."""
    met = {}
    for key, (op, bound) in targets.items():
        v = summary.get(key)
        if v is not None:
            met[key] = v <= bound if op == "<=" else v >= bound
    return met


def print_summary(summary: dict[str, Any], as_json: bool) -> None:
    for k, v in summary.items():
        print(f"{k:42s} {v}")
    if as_json:
        print(json.dumps(summary))
