"""The options of a protected run, as ``protect()`` checked them (``options.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .policies import BestMetric, EarlyStopping, Retention, SaveSchedule

OnSaveError = Literal["raise", "warn"]  # a failed save stops training, or is logged and training goes on


@dataclass
class GuardConfig:
    """The options of ``protect()``, checked."""

    run_dir: str
    schedule: SaveSchedule
    best: BestMetric | None
    save_best: bool
    retention: Retention
    early: EarlyStopping | None
    restore_best: bool | None
    resume: Any
    strict: bool
    save_on_exit: bool
    on_save_error: OnSaveError
    handle_signals: bool
    tensorboard: bool = False
    replicate_to: str | None = None  # a remote prefix (fsspec URL): guardian/remote/
    incremental: bool | int = False  # guardian/incremental.py; an int: rewrite the shared file every N saves

    def restores_best(self, *, early_stopped: bool) -> bool:
        """``restore_best``: None loads the best weights when early stopping fired, True
        at the end of every run, False never."""
        if self.restore_best is not None:
            return self.restore_best
        return early_stopped and self.early is not None
