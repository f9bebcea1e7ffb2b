"""Taking a checkpoint: snapshot the state, name it, hand it to a writer, keep retention.

``Saver`` is the one owner of checkpoint naming (``step-<N>[-<dup>]``, agreed across
ranks) and of what happens after a commit (retention, the log line). It does not know
the loop: the guard hands it the collected states and the manifest facts of the moment.

Under ``torch.distributed`` replicated components go to the top level (rank 0 writes
them) and per-rank ones (RNG, data position, anything sharded) to ``rank-NNNNN/`` on
every rank; the commit happens once every rank's part is durable (``dist_commit``,
``dist_async``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import commit, knobs
from .config import GuardConfig
from .distributed import World
from .errors import CheckpointWriteError, GuardianError
from .format import reader
from .format.layout import checkpoint_name
from .format.manifest import Manifest
from .policies import BestMetric, Retention
from .state import dtensor
from .state import rng as rng_mod
from .state import snapshot as snap_mod
from .state.components import Stateful
from .writer import SyncWriter, Writer


def best_checkpoint(run_dir: str) -> str | None:
    """The newest committed checkpoint saved because the monitored metric improved."""
    for info in reversed(reader.list_checkpoints(run_dir)):
        if info.manifest and "best" in info.manifest.reason:
            return info.path
    return None


log = logging.getLogger(__name__)

States = dict[str, tuple[str, Any]]


@dataclass
class SaveFacts:
    """What the manifest records about the moment of a save."""

    reasons: list[str]
    step: int
    epoch: int
    batch_in_epoch: int
    metrics: dict[str, float] = field(default_factory=dict)
    resumed_from: str | None = None
    hparams: dict[str, Any] = field(default_factory=dict)  # as the script built the optimizers


# Reasons that add nothing when the position has not moved since the last save: the
# state they would capture is the one already committed at that position.
REPEATABLE = frozenset({"steps", "seconds", "epoch", "final", "preempt", "early_stop"})


class SaveRequests:
    """Which save reasons wait for the next exact point, and what a save at a position
    adds to the checkpoint already taken there (one checkpoint per step: a second save
    at the same position carries the first one's reasons and supersedes it)."""

    def __init__(self) -> None:
        self.pending: list[str] = []
        self._last: tuple[tuple[int, int, int], list[str]] | None = None

    def defer(self, reasons: list[str]) -> None:
        self.pending += [r for r in reasons if r not in self.pending]

    def take(self, reasons: list[str]) -> list[str]:
        """The pending reasons plus ``reasons``; nothing is pending afterwards."""
        merged = self.pending + [r for r in reasons if r not in self.pending]
        self.pending = []
        return merged

    def at(self, key: tuple[int, int, int], reasons: list[str]) -> list[str] | None:
        """The reasons to save with at position ``key``, or None when a checkpoint
        already taken there holds all that ``reasons`` ask for."""
        if self._last is None or self._last[0] != key:
            return reasons
        earlier = self._last[1]
        if set(reasons) <= REPEATABLE | set(earlier):
            return None
        return earlier + [r for r in reasons if r not in earlier]

    def saved(self, key: tuple[int, int, int], reasons: list[str]) -> None:
        self._last = (key, list(reasons))


def _incremental(option: bool | int) -> Any:
    if option is False:
        return None
    from .incremental import IncrementalSaves

    return IncrementalSaves(full_every=0 if option is True else int(option))


class Saver:
    def __init__(self, config: GuardConfig, components: dict[str, Stateful], writer: Writer) -> None:
        self.run_dir = config.run_dir
        self.components = components
        self.writer = writer
        self.retention: Retention = config.retention
        self.best: BestMetric | None = config.best
        self.on_save_error = config.on_save_error
        self.world = World()
        self.seq = 0
        self.last_checkpoint: str | None = None
        self.best_checkpoint: str | None = None  # the newest committed "best" checkpoint
        self.on_commit: Callable[[str, Manifest], None] | None = None  # after each commit, on rank 0
        self._listeners: list[Callable[[str, Manifest], None]] = []  # add_listener: more of them
        self._closers: list[Callable[[], None]] = []
        self.replicate_to = config.replicate_to  # a remote prefix: guardian/remote/
        self.last_save_time = time.monotonic()  # for every_seconds
        self._reserved = False
        self.incremental = _incremental(config.incremental)

    def add_listener(self, on_commit: Callable[[str, Manifest], None], on_close: Callable[[], None]) -> None:
        """Also tell ``on_commit`` of each commit (rank 0, after ``self.on_commit``);
        ``on_close`` runs when the saver closes, after the writer finished."""
        self._listeners.append(on_commit)
        self._closers.append(on_close)

    def attach(self, world: World) -> None:
        """Called on entering the guard, once the process group (if any) is known."""
        self.world = world
        if self.replicate_to:
            from .remote import start_replication

            start_replication(self, self.replicate_to, world.is_leader)
        if world.distributed and self.writer.mode != "sync":
            self.writer.close()
            self.writer = self._distributed_async_writer()

    def continue_after(self, seq: int, resumed_from: str | None) -> None:
        """Carry on from a resume: sequence numbers continue after ``seq``; the resumed
        checkpoint is never deleted by retention."""
        self.seq = seq
        if resumed_from is not None:
            self.last_checkpoint = resumed_from
            self.best_checkpoint = best_checkpoint(self.run_dir)
            self.retention.protected.add(os.path.basename(resumed_from.rstrip("/")))

    # ------------------------------------------------------------------ saving

    def collect(self, progress: dict[str, Any], policy: dict[str, Any], extra: dict[str, Any]) -> States:
        """Everything a checkpoint holds: the components' states plus the reserved ones
        (every global RNG, the loop position, the policy bookkeeping, the user's extra)."""
        states: States = {n: (a.kind, a.state_dict()) for n, a in self.components.items()}
        states["rng"] = ("rng", rng_mod.capture_global())
        states["progress"] = ("progress", progress)
        states["policy"] = ("policy", policy)
        states["extra"] = ("extra", dict(extra))
        return states

    def save(self, states: States, facts: SaveFacts) -> str | None:
        """Snapshot ``states`` and submit them. Returns the committed path when the
        writer is synchronous; a failure follows ``on_save_error``."""
        if self.world.distributed:
            self.wait_in_flight()
        self.last_save_time = time.monotonic()
        snap = snap_mod.capture(states)
        manifest = self._manifest(facts, snap)
        try:
            if self.world.distributed:
                return self._save_distributed(states, manifest)
            snap = self._split_unchanged(snap, manifest, states)
            return self.writer.submit(self.run_dir, snap, manifest, self._on_committed)
        except CheckpointWriteError as e:
            if self.on_save_error == "raise":
                raise
            log.error(
                "checkpoint at step %d FAILED and training continues (on_save_error='warn'): %s",
                facts.step,
                e,
            )
            return None

    def _split_unchanged(
        self, snap: snap_mod.Snapshot, manifest: Manifest, states: States
    ) -> snap_mod.Snapshot:
        """Incremental saves: what the writer gets once unchanged tensors are left to
        the shared file (guardian/incremental.py). DTensor state is always saved whole."""
        if self.incremental is None or any(dtensor.contains_dtensor(s) for _, s in states.values()):
            return snap
        self.writer.wait()  # the previous save's outcome decides what this one may refer to
        snap, manifest.shared = self.incremental.plan(snap, copy_fresh=self.writer.mode != "sync")
        return snap

    def _save_distributed(self, states: States, manifest: Manifest) -> str | None:
        from .dist_commit import save_distributed

        snap_rep, snap_own = self.rank_snapshots(states)
        if self.writer.mode == "async":  # dist_async.DistributedAsyncWriter
            self.writer.submit(self.run_dir, manifest, snap_rep, snap_own, self._on_committed_any_rank)
            return None
        path = save_distributed(self.world, self.run_dir, manifest, snap_rep, snap_own)
        if path is not None:
            self._on_committed_any_rank(path, manifest)
        return path

    def rank_snapshots(self, states: States) -> tuple[snap_mod.Snapshot | None, snap_mod.Snapshot]:
        """(replicated — rank 0 only, else None; this rank's own) snapshots of ``states``."""
        own = {n: v for n, v in states.items() if self._per_rank(n, v[1])}
        replicated = {n: v for n, v in states.items() if n not in own}
        snap_rep = snap_mod.capture(replicated) if self.world.is_leader else None
        return snap_rep, snap_mod.capture(own)

    def _per_rank(self, name: str, state: Any) -> bool:
        if name in ("rng", "progress"):
            return True
        adapter = self.components.get(name)
        return adapter is not None and (adapter.kind == "generator" or dtensor.contains_dtensor(state))

    def reserve_once(self, collect: Callable[[], States]) -> None:
        """At the first whole step without a save, let an async writer allocate its
        staging memory (the optimizer state exists by now, so the size is the real one):
        the first checkpoint then stalls only for its copy. Every rank reaches this at
        the same step, so the state_dict calls line up across ranks like a save's."""
        if not self._reserved:
            self._reserved = True
            self.reserve(collect())

    def reserve(self, states: States) -> None:
        """Let an async writer allocate its staging memory ahead of the first save.
        Distributed, errors propagate as a save's would, so ranks stay in step."""
        reserve = getattr(self.writer, "reserve", None)
        if reserve is None:
            return
        if self.world.distributed:
            reserve(*self.rank_snapshots(states))
            return
        try:
            reserve(snap_mod.capture(states))
        except Exception as e:  # noqa: BLE001 - an optimisation: the first save allocates instead
            log.debug("staging memory not reserved ahead (%s); the first save allocates it", e)

    # ------------------------------------------------------------------ naming

    def _manifest(self, facts: SaveFacts, snap: snap_mod.Snapshot) -> Manifest:
        self.seq += 1
        extra: dict[str, Any] = {"monitor": self.best.monitor if self.best else None}
        if knobs.attempt() is not None:
            extra["attempt"] = knobs.attempt()
        if facts.resumed_from:
            extra["resumed_from"] = facts.resumed_from
        if facts.hparams:
            extra["hparams"] = facts.hparams
        return Manifest(
            name=self._free_name(facts.step),
            step=facts.step,
            epoch=facts.epoch,
            seq=self.seq,
            files={},
            reason=list(facts.reasons),
            metrics=dict(facts.metrics),
            batch_in_epoch=facts.batch_in_epoch,
            world_size=self.world.world_size,
            extra=extra,
            components={n: {"kind": c["kind"]} for n, c in snap.components.items()},
        )

    def _free_name(self, step: int) -> str:
        """``step-N``, or ``step-N-<dup>`` when that step already has a checkpoint.
        Rank 0 sees the directory as it is: its answer counts on every rank."""
        dup = 0
        while os.path.lexists(os.path.join(self.run_dir, checkpoint_name(step, dup))):
            dup += 1
        if self.world.distributed:
            dup = self.world.broadcast_ints([dup])[0]
        return checkpoint_name(step, dup)

    # ------------------------------------------------------------------ after a commit

    def _on_committed_any_rank(self, path: str, manifest: Manifest) -> None:
        """Rank 0 owns retention and the log line; the others only learn the path."""
        if self.world.is_leader:
            self._on_committed(path, manifest)
        else:
            self.last_checkpoint = path

    def _on_committed(self, path: str, manifest: Manifest) -> None:
        self.last_checkpoint = path
        if self.incremental is not None:
            self.incremental.committed(path, manifest)
        log.info(
            "saved %s (%s, step %d, epoch %d)",
            manifest.name,
            "+".join(manifest.reason),
            manifest.step,
            manifest.epoch,
        )
        if "best" in manifest.reason:
            self.best_checkpoint = path
        if self.on_commit is not None:
            self.on_commit(path, manifest)
        for listener in self._listeners:
            listener(path, manifest)
        self._apply_retention(manifest)

    def _apply_retention(self, newest: Manifest) -> None:
        listing = [
            {
                "name": i.name,
                "step": i.manifest.step,
                "seq": i.manifest.seq,
                "reason": i.manifest.reason,
                "metrics": i.manifest.metrics,
            }
            for i in reader.list_checkpoints(self.run_dir)
            if i.manifest is not None
        ]
        doomed = set(self.retention.doomed(listing, self.best))
        # One checkpoint per step: an older checkpoint of the newest one's step holds an
        # earlier moment of that step and is superseded by it when its reasons were merged
        # in (same position). A best checkpoint taken mid-epoch at the epoch's last step and
        # the epoch save after it share a step, not a position: both are kept.
        doomed |= {
            c["name"]
            for c in listing
            if c["step"] == newest.step
            and c["seq"] < newest.seq
            and set(c["reason"]) <= set(newest.reason)  # the newer one carries all its reasons
            and c["name"] not in self.retention.protected
        }
        for c in listing:
            if c["name"] not in doomed:
                continue
            try:
                commit.delete_checkpoint(self.run_dir, c["name"])
            except OSError as e:  # an old checkpoint left behind costs disk, never data
                log.warning("retention could not delete %s: %s", c["name"], e)

    # ------------------------------------------------------------------ the writer

    def check(self, collect: bool = False) -> None:
        """Surface a background save's failure here, per on_save_error. ``collect``: the
        ranks agreed that every rank's save is finished (dist_async)."""
        deliver = getattr(self.writer, "collect", None) if collect else self.writer.check
        try:
            if deliver is not None:
                deliver()
        except CheckpointWriteError as e:
            if self.on_save_error == "raise":
                raise
            log.error("a background checkpoint FAILED and training continues (on_save_error='warn'): %s", e)

    def wait_in_flight(self) -> None:
        """Block until the in-flight save is committed (or failed), per on_save_error.
        Distributed, this runs before the next save is named, at exit and at
        preemption — points every rank reaches together, with the same outcome."""
        try:
            self.writer.wait()
        except CheckpointWriteError as e:
            if self.on_save_error == "raise":
                raise
            log.error("a background checkpoint FAILED and training continues: %s", e)

    def settle(self) -> None:
        """On the way out after a failure: complete the in-flight save (it was taken at
        an exact point); its own failure is logged, never raised over the original one."""
        try:
            self.writer.wait()
        except GuardianError as e:
            log.error("the checkpoint in flight failed too: %s", e)

    @property
    def busy(self) -> bool:
        """A distributed background save is still in flight (ranks must agree on when
        it is done before anyone learns its outcome)."""
        return self.world.distributed and bool(getattr(self.writer, "busy", False))

    def close(self) -> None:
        try:
            self.writer.close()
        finally:
            for closer in self._closers:
                closer()

    def _distributed_async_writer(self) -> Any:
        """The asynchronous writer for ranks (dist_async), or the synchronous one where
        a private gloo group cannot be created (a torch built without gloo)."""
        writer = None
        try:
            from .dist_async import DistributedAsyncWriter

            writer = DistributedAsyncWriter(self.world)
        except (RuntimeError, ValueError, ImportError) as e:
            log.warning("asynchronous distributed saves unavailable (%s); saving synchronously", e)
        # all ranks must take the same path: a rank saving synchronously on the default
        # group and one saving on the private group would never meet
        if self.world.all_max([0 if writer else 1])[0]:
            if writer is not None:
                writer.close()
            return SyncWriter()
        return writer
