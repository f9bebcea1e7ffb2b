"""Shrink a failing generated program to the smallest one that still fails.

Greedy, one feature at a time: turn a feature of the shape off (workers, loader
generators, accumulation, schedulers, reports, manual saves, evaluation RNG draws…),
drop one epoch-body operation or one kill, and keep the change if the program still
fails; repeat until nothing more can go. What remains names the root cause; it is
also the regression case worth keeping. Kills timed from outside (``moment``) are
not reproducible and are never kept.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from typing import Any

Shape = dict[str, Any]

SIMPLER: list[tuple[str, Any]] = [
    ("workers", 0),
    ("eval_workers", False),
    ("loader_gen", "none"),
    ("augment", False),
    ("carry_accumulation", False),
    ("accumulate", 1),
    ("explicit_boundary", False),
    ("report_before_step", None),
    ("report_mid", None),
    ("patience", None),
    ("monitor", None),
    ("manual_save", None),
    ("every_steps", None),
    ("every_epochs", None),
    ("every_epochs", 1),
    ("keep_last", None),
    ("async_save", False),
    ("scheduler", "none"),
    ("optimizer", "sgd"),
    ("eval_rng", []),
    ("eval_mode", "eval"),
    ("batchnorm", False),
    ("dropout", 0.0),
    ("extra", False),
    ("restore_best", False),
    ("partial", False),
    ("epochs", 2),
    ("batches", 3),
]


def candidates(program: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every program one simplification away from ``program``."""
    for i in range(len(program["kills"])):
        if len(program["kills"]) > 1 or program["kills"][i]["how"] == "moment":
            yield _with(program, lambda p, i=i: p["kills"].pop(i))
    shape = program["shape"]
    for key, value in SIMPLER:
        if key in shape and shape[key] != value:
            yield _with(program, lambda p, k=key, v=value: _set(p["shape"], k, v))
    for i, op in enumerate(shape["epoch_ops"]):
        if op != "eval":
            yield _with(program, lambda p, i=i: p["shape"]["epoch_ops"].pop(i))


def _set(shape: Shape, key: str, value: Any) -> None:
    shape[key] = value
    if key == "scheduler":  # the epoch body's scheduler calls go with it
        shape["epoch_ops"] = [op for op in shape["epoch_ops"] if op not in ("sched", "plateau")]
    if key == "manual_save":
        shape["epoch_ops"] = [op for op in shape["epoch_ops"] if op != "save"]
    if key == "monitor" or (key == "patience" and value is None):
        shape["patience"] = None if key == "monitor" else shape["patience"]
        shape["epoch_ops"] = [op for op in shape["epoch_ops"] if op != "stop"]
    if key == "workers" and value == 0:
        shape["eval_workers"] = False


def _with(program: dict[str, Any], change: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    p = copy.deepcopy(program)
    change(p)
    return p


def minimize(
    program: dict[str, Any], fails: Callable[[dict[str, Any]], bool], log: Callable[[str], None]
) -> dict[str, Any]:
    """The smallest program reached from ``program`` for which ``fails`` holds."""
    current = copy.deepcopy(program)
    current["kills"] = [k for k in current["kills"] if k["how"] != "moment"] or current["kills"]
    seen = {json.dumps(current, sort_keys=True)}  # tried: never revisit (no A -> B -> A cycles)
    progress = True
    while progress:
        progress = False
        for candidate in list(candidates(current)):
            key = json.dumps(candidate, sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            if fails(candidate):
                log(f"  still fails: {_difference(current, candidate)}")
                current = candidate
                progress = True
                break
    return current


def _difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    if a["kills"] != b["kills"]:
        return f"kills {len(a['kills'])} -> {len(b['kills'])}"
    changed = [f"{k}={b['shape'][k]!r}" for k in a["shape"] if a["shape"][k] != b["shape"].get(k)]
    return ", ".join(changed)
