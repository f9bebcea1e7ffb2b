"""Wrapper segments: ``module.`` (DDP), ``_orig_mod.`` (torch.compile), FSDP and
activation-checkpoint wrappers. They are stripped from a source key only where the
target confirms it, or where every source key is wrapped and no target key is —
never on a guess, since a stripped name that happens to exist elsewhere would
silently load the wrong tensor.
"""

from __future__ import annotations

from .ops import Spec

LEADING_WRAPPERS = ("module", "_orig_mod")
ANYWHERE_WRAPPERS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def strip_wrappers(key: str) -> str:
    parts = key.split(".")
    while len(parts) > 1 and parts[0] in LEADING_WRAPPERS:
        parts = parts[1:]
    kept = [p for p in parts if p not in ANYWHERE_WRAPPERS]
    return ".".join(kept) if kept else key


def wrapper_names(src: list[str], target: dict[str, Spec]) -> dict[str, str]:
    """Source key → the name the rules see (wrappers stripped where confirmed)."""
    canon_t: dict[str, list[str]] = {}
    for t in target:
        canon_t.setdefault(strip_wrappers(t), []).append(t)
    target_clean = all(strip_wrappers(t) == t for t in target)
    all_wrapped = bool(src) and all(strip_wrappers(k) != k for k in src)
    out = {}
    for k in src:
        s = strip_wrappers(k)
        if k in target or s == k and len(canon_t.get(s, [])) != 1:
            out[k] = k
        elif s != k and (s in target or (all_wrapped and target_clean)):
            out[k] = s
        elif len(canon_t.get(s, [])) == 1:
            out[k] = canon_t[s][0]
        else:
            out[k] = k
    return out
