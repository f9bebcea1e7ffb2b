"""When to save, what is "best", when to stop, and which checkpoints to keep.

Pure decisions over numbers and manifests — no I/O — so they are easy to test and
identical on every rank. Their mutable bookkeeping (best value, patience counter)
lives in ``PolicyState``, which is saved with every checkpoint so a resumed run
makes exactly the decisions the uninterrupted run would have made. Wall-clock
state (for ``every_seconds``) is deliberately *not* saved: it is not part of the
training state and would make otherwise identical checkpoints differ.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .errors import MetricError


def to_float(value: Any, name: str = "metric") -> float:
    """A metric as a Python float, without keeping any autograd graph alive.

    Tensors are detached and read with ``.item()`` (one element only); NaN is kept
    (it never counts as best); anything that is not a number is an error.
    """
    if hasattr(value, "detach") and hasattr(value, "numel"):
        if value.numel() != 1:
            raise MetricError(f"metric {name!r} is a tensor with {value.numel()} elements; pass a scalar")
        value = value.detach().item()
    elif hasattr(value, "item") and callable(value.item):  # numpy scalars and 0-d arrays
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MetricError(f"metric {name!r} must be a number, got {type(value).__name__}: {value!r}")
    return float(value)


@dataclass
class SaveSchedule:
    """Periodic saves; any combination of the three triggers may be set."""

    every_steps: int | None = None
    every_seconds: float | None = None
    every_epochs: int | None = 1

    def __post_init__(self) -> None:
        for name in ("every_steps", "every_seconds", "every_epochs"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name} must be positive or None, got {v}")

    def steps_due(self, global_step: int) -> bool:
        """Step saves fall on multiples of ``every_steps`` (5, 10, 15 … for 5), whatever
        else was saved in between: a schedule a user can predict and a supervisor check."""
        every = self.every_steps
        if not every:
            return False
        return global_step % every == 0

    def seconds_due(self, seconds_since_save: float) -> bool:
        every = self.every_seconds
        if not every:
            return False
        return seconds_since_save >= every

    def epoch_due(self, epochs_completed: int) -> bool:
        every = self.every_epochs
        if not every:
            return False
        return epochs_completed % every == 0


Mode = Literal["min", "max"]  # whether a smaller or a larger metric value is better


@dataclass
class BestMetric:
    """Best-only saving on a monitored metric."""

    monitor: str
    mode: Mode = "min"
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode!r}")
        if self.min_delta < 0:
            raise ValueError("min_delta must be >= 0")

    def improves(self, value: float, best: float | None) -> bool:
        """NaN and inf never improve; the first finite value always does."""
        if not math.isfinite(value):
            return False
        if best is None:
            return True
        if self.mode == "min":
            return value < best - self.min_delta
        return value > best + self.min_delta

    def better_first(self, values: list[tuple[float, Any]]) -> list[tuple[float, Any]]:
        return sorted(values, key=lambda v: v[0], reverse=self.mode == "max")


@dataclass
class EarlyStopping:
    """Stop after ``patience`` consecutive epochs without improvement of the monitored
    metric — the Keras/Lightning meaning: ``patience=2`` stops at the end of the second
    epoch in a row that did not improve (before 0.2 it was the third)."""

    patience: int
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        if self.patience < 0:
            raise ValueError("patience must be >= 0")


@dataclass
class PolicyState:
    """Bookkeeping that must survive a resume (saved as the 'policy' component)."""

    best: float | None = None
    best_step: int | None = None
    bad_epochs: int = 0
    stopped: bool = False
    improved_this_epoch: bool = False
    early_best: float | None = None
    epoch_value: float | None = None  # the monitored value reported this epoch (early stopping)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            if hasattr(self, k):
                setattr(self, k, v)


def early_stopping_update(
    stop: EarlyStopping, best: BestMetric, st: PolicyState, value: float | None
) -> None:
    """Called once per epoch with that epoch's monitored value (None if not reported)."""
    if value is None:
        return
    es_rule = BestMetric(best.monitor, best.mode, stop.min_delta)
    if es_rule.improves(value, st.early_best):
        st.early_best = value
        st.bad_epochs = 0
    else:
        st.bad_epochs += 1
        if st.bad_epochs >= max(stop.patience, 1):
            st.stopped = True


@dataclass
class Retention:
    """Which committed checkpoints to keep. Applied only *after* a new commit."""

    keep_last: int | None = 3
    keep_best: int = 1
    keep_every: int | None = None
    protected: set[str] = field(default_factory=set)

    def doomed(self, checkpoints: list[dict[str, Any]], best: BestMetric | None) -> list[str]:
        """Names to delete, oldest first. ``checkpoints``: dicts with name, step, seq,
        reason, metrics — oldest first. The newest checkpoint, the current best and
        ``protected`` ones (e.g. the resume source) are never returned."""
        if not checkpoints:
            return []
        keep = {checkpoints[-1]["name"]} | set(self.protected)
        if self.keep_last is not None:
            keep |= {c["name"] for c in checkpoints[-self.keep_last :]} if self.keep_last else set()
        else:
            keep |= {c["name"] for c in checkpoints}
        if self.keep_every:
            keep |= {c["name"] for c in checkpoints if c["step"] % self.keep_every == 0}
        keep |= self._best_names(checkpoints, best)
        return [c["name"] for c in checkpoints if c["name"] not in keep]

    def _best_names(self, checkpoints: list[dict[str, Any]], best: BestMetric | None) -> set[str]:
        if best is None:
            return set()
        bests = [c for c in checkpoints if "best" in c["reason"]]
        if not bests:
            return set()
        current = {bests[-1]["name"]}  # best saves only happen on improvement
        scored = [(c["metrics"].get(best.monitor), c["name"]) for c in bests]
        scored = [(v, n) for v, n in scored if isinstance(v, (int, float))]
        return current | {n for _, n in best.better_first(scored)[: max(self.keep_best, 1)]}
