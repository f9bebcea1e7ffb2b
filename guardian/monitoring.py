"""Watching the monitored metric: the best value so far, early stopping, and a typo.

``MetricWatch`` is the guard's bookkeeping around ``g.report()``: whether a reported
value improves on the best (``policies.BestMetric``), the per-epoch early-stopping
update (``policies.early_stopping_update``) and the one warning a user most needs — a
``monitor=`` name that the loop never reports, which would otherwise silently mean no
best checkpoint and no early stopping. Its durable part is ``PolicyState``, saved
with every checkpoint.
"""

from __future__ import annotations

import difflib
import logging

from .policies import BestMetric, EarlyStopping, PolicyState, early_stopping_update

log = logging.getLogger(__name__)


class MetricWatch:
    def __init__(self, best: BestMetric | None, early: EarlyStopping | None) -> None:
        self.best = best
        self.early = early
        self.state = PolicyState()
        self.first_epoch = 0  # the first epoch this process trains (after a resume, the resumed one)
        self._seen = False

    def observe(self, values: dict[str, float]) -> bool:
        """Take one report's values; True if the monitored metric improved."""
        if self.best is None or self.best.monitor not in values:
            return False
        self._seen = True
        value = values[self.best.monitor]
        self.state.epoch_value = value
        if not self.best.improves(value, self.state.best):
            return False
        self.state.best = value
        return True

    def end_epoch(self, epoch: int, reported: list[str]) -> None:
        """Once per epoch, before the epoch boundary's save."""
        self._warn_if_never_reported(epoch, reported)
        if self.early is not None and self.best is not None:
            early_stopping_update(self.early, self.best, self.state, self.state.epoch_value)
            if self.state.stopped:
                log.info(
                    "early stopping after epoch %d: %s has not improved for %d epoch(s) (best %s at step %s)",
                    epoch,
                    self.best.monitor,
                    self.state.bad_epochs,
                    self.state.best,
                    self.state.best_step,
                )
        self.state.epoch_value = None

    def _warn_if_never_reported(self, epoch: int, reported: list[str]) -> None:
        if self.best is None or self._seen or epoch != self.first_epoch:
            return
        close = difflib.get_close_matches(self.best.monitor, reported, n=1)
        log.warning(
            "monitor=%r was not reported during epoch %d (g.report() got: %s)%s: no best checkpoint "
            "is saved and early stopping cannot fire until it is.",
            self.best.monitor,
            epoch,
            ", ".join(sorted(reported)) or "nothing",
            f"; did you mean {close[0]!r}?" if close else "",
        )
