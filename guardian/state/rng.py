"""Every random number generator a training step can touch.

Captured: python ``random``, numpy's global legacy generator, torch's CPU generator
and — only if CUDA is already initialised, so capturing never creates a CUDA context —
the generator of every CUDA device. Lightning saves none of these, torchsnapshot only
the CPU one; dropout, shuffling and augmentation all depend on them.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

from ..errors import CorruptCheckpointError, StateMismatchError

log = logging.getLogger(__name__)


def cuda_initialized() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def capture_global() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np_state,
        "torch": torch.get_rng_state(),
    }
    if cuda_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_global(state: dict[str, Any]) -> None:
    random.setstate(_python_state(state["python"]))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda")
    if cuda_states:
        _restore_cuda(cuda_states)


def _python_state(value: Any) -> tuple:
    version, internal, gauss = value
    return (version, tuple(internal), gauss)


def _restore_cuda(states: list[torch.Tensor]) -> None:
    if not torch.cuda.is_available():
        raise StateMismatchError(
            f"the checkpoint holds CUDA RNG state for {len(states)} device(s) but CUDA is not "
            "available here; resume on a machine with the same GPUs, or pass strict=False to "
            "protect() to accept a run that is no longer bit-exact"
        )
    count = torch.cuda.device_count()
    if count != len(states):
        log.warning(
            "checkpoint has CUDA RNG state for %d device(s), this machine has %d; "
            "restoring the first %d — the run is no longer bit-exact",
            len(states),
            count,
            min(count, len(states)),
        )
    for device, s in enumerate(states[:count]):
        torch.cuda.set_rng_state(s, device)


class GeneratorState:
    """Adapter for an explicit generator handed to protect() (torch/numpy/random)."""

    kind = "generator"

    def __init__(self, gen: Any) -> None:
        self.gen = gen

    def state_dict(self) -> Any:
        g = self.gen
        if isinstance(g, torch.Generator):
            return {"torch": g.get_state()}
        if isinstance(g, np.random.Generator):
            return {"numpy": g.bit_generator.state}
        if isinstance(g, np.random.RandomState):
            return {"numpy_legacy": g.get_state(legacy=True)}
        return {"python": g.getstate()}

    def check_state(self, state: Any, where: str = "generator") -> None:
        """The saved state must be this generator kind's, of the right size and type:
        ``StateMismatchError`` for another kind of generator (the user's change),
        ``CorruptCheckpointError`` for a malformed one."""
        from . import validate

        if not isinstance(state, dict) or len(state) != 1:
            raise CorruptCheckpointError(f"the checkpoint's {where!r} is not a generator state")
        ((saved_kind, value),) = state.items()
        live_kind = next(iter(self.state_dict()))
        if saved_kind != live_kind:
            raise StateMismatchError(
                f"the checkpoint's {where!r} holds a {saved_kind} generator state, but a {live_kind} "
                "generator was passed to protect(); pass the same kind of generator"
            )
        problems = {
            "torch": lambda v: validate.generator_state_problems(v, "any"),
            "numpy": validate.numpy_generator_problems,
            "numpy_legacy": validate.numpy_legacy_problems,
            "python": validate.python_state_problems,
        }[saved_kind](value)
        if problems:
            raise CorruptCheckpointError(
                f"the checkpoint's {where!r} {saved_kind} state " + "; ".join(problems)
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        g = self.gen
        if "torch" in state:
            g.set_state(state["torch"])
        elif "numpy" in state:
            g.bit_generator.state = state["numpy"]
        elif "numpy_legacy" in state:
            g.set_state(state["numpy_legacy"])
        else:
            g.setstate(_python_state(state["python"]))


def is_generator(value: Any) -> bool:
    return isinstance(value, (torch.Generator, np.random.Generator, np.random.RandomState, random.Random))
