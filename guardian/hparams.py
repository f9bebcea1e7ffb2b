"""Noticing that a rerun changed the optimizer's hyper-parameters.

A resume restores the optimizer's ``param_groups`` from the checkpoint — that is what
makes it exact — so a user who edited ``lr=`` in the script and re-ran would silently
train with the old value. To say so without false alarms (schedulers rewrite ``lr``
and momentum every step), each checkpoint records the hyper-parameters *as the script
constructed them* (read at ``protect()`` entry, before any resume), and a resume
compares those with the script's current ones.
"""

from __future__ import annotations

import logging
import math
from typing import Any

log = logging.getLogger(__name__)

_SKIP = {"params", "param_names"}


def _plain(value: Any) -> Any:
    """A JSON-able copy of a hyper-parameter, or None for what cannot be compared."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return value if math.isfinite(value) else None
    if isinstance(value, (tuple, list)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        return [float(v) for v in value]
    return None


def script_values(optimizers: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """{optimizer name: [per param group: {hyper-parameter: value}]} as constructed."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name, opt in optimizers.items():
        out[name] = [
            {k: _plain(v) for k, v in group.items() if k not in _SKIP and _plain(v) is not None}
            for group in opt.param_groups
        ]
    return out


def differences(saved: Any, current: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Human-readable differences between the recorded and the current values."""
    if not isinstance(saved, dict):
        return []
    found = []
    for name, groups in current.items():
        old_groups = saved.get(name)
        if not isinstance(old_groups, list) or len(old_groups) != len(groups):
            continue
        for i, (old, new) in enumerate(zip(old_groups, groups, strict=True)):
            if not isinstance(old, dict):
                continue
            for key in sorted(set(old) & set(new)):
                if old[key] != new[key]:
                    where = f"{name}.param_groups[{i}]['{key}']" if len(groups) > 1 else f"{name} {key}"
                    found.append(
                        f"{where}: {old[key]!r} in the checkpoint's run, {new[key]!r} in this script"
                    )
    return found


def warn_if_changed(saved: Any, current: dict[str, list[dict[str, Any]]], path: str) -> None:
    diffs = differences(saved, current)
    if diffs:
        log.warning(
            "this script's optimizer settings differ from those of the run that saved %s:\n  %s\n"
            "The checkpoint's values were kept, so the resume is exact. To train on with the new "
            "values, set them on optimizer.param_groups inside the `with protect(...)` block (they are "
            "saved from then on), or start a fresh run (resume=False or another dir=).",
            path,
            "\n  ".join(diffs),
        )
