"""Checking a migration's result: structurally (does it load, strictly, into the
target?) and optionally numerically (does the new model compute what the old one did?).

The structural check loads *meta* copies of the tensors into the target built on
the meta device: torch's own ``strict=True`` key and shape checks run, and nothing
is allocated or copied. Dtypes are compared separately (``load_state_dict`` would
silently cast).
"""

from __future__ import annotations

from typing import Any

from .errors import VerificationError
from .targets import Target, build_meta, resolve_factory


def verify_structure(model_sd: dict[str, Any], target: Target) -> None:
    """Raise ``VerificationError`` unless ``model_sd`` fits ``target`` exactly."""
    from ..state.codec import tensor_spec

    if target.factory:
        _load_meta(model_sd, target.factory)
    specs = {k: tensor_spec(v) for k, v in model_sd.items() if hasattr(v, "shape")}
    missing = [k for k in target.specs if k not in specs]
    unexpected = [k for k in specs if k not in target.specs]
    wrong = [
        f"{k}: {list(specs[k][0])} {specs[k][1]} vs {list(s)} {d}"
        for k, (s, d) in target.specs.items()
        if k in specs and specs[k] != (s, d)
    ]
    if missing or unexpected or wrong:
        raise VerificationError(
            f"the migrated state does not fit {target.description}: missing {missing[:10]}, "
            f"unexpected {unexpected[:10]}, shape/dtype {wrong[:10]}"
        )


def _load_meta(model_sd: dict[str, Any], factory: str) -> None:
    model = build_meta(factory)
    meta_sd = {k: (v.to("meta") if hasattr(v, "to") else v) for k, v in model_sd.items()}
    try:
        model.load_state_dict(meta_sd, strict=True)
    except RuntimeError as e:
        raise VerificationError(
            f"the migrated state does not load into {factory} with strict=True: {e}"
        ) from e


def verify_numeric(
    old_factory: Any,
    old_sd: dict[str, Any],
    new_factory: Any,
    new_sd: dict[str, Any],
    input_shape: tuple[int, ...],
    *,
    seed: int = 0,
    atol: float = 1e-6,
    input_high: int | None = None,
) -> float:
    """Run old model + old weights and new model + migrated weights on one seeded input;
    return the largest absolute difference, raising if it exceeds ``atol``.

    The probe is standard-normal floats, or with ``input_high`` integers in
    ``[0, input_high)`` (token ids for a language model). It is drawn from a private
    generator: the caller's global RNG is not touched.
    """
    import torch

    old = instantiate(old_factory, old_sd)
    new = instantiate(new_factory, new_sd)
    x = probe_input(input_shape, seed, input_high)
    with torch.no_grad():
        a, b = old(x), new(x)
    diff = float((a - b).abs().max()) if a.shape == b.shape else float("inf")
    if not diff <= atol:
        raise VerificationError(
            f"numeric check failed: outputs differ by {diff:g} (tolerance {atol:g}) on a seeded "
            f"input of shape {list(input_shape)}; the mapping pairs the wrong tensors or an op is wrong"
        )
    return diff


def probe_input(input_shape: tuple[int, ...], seed: int = 0, input_high: int | None = None) -> Any:
    """A seeded probe from a private generator: floats, or integers in [0, input_high)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    if input_high is not None:
        return torch.randint(0, int(input_high), input_shape, generator=gen)
    return torch.randn(input_shape, generator=gen)


def instantiate(factory: Any, sd: dict[str, Any]) -> Any:
    """Build and load a model without consuming the caller's global RNG (the factory's
    initialisers draw from it, and the weights are overwritten anyway)."""
    import torch

    fn = resolve_factory(factory) if isinstance(factory, str) else factory
    with torch.random.fork_rng(devices=[]):
        model = fn()
    model.load_state_dict(sd, strict=True)
    return model.eval()
