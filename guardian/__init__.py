"""guardian: resilient checkpointing and state management for PyTorch training.

    with guardian.protect(trainer, dir="runs/exp1") as g:
        for epoch in g.epochs(10):
            for batch in g.batches(loader):
                ...
                optimizer.step()
                g.step()
            g.report(val_loss=evaluate())

The torch-dependent parts are imported lazily, so ``import guardian`` (and the CLI,
and the daemon) stays fast and never touches CUDA.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (
    EXIT_NEVER_RETRY,
    EXIT_REQUEUE,
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    FormatVersionError,
    GuardianError,
    MetricError,
    NothingToProtectError,
    RunLockedError,
    StateMismatchError,
    UnsafeCheckpointError,
    UnsupportedStateError,
)

if TYPE_CHECKING:
    from .guard import Guard
    from .options import protect
    from .readonly import export_weights, load, open

__all__ = [
    "__version__",
    "protect",
    "Guard",
    "load",
    "open",
    "export_weights",
    "EXIT_REQUEUE",
    "EXIT_NEVER_RETRY",
    "GuardianError",
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "FormatVersionError",
    "MetricError",
    "NothingToProtectError",
    "RunLockedError",
    "StateMismatchError",
    "UnsafeCheckpointError",
    "UnsupportedStateError",
]

_LAZY = {
    "protect": "guardian.options",
    "Guard": "guardian.guard",
    # read-only access from outside a run (guardian/readonly.py: never locks or writes)
    "load": "guardian.readonly",
    "open": "guardian.readonly",
    "export_weights": "guardian.readonly",
}

# A library's logging stays silent unless asked: a NullHandler here, and protect()
# adds a stderr handler that steps aside once the application configures logging.
logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'guardian' has no attribute {name!r}")
