"""Resuming a DataLoader mid-epoch without reading the skipped data.

What makes an epoch's order: the torch RNG (or the loader's generator) at the
moment the iterator is created — it seeds the shuffle and the workers' base seed.
So at each epoch start we record those RNG states; on resume we put them back,
create the iterator the same way, and skip the first *k* index lists at the
**batch-sampler** level: indices are generated (cheap), samples are never loaded.
Then, right before the first remaining batch is fetched, every RNG is set to its
value at the checkpoint, so dropout, augmentation in the main process and anything
else that draws random numbers continues exactly.

The wrapper is swapped into the loader only for the duration of ``iter(loader)``
(persistent-worker iterators capture it once; it is one-shot, so later epochs pass
straight through).

Limits: an ``IterableDataset`` has no sampler, so its first k batches are read and
discarded (with a warning). Random augmentation *inside worker processes* is exact
only if the dataset derives its randomness from the sample index or the worker
seed alone — a worker's own RNG stream after k batches cannot be reconstructed
without replaying them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

log = logging.getLogger(__name__)


def loader_generators(loader: Any) -> list[torch.Generator]:
    """The explicit generators an iteration of ``loader`` draws from."""
    gens = []
    for owner in (
        loader,
        getattr(loader, "sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
    ):
        gen = getattr(owner, "generator", None)
        if isinstance(gen, torch.Generator) and all(gen is not g for g in gens):
            gens.append(gen)
    return gens


def reuses_iterator(loader: Any) -> bool:
    """Will ``iter(loader)`` reuse a live persistent-worker iterator? Such an epoch draws
    no base seed for the workers; a fresh iterator draws one (from the loader's generator
    or torch's) before its sampler shuffles with the same RNG."""
    return (
        bool(getattr(loader, "persistent_workers", False)) and getattr(loader, "_iterator", None) is not None
    )


def capture_epoch_start(loader: Any) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "generators": [g.get_state() for g in loader_generators(loader)],
        "reused_iterator": reuses_iterator(loader),
    }


def restore_epoch_start(loader: Any, state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    gens = loader_generators(loader)
    if len(gens) != len(state["generators"]):
        from ..errors import StateMismatchError

        raise StateMismatchError(
            f"the DataLoader had {len(state['generators'])} explicit generator(s) when the checkpoint "
            f"was taken and has {len(gens)} now; build it the same way to resume mid-epoch"
        )
    for g, s in zip(gens, state["generators"], strict=True):
        g.set_state(s)


class SkipFirstBatches:
    """Wraps a (batch) sampler: the first iteration drops ``skip`` items, then calls
    ``on_skipped`` before anything is yielded. Lazy like the sampler it wraps, so
    RNG draws happen at exactly the same moments as without it.

    Public for the framework integrations, which swap it into a loader they do not
    iterate themselves. What they may rely on: it is one-shot (the first ``iter()``
    skips, every later one passes the inner sampler through untouched); the skipped
    indices are drawn but never loaded; ``on_skipped`` runs once, after the skip and
    before the first remaining item, even when the sampler had fewer than ``skip``
    items; ``before`` (if given) runs right before the inner sampler is first
    iterated; ``len()`` and any other attribute are the inner sampler's."""

    def __init__(
        self, inner: Any, skip: int, on_skipped: Callable[[], None], before: Callable[[], None] | None = None
    ) -> None:
        self.inner = inner
        self.skip = skip
        self.on_skipped = on_skipped
        self.before = before  # runs right before the inner sampler is first iterated
        self.used = False

    def __iter__(self) -> Iterator[Any]:
        if self.used:
            yield from self.inner
            return
        self.used = True
        if self.before is not None:
            self.before()
        it = iter(self.inner)
        for _ in range(self.skip):
            if next(it, _END) is _END:
                break
        self.on_skipped()
        yield from it

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str) -> Any:  # e.g. DistributedSampler.set_epoch
        return getattr(self.inner, name)


_END = object()


def iterate_epoch(loader: Any, epoch_start: dict[str, Any]) -> Iterator[Any]:
    """``iter(loader)`` for a new epoch that started at ``epoch_start``."""
    before = _as_if_reused(loader, epoch_start)
    if before is None or not isinstance(loader, DataLoader) or loader._dataset_kind != 0:
        return iter(loader)
    return _iter_wrapped(loader, 0, lambda: None, before)


def _as_if_reused(loader: Any, epoch_start: dict[str, Any] | None) -> Callable[[], None] | None:
    """A persistent-worker loader reuses its iterator from its second epoch on, so the
    run being continued drew no base seed there; the first epoch of a resumed process
    creates a fresh iterator, which does. Then the sampler's RNG is put back to the
    epoch start right before it draws, and the epoch shuffles as in the run being
    continued. (The new workers keep their new base seed: a worker's own RNG stream is
    never exact across a restart; see the module docstring.)"""
    if not epoch_start or not epoch_start.get("reused_iterator") or reuses_iterator(loader):
        return None
    return lambda: restore_epoch_start(loader, epoch_start)


def iterate_from(
    loader: Any, skip: int, on_skipped: Callable[[], None], epoch_start: dict[str, Any] | None = None
) -> Iterator[Any]:
    """``iter(loader)`` positioned after ``skip`` batches; see the module docstring."""
    if not isinstance(loader, DataLoader) or loader._dataset_kind != 0:  # 0 = map-style
        return _iterate_by_reading(loader, skip, on_skipped)
    return _iter_wrapped(loader, skip, on_skipped, _as_if_reused(loader, epoch_start))


def _iter_wrapped(
    loader: Any, skip: int, on_skipped: Callable[[], None], before: Callable[[], None] | None
) -> Iterator[Any]:
    attr = "batch_sampler" if loader.batch_sampler is not None else "sampler"
    original = getattr(loader, attr)
    object.__setattr__(loader, attr, SkipFirstBatches(original, skip, on_skipped, before))
    try:
        return iter(loader)
    finally:
        object.__setattr__(loader, attr, original)


def _iterate_by_reading(loader: Any, skip: int, on_skipped: Callable[[], None]) -> Iterator[Any]:
    if skip:
        log.warning(
            "%s has no sampler to skip with; reading and discarding %d batch(es) to "
            "reach the resume position",
            type(loader).__name__,
            skip,
        )
    it = iter(loader)
    for _ in range(skip):
        if next(it, _END) is _END:
            break
    on_skipped()
    return it
