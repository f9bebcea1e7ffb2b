"""Where the training loop stands, and how to put it back there.

A checkpoint is a promise about *where in the user's program* execution resumes.
``LoopPosition`` holds the counters the loop API maintains (epoch, global step, batch
in the epoch) plus what the data order depends on: the RNG states at the start of the
current epoch's iteration and the loader's own generators. Its ``state_dict`` is the
checkpoint's ``progress`` component.

Two kinds of position are resumed exactly:

* **inside an epoch** (a save at ``g.step()``): the next ``batches()`` re-creates the
  epoch's iterator from the recorded epoch-start RNG states and skips the batches
  already trained (``state.data``);
* **at an epoch boundary**: the next ``batches()`` starts a fresh epoch, with the
  loader's generators set to their values at the checkpoint — they were advanced by
  the epochs already run, and a fresh process would otherwise re-seed them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from .state import data as data_pos
from .worker_signals import workers_leave_signals_to_main

log = logging.getLogger(__name__)


class LoopPosition:
    """Counters of the loop API and the data position; see the module docstring."""

    def __init__(self) -> None:
        self.epoch = 0
        self.global_step = 0
        self.batch_in_epoch = 0
        self.batches_total = 0
        self.loader: Any = None
        self.epoch_start: dict[str, Any] | None = None  # set while an epoch's batches are being drawn
        self.epoch_batches_done = False  # the current epoch's batch loop ran to its end
        self.in_iteration = False  # a batch was handed out and its g.step() has not come yet
        self._resume_into: dict[str, Any] | None = None  # a mid-epoch position to resume into
        self._saved_generators: list[Any] | None = None  # loader generators to restore at the next epoch
        self._continued_reuses_iterator = False  # at the boundary resumed from, a persistent iterator lived
        self._saved_workers: int | None = None  # the loader's num_workers when the checkpoint was taken

    def key(self) -> tuple[int, int, int]:
        return (self.global_step, self.epoch, self.batch_in_epoch)

    def on_last_batch(self) -> bool:
        """The batch just taken is the epoch's last, as far as the loader's length says
        (False when it has none)."""
        try:
            return self.mid_epoch and self.batch_in_epoch == len(self.loader)
        except (TypeError, NotImplementedError):  # an iterable dataset without a length
            return False

    @property
    def mid_epoch(self) -> bool:
        """True while the current epoch's batches are being drawn (a save here resumes
        inside the epoch); False at an epoch boundary or once the batch loop ended."""
        return self.epoch_start is not None and not self.epoch_batches_done

    # ------------------------------------------------------------------ the loop

    def iterate(
        self, loader: Any, on_resumed: Callable[[], None], on_boundary: Callable[[], None]
    ) -> Iterator[Any]:
        """The batches of the current epoch, resuming mid-epoch when the checkpoint was
        taken inside it. ``on_resumed`` runs right before the first remaining batch
        of a resumed epoch (it puts every RNG back to its checkpointed value);
        ``on_boundary`` runs between two batches — the exact point where saves asked
        for during a batch's body are taken."""
        self.loader = loader
        self._warn_if_workers_changed(loader)
        pending, self._resume_into = self._resume_into, None
        self.epoch_batches_done = False
        with workers_leave_signals_to_main(loader):  # iter() starts the worker processes
            if pending is not None and pending["epoch"] == self.epoch:
                self._saved_generators = None
                data_pos.restore_epoch_start(loader, pending["epoch_start"])
                self.epoch_start = pending["epoch_start"]
                self.batch_in_epoch = pending["batch_in_epoch"]
                it = data_pos.iterate_from(loader, self.batch_in_epoch, on_resumed, self.epoch_start)
            else:
                self._restore_boundary_generators(loader)
                self.epoch_start = data_pos.capture_epoch_start(loader)
                if self._continued_reuses_iterator:  # as the run being continued had it
                    self.epoch_start["reused_iterator"] = True
                self._continued_reuses_iterator = False
                self.batch_in_epoch = 0
                it = data_pos.iterate_epoch(loader, self.epoch_start)
        for batch in it:
            self.batch_in_epoch += 1
            self.batches_total += 1
            self.in_iteration = True
            yield batch
            on_boundary()  # this batch's body has run, nothing of the next one has
        self.epoch_batches_done = True

    def restore_generators_now(self, loaders: list[Any]) -> None:
        """Resumed at an epoch boundary with the one loader the trainer holds: put its
        generators back at once, not at the next ``batches()`` — there may be none
        (the run ended), and the generators are part of the state it ends with."""
        if len(loaders) == 1 and self._saved_generators:
            self._restore_boundary_generators(loaders[0], keep=True)

    def _restore_boundary_generators(self, loader: Any, keep: bool = False) -> None:
        saved = self._saved_generators
        if not keep:
            self._saved_generators = None
        if not saved:
            return
        gens = data_pos.loader_generators(loader)
        if len(gens) == len(saved):
            for gen, state in zip(gens, saved, strict=True):
                gen.set_state(state)

    def _warn_if_workers_changed(self, loader: Any) -> None:
        saved, self._saved_workers = self._saved_workers, None
        now = getattr(loader, "num_workers", None)
        if saved is not None and now is not None and saved != now:
            log.warning(
                "the DataLoader had num_workers=%d when the checkpoint was taken and has %d now: samples "
                "are the same, but random augmentation drawn inside workers follows per-worker streams, "
                "so the resumed run may no longer be bit-exact. Keep num_workers=%d for an exact resume.",
                saved,
                now,
                saved,
            )

    def step_done(self) -> None:
        self.global_step += 1
        self.in_iteration = False

    def end_epoch(self) -> None:
        self.epoch += 1
        self.batch_in_epoch = 0
        self.epoch_start = None
        self.epoch_batches_done = False
        self.in_iteration = False
        self._resume_into = None

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The ``progress`` component. Loader generators are saved in every checkpoint:
        at an epoch boundary they decide the next epoch's order."""
        gens = data_pos.loader_generators(self.loader) if self.loader is not None else []
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "batch_in_epoch": self.batch_in_epoch if self.mid_epoch else 0,
            "batches_total": self.batches_total,
            "epoch_start": self.epoch_start if self.mid_epoch else None,
            "loader_generators": [g.get_state() for g in gens] or None,
            "num_workers": getattr(self.loader, "num_workers", None),
            "reuses_iterator": self.loader is not None and data_pos.reuses_iterator(self.loader),
        }

    def load_state_dict(self, progress: dict[str, Any]) -> None:
        self.epoch = progress["epoch"]
        self.global_step = progress["global_step"]
        self.batch_in_epoch = progress["batch_in_epoch"]
        self.batches_total = progress["batches_total"]
        self._resume_into = progress if progress.get("epoch_start") is not None else None
        self._saved_generators = None if self._resume_into else progress.get("loader_generators")
        self._continued_reuses_iterator = not self._resume_into and progress.get("reuses_iterator") is True
        workers = progress.get("num_workers")
        self._saved_workers = workers if isinstance(workers, int) and not isinstance(workers, bool) else None

    @property
    def resumes_mid_epoch(self) -> bool:
        return self._resume_into is not None


class StepBoundaries:
    """Which ``g.step()`` calls are optimizer-step boundaries. With gradient
    accumulation ``g.step()`` may be called every micro-batch; a boundary is a call
    after which a discovered optimizer has stepped (observed through its step hook),
    so no checkpoint ever lands between micro-batches with gradients pending."""

    def __init__(self, optimizers: list[Any]) -> None:
        self._optimizers = optimizers
        self._stepped = False
        self._hooks: list[Any] = []
        self.accumulating = False  # the last g.step() was a micro-batch: gradients are pending

    def attach(self) -> None:
        for opt in self._optimizers:
            self._hooks.append(opt.register_step_post_hook(self._on_step))

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _on_step(self, *args: Any) -> None:
        self._stepped = True

    @property
    def gradients_pending(self) -> bool:
        """Micro-batches since the last optimizer step, as far as the hooks saw (an
        optimizer stepped after the last ``g.step()`` — a flush after the loop — applied them)."""
        return self.accumulating and not self._stepped

    def take(self, explicit: bool | None) -> bool:
        """Is the ``g.step()`` being taken a boundary? ``explicit`` overrides detection."""
        boundary = explicit if explicit is not None else (self._stepped or not self._optimizers)
        self._stepped = False
        self.accumulating = not boundary
        return boundary
