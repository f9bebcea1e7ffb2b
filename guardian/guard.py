"""``guardian.protect``: the guard around a training loop.

    with guardian.protect(trainer, dir="runs/exp1", every_steps=500,
                          monitor="val_loss", mode="min") as g:
        for epoch in g.epochs(10):
            for batch in g.batches(train_loader):
                loss = model(batch).mean(); loss.backward()
                optimizer.step(); optimizer.zero_grad(); scheduler.step()
                g.step()
            g.report(val_loss=evaluate(model))

Entering the guard finds the training state, takes the run directory's lock and
resumes from the newest checkpoint that verifies. ``g.step()`` marks an optimizer
step boundary — the only moments a checkpoint is ever taken (with gradient
accumulation, boundaries without an optimizer step are skipped automatically).
Signals only set a flag; the save happens at the next boundary and the process
exits with 75 ("checkpointed, restart me"). Leaving the block normally saves a final
checkpoint and marks the run finished; leaving it with an exception saves nothing.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from . import commit, knobs, runfiles
from .distributed import World
from .errors import (
    EXIT_REQUEUE,
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    GuardianError,
    StateMismatchError,
)
from .format import reader
from .format.layout import checkpoint_name, rank_prefix
from .format.manifest import Manifest
from .locking import RunLock
from .policies import (
    BestMetric,
    EarlyStopping,
    PolicyState,
    Retention,
    SaveSchedule,
    early_stopping_update,
    to_float,
)
from .preemption import PreemptionFlag
from .state import data as data_pos
from .state import rng as rng_mod
from .state import sharded
from .state import snapshot as snap_mod
from .state.components import OptimizerState
from .state.discover import RESERVED, describe, discover
from .writer import SyncWriter

log = logging.getLogger("guardian")


def _ensure_visible_logging() -> None:
    """At 3 a.m. the log is all the user has: show guardian's INFO lines on stderr
    unless the application configured logging itself (or GUARDIAN_QUIET is set)."""
    if log.handlers or logging.getLogger().handlers or knobs.quiet():
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def protect(
    trainer: Any = None,
    *,
    dir: str | os.PathLike[str] | None = None,
    every_steps: int | None = None,
    every_seconds: float | None = None,
    every_epochs: int | None = 1,
    monitor: str | None = None,
    mode: str = "min",
    min_delta: float = 0.0,
    save_best: bool = True,
    keep_last: int | None = 3,
    keep_best: int = 1,
    keep_every: int | None = None,
    patience: int | None = None,
    restore_best: bool = True,
    resume: bool | str | os.PathLike[str] = True,
    strict: bool = True,
    save_on_exit: bool = True,
    on_save_error: str = "raise",
    handle_signals: bool = True,
    writer: Any = None,
    async_save: bool = True,
    **components: Any,
) -> Guard:
    """Wrap a training loop; see the module docstring.

    ``dir``: the run directory; defaults to ``$GUARDIAN_RUN_DIR`` (set by ``guardian run``).
    ``trainer``: an object whose attributes hold the model(s), optimizer(s),
    scheduler(s), GradScaler and any object with ``state_dict``/``load_state_dict``;
    or a dict of them; extra ones may be passed as keywords.
    ``every_steps`` / ``every_seconds`` / ``every_epochs``: periodic saves (combinable).
    ``monitor``/``mode``/``min_delta``: the metric (given to ``g.report``) that
    defines the best checkpoint; ``save_best`` saves whenever it improves.
    ``keep_last`` / ``keep_best`` / ``keep_every``: retention; the newest, the best and
    the resumed-from checkpoints are never deleted.
    ``patience``: early stopping after that many epochs without improvement of
    ``monitor`` (by more than ``min_delta``); ``restore_best`` then loads the best
    weights into the model when the block ends.
    ``resume``: True (newest valid checkpoint), False (start fresh: existing
    checkpoints are set aside, never deleted), or a checkpoint path/name.
    ``on_save_error``: "raise" (default) stops training when a save fails (disk
    full…); "warn" logs an error and tries again at the next save point.
    ``async_save``: True (default) copies the state to a staging buffer at each save and
    persists it in the background (guardian/async_writer.py); False, or
    GUARDIAN_ASYNC=0, saves synchronously. ``writer`` overrides both.
    """
    dir = dir if dir is not None else knobs.run_dir()
    if dir is None:
        raise ValueError(
            "protect() needs dir= (the run's checkpoint directory), or GUARDIAN_RUN_DIR "
            "in the environment as `guardian run --dir` sets it"
        )
    if on_save_error not in ("raise", "warn"):
        raise ValueError("on_save_error must be 'raise' or 'warn'")
    best = BestMetric(monitor, mode, min_delta) if monitor else None
    if patience is not None and best is None:
        raise ValueError("early stopping (patience=) needs monitor= to know what to watch")
    return Guard(
        trainer,
        components,
        run_dir=os.fspath(dir),
        schedule=SaveSchedule(every_steps, every_seconds, every_epochs),
        best=best,
        save_best=save_best,
        retention=Retention(keep_last, keep_best, keep_every),
        early=EarlyStopping(patience, min_delta, restore_best) if patience is not None else None,
        resume=resume,
        strict=strict,
        save_on_exit=save_on_exit,
        on_save_error=on_save_error,
        handle_signals=handle_signals,
        writer=writer or _default_writer(async_save),
    )


def _default_writer(async_save: bool) -> Any:
    if async_save and knobs.async_save():
        from .async_writer import AsyncWriter

        return AsyncWriter()
    return SyncWriter()


class Guard:
    """The object ``protect()`` returns. Counters are public and read-only by intent:
    ``epoch``, ``global_step``, ``batch_in_epoch``; ``resumed_from`` is the checkpoint
    path this run continued from (None for a fresh start); ``extra`` is a dict of
    JSON-able values saved and restored with every checkpoint."""

    def __init__(
        self,
        trainer: Any,
        explicit: dict[str, Any],
        *,
        run_dir: str,
        schedule: SaveSchedule,
        best: BestMetric | None,
        save_best: bool,
        retention: Retention,
        early: EarlyStopping | None,
        resume: Any,
        strict: bool,
        save_on_exit: bool,
        on_save_error: str,
        handle_signals: bool,
        writer: Any,
    ) -> None:
        self.run_dir = run_dir
        self.schedule, self.best, self.save_best = schedule, best, save_best
        self.retention, self.early = retention, early
        self._resume_request, self.strict = resume, strict
        self.save_on_exit, self.on_save_error = save_on_exit, on_save_error
        self._writer = writer
        self.components, self._loaders = discover(trainer, explicit)
        self._optimizers = [a.optimizer for a in self.components.values() if isinstance(a, OptimizerState)]
        self._preempt = PreemptionFlag() if handle_signals else None
        self._lock: RunLock | None = None  # created in __enter__ once the dir exists
        self.world = World()  # detected in __enter__: the process group may be set up after protect()

        self.epoch = 0
        self.global_step = 0
        self.batch_in_epoch = 0
        self.batches_total = 0
        self.extra: dict[str, Any] = {}
        self.metrics: dict[str, float] = {}
        self.policy = PolicyState()
        self.resumed_from: str | None = None
        self.last_checkpoint: str | None = None

        self._epoch_start: dict[str, Any] | None = None
        self._loader: Any = None
        self._pending_position: dict[str, Any] | None = None
        self._pending_rng: dict[str, Any] | None = None
        self._loaded_progress: dict[str, Any] = {}
        self._loaded_generators: dict[str, Any] = {}
        self._epoch_metric: float | None = None
        self._opt_stepped = False
        self._hooks: list[Any] = []
        self._staging_reserved = False
        self._seq = 0
        self._last_saved_position: tuple[int, int, int] | None = None
        self._last_save_step = 0
        self._last_save_time = time.monotonic()
        self._last_step_time = time.monotonic()
        self._step_intervals: deque[float] = deque(maxlen=512)
        self._last_heartbeat = 0.0
        self._preempting = False
        self._entered = False

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Guard:
        _ensure_visible_logging()
        self.world = World.detect()
        self._prepare_run_dir()
        try:
            if self.world.is_leader:  # one lock per run directory, held by rank 0
                self._lock = RunLock(self.run_dir)
                self._lock.acquire()
        except OSError as e:
            if isinstance(e, GuardianError):
                raise
            raise CheckpointWriteError(
                f"cannot use checkpoint directory {self.run_dir}: {e.strerror} — it is not writable by this "
                "process; fix its permissions or choose another dir=.",
                e.errno,
            ) from e
        try:
            self._entered = True
            if self.world.is_leader:
                commit.clean_stale(self.run_dir)
            self._beat(0, 0, "init")
            if self.world.distributed and self._writer.mode != "sync":
                self._writer.close()
                self._writer = self._distributed_async_writer()
            log.info("guardian: protecting %s → %s", describe(self.components, self._loaders), self.run_dir)
            for opt in self._optimizers:
                self._hooks.append(opt.register_step_post_hook(self._on_optimizer_step))
            self._resume()
            if self._preempt:
                self._preempt.install()
            self._status(
                "running",
                step=self.global_step,
                epoch=self.epoch,
                last_checkpoint=self.last_checkpoint,
                resumed_from=self.resumed_from,
            )
        except BaseException:
            self._cleanup()
            raise
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        try:
            if exc_type is None:
                self._finish()
            else:
                self._abandon(exc_type, exc)
        finally:
            self._cleanup()

    def _finish(self) -> None:
        if self.save_on_exit:
            self._save(["final"])
        self._wait_for_in_flight_save()
        if self.policy.stopped and self.early and self.early.restore_best:
            self.load_best_weights()
        self._beat(self.global_step, self.epoch, "done")
        self._status(
            "finished",
            step=self.global_step,
            epoch=self.epoch,
            last_checkpoint=self.last_checkpoint,
            early_stopped=self.policy.stopped,
            exit_code=0,
        )

    def _abandon(self, exc_type: Any, exc: BaseException | None) -> None:
        """No checkpoint of the current (possibly half-updated) state; but a save already
        in flight was taken at a step boundary, so it is completed."""
        try:
            self._writer.wait()
        except GuardianError as e:
            log.error("guardian: the checkpoint in flight failed too: %s", e)
        if self._preempting and isinstance(exc, SystemExit):
            self._write_status_best_effort(
                "preempted",
                step=self.global_step,
                epoch=self.epoch,
                last_checkpoint=self.last_checkpoint,
                exit_code=exc.code,
            )
            return
        self._write_status_best_effort(
            "failed",
            step=self.global_step,
            epoch=self.epoch,
            last_checkpoint=self.last_checkpoint,
            error={"type": exc_type.__name__, "message": str(exc)[:2000]},
        )
        log.error(
            "guardian: training raised %s; the last good checkpoint is %s",
            exc_type.__name__,
            self.last_checkpoint or "none",
        )

    def _status(self, state: str, **fields: Any) -> None:
        """run.json is the run's single voice: rank 0 writes it."""
        if self.world.is_leader:
            runfiles.write_status(self.run_dir, state, world_size=self.world.world_size, **fields)

    def _beat(self, step: int, epoch: int, phase: str, p99: float | None = None) -> None:
        if self.world.is_leader:
            runfiles.write_heartbeat(self.run_dir, step, epoch, phase, p99)

    def _write_status_best_effort(self, state: str, **fields: Any) -> None:
        """On the way out after a failure, a status file that cannot be written (the
        disk that failed, a removed directory) must not mask the original exception."""
        try:
            self._status(state, **fields)
        except OSError as e:
            log.error("guardian: could not record run state %r in %s: %s", state, self.run_dir, e)

    def _cleanup(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self._preempt:
            self._preempt.uninstall()
        self._writer.close()
        if self._lock:
            self._lock.release()

    def _prepare_run_dir(self) -> None:
        try:
            os.makedirs(self.run_dir, exist_ok=True)
        except OSError as e:
            raise CheckpointWriteError(
                f"cannot create checkpoint directory {self.run_dir}: {e.strerror}. "
                "Choose a writable location with dir=.",
                e.errno,
            ) from e
        if not os.access(self.run_dir, os.W_OK | os.X_OK):
            raise CheckpointWriteError(
                f"checkpoint directory {self.run_dir} is not writable by this user; fix its "
                "permissions or choose another dir=."
            )

    # ------------------------------------------------------------------ loop API

    def epochs(self, n: int) -> Iterator[int]:
        """Epoch numbers from where the run stands up to ``n`` (exclusive). Ends early
        when early stopping triggers. The code after each yield is the epoch boundary."""
        while self.epoch < n and not self.policy.stopped:
            yield self.epoch
            self._end_epoch()

    def batches(self, loader: Any) -> Iterator[Any]:
        """Iterate the training loader for the current epoch, resuming mid-epoch at the
        sampler level when the run was checkpointed inside this epoch."""
        self._loader = loader
        pending, self._pending_position = self._pending_position, None
        if pending is not None and pending["epoch"] == self.epoch:
            data_pos.restore_epoch_start(loader, pending["epoch_start"])
            self._epoch_start = pending["epoch_start"]
            self.batch_in_epoch = pending["batch_in_epoch"]
            it = data_pos.iterate_from(loader, self.batch_in_epoch, self._restore_checkpoint_rng)
        else:
            self._epoch_start = data_pos.capture_epoch_start(loader)
            self.batch_in_epoch = 0
            it = iter(loader)
        for batch in it:
            self.batch_in_epoch += 1
            self.batches_total += 1
            yield batch

    def step(self, *, boundary: bool | None = None) -> None:
        """Call after each optimizer step (or each batch: boundaries are detected).

        ``boundary`` overrides the detection: False for a micro-batch of an
        accumulation, True when no discovered optimizer stepped but the state is whole.
        """
        self.global_step += 1
        now = time.monotonic()
        self._step_intervals.append(now - self._last_step_time)
        self._last_step_time = now
        if boundary is None:
            boundary = self._opt_stepped or not self._optimizers
        self._opt_stepped = False
        self._heartbeat("train", now)
        self._check_writer()
        if not boundary:
            return
        steps_due = self.schedule.step_reason(self.global_step - self._last_save_step, 0.0) == "steps"
        seconds_due = self.schedule.step_reason(0, now - self._last_save_time) == "seconds"
        busy = self.world.distributed and bool(getattr(self._writer, "busy", False))
        preempt, seconds_due, any_busy = self._agree_flags(self._preempt_requested(), seconds_due, busy)
        if self.world.distributed and not any_busy:
            self._check_writer(collect=True)  # every rank's save is done: all learn its outcome now
        if preempt:
            self._preempt_now()
        if steps_due or seconds_due:
            self._save(["steps" if steps_due else "seconds"])
        elif not self._staging_reserved:
            self._reserve_staging()

    def _reserve_staging(self) -> None:
        """At the first whole step without a save, let an async writer allocate its
        staging memory in the background (the optimizer state exists by now, so the
        size is the real one): the first checkpoint then stalls only for its copy.
        Every rank reaches this at the same step (save decisions are agreed), so the
        state_dict calls below line up across ranks like a save's would."""
        self._staging_reserved = True
        reserve = getattr(self._writer, "reserve", None)
        if reserve is None:
            return
        if self.world.distributed:  # errors propagate, as a save's would: ranks stay in step
            reserve(*self._rank_snapshots(self._collect()))
            return
        try:
            reserve(snap_mod.capture(self._collect()))
        except Exception as e:  # noqa: BLE001 - an optimisation: the first save allocates instead
            log.debug("guardian: staging memory not reserved ahead (%s); the first save allocates it", e)

    def _preempt_requested(self) -> bool:
        return bool(self._preempt and self._preempt.requested)

    def _agree_flags(self, *flags: bool) -> list[bool]:
        """Rank-local facts (a signal, a wall clock) become one decision for all ranks:
        if any rank saw it, every rank acts on it at this same step."""
        if not self.world.distributed:
            return list(flags)
        return [bool(v) for v in self.world.all_max([int(f) for f in flags])]

    def _check_writer(self, collect: bool = False) -> None:
        """Surface a background save's failure here, at a step boundary, per on_save_error.
        ``collect``: the ranks agreed that every rank's save is finished (dist_async)."""
        deliver = getattr(self._writer, "collect", None) if collect else self._writer.check
        try:
            if deliver is not None:
                deliver()
        except CheckpointWriteError as e:
            if self.on_save_error == "raise":
                raise
            log.error(
                "guardian: a background checkpoint FAILED and training continues (on_save_error='warn'): %s",
                e,
            )

    def report(self, **metrics: Any) -> None:
        """Record metrics (floats or one-element tensors; graphs are never retained).
        If the monitored metric improved, the best checkpoint is saved right now — so
        it holds exactly the weights that produced the value."""
        values = {k: to_float(v, k) for k, v in metrics.items()}
        if self.world.distributed:  # one decision for all ranks: rank 0's values count
            values = {k: self.world.broadcast_float(v) for k, v in sorted(values.items())}
        self.metrics.update(values)
        self._heartbeat("eval", time.monotonic())
        if self.best and self.best.monitor in values:
            value = values[self.best.monitor]
            self._epoch_metric = value
            if self.best.improves(value, self.policy.best):
                self.policy.best, self.policy.best_step = value, self.global_step
                if self.save_best:
                    self._save(["best"])
        if self._agree_flags(self._preempt_requested())[0]:
            self._preempt_now()

    def save(self, reason: str = "manual") -> str | None:
        """Save now (call only at a step boundary). Returns the checkpoint path when
        the writer is synchronous."""
        return self._save([reason], force=True)

    @property
    def should_stop(self) -> bool:
        return self.policy.stopped

    # ------------------------------------------------------------------ boundaries

    def _on_optimizer_step(self, *args: Any) -> None:
        self._opt_stepped = True

    def _end_epoch(self) -> None:
        if self.early and self.best:
            early_stopping_update(self.early, self.best, self.policy, self._epoch_metric)
            if self.policy.stopped:
                log.info(
                    "guardian: early stopping after epoch %d: %s has not improved for %d epoch(s) "
                    "(best %s at step %s)",
                    self.epoch,
                    self.best.monitor,
                    self.policy.bad_epochs,
                    self.policy.best,
                    self.policy.best_step,
                )
        self._epoch_metric = None
        self.epoch += 1
        self.batch_in_epoch = 0
        self._epoch_start = None
        self._pending_position = None
        if self._agree_flags(self._preempt_requested())[0]:
            self._preempt_now()
        if self.schedule.epoch_due(self.epoch) or self.policy.stopped:
            self._save(["epoch"] if not self.policy.stopped else ["epoch", "early_stop"])

    def _preempt_now(self) -> None:
        signum = self._preempt.signum if self._preempt else None
        why = f"signal {signum} received" if signum else "another rank received a stop signal"
        log.warning("guardian: %s; checkpointing at step %d and exiting", why, self.global_step)
        self._save(["preempt"])
        self._wait_for_in_flight_save()  # with on_save_error='warn' a failure still exits 75
        self._preempting = True
        if self.world.distributed:
            self._leave_process_group()
        raise SystemExit(self._preempt.exit_code if (self._preempt and signum) else EXIT_REQUEUE)

    def _leave_process_group(self) -> None:
        """Every rank has saved; the process is about to exit. Tear the process group
        down in step on all ranks: a rank that exits while a peer's communication
        threads still hold connections to it makes that peer abort (SIGABRT) instead of
        exiting with the requeue code."""
        import torch.distributed as dist

        self.world.barrier()
        if dist.is_initialized():
            dist.destroy_process_group()

    def _heartbeat(self, phase: str, now: float, force: bool = False) -> None:
        if force or now - self._last_heartbeat >= knobs.heartbeat_interval():
            self._last_heartbeat = now
            p99 = None
            if len(self._step_intervals) >= 8:
                ordered = sorted(self._step_intervals)
                p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
            try:
                self._beat(self.global_step, self.epoch, phase, p99)
            except OSError as e:  # liveness only; never worth stopping training for
                log.warning("guardian: could not write heartbeat: %s", e)

    # ------------------------------------------------------------------ saving

    def _position(self) -> tuple[int, int, int]:
        return (self.global_step, self.epoch, self.batch_in_epoch)

    def _collect(self) -> dict[str, tuple[str, Any]]:
        states: dict[str, tuple[str, Any]] = {n: (a.kind, a.state_dict()) for n, a in self.components.items()}
        states["rng"] = ("rng", rng_mod.capture_global())
        states["progress"] = ("progress", self._progress_state())
        states["policy"] = ("policy", self.policy.state_dict())
        states["extra"] = ("extra", dict(self.extra))
        return states

    def _progress_state(self) -> dict[str, Any]:
        mid_epoch = self._epoch_start is not None
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "batch_in_epoch": self.batch_in_epoch,
            "batches_total": self.batches_total,
            "epoch_start": self._epoch_start if mid_epoch else None,
            "loader_generators": [g.get_state() for g in data_pos.loader_generators(self._loader)]
            if (mid_epoch and self._loader is not None)
            else None,
        }

    def _save(self, reasons: list[str], force: bool = False) -> str | None:
        if not force and self._last_saved_position == self._position() and "best" not in reasons:
            return None
        if self.world.distributed:
            self._wait_for_in_flight_save()
        self._heartbeat("save", time.monotonic(), force=True)
        states = self._collect()
        snap = snap_mod.capture(states)
        manifest = self._manifest(reasons, snap)
        self._last_saved_position = self._position()
        self._last_save_step, self._last_save_time = self.global_step, time.monotonic()
        try:
            if self.world.distributed:
                path = self._save_distributed(states, manifest)
            else:
                path = self._writer.submit(self.run_dir, snap, manifest, self._on_committed)
            self._heartbeat("train", time.monotonic(), force=True)  # the phase is no longer "save"
            return path
        except CheckpointWriteError as e:
            if self.on_save_error == "raise":
                raise
            log.error(
                "guardian: checkpoint at step %d FAILED and training continues (on_save_error='warn'): %s",
                self.global_step,
                e,
            )
            return None

    def _save_distributed(self, states: dict[str, tuple[str, Any]], manifest: Manifest) -> str | None:
        """Replicated components go to the top level (rank 0 writes them), per-rank ones
        (RNG, data position, anything sharded) to rank-NNNNN/ on every rank."""
        from .dist_commit import save_distributed

        snap_rep, snap_own = self._rank_snapshots(states)
        if self._writer.mode == "async":  # dist_async.DistributedAsyncWriter
            self._writer.submit(self.run_dir, manifest, snap_rep, snap_own, self._on_committed_any_rank)
            return None
        path = save_distributed(self.world, self.run_dir, manifest, snap_rep, snap_own)
        if path is not None:
            self._on_committed_any_rank(path, manifest)
        return path

    def _rank_snapshots(
        self, states: dict[str, tuple[str, Any]]
    ) -> tuple[snap_mod.Snapshot | None, snap_mod.Snapshot]:
        """(replicated — rank 0 only, else None; this rank's own) snapshots of ``states``."""
        own = {n: v for n, v in states.items() if self._per_rank(n, v[1])}
        replicated = {n: v for n, v in states.items() if n not in own}
        snap_rep = snap_mod.capture(replicated) if self.world.is_leader else None
        return snap_rep, snap_mod.capture(own)

    def _on_committed_any_rank(self, path: str, manifest: Manifest) -> None:
        """Rank 0 owns retention and the log line; the others only learn the path."""
        if self.world.is_leader:
            self._on_committed(path, manifest)
        else:
            self.last_checkpoint = path

    def _wait_for_in_flight_save(self) -> None:
        """Block until the in-flight save is committed (or failed), per on_save_error.
        Distributed, this runs before the next save is named (rank 0 picks a free name by
        looking at the directory), at exit and at preemption — points every rank reaches
        together, and every rank gets the same outcome."""
        try:
            self._writer.wait()
        except CheckpointWriteError as e:
            if self.on_save_error == "raise":
                raise
            log.error("guardian: a background checkpoint FAILED and training continues: %s", e)

    def _distributed_async_writer(self) -> Any:
        """The asynchronous writer for ranks (dist_async), or the synchronous one where
        a private gloo group cannot be created (a torch built without gloo)."""
        writer = None
        try:
            from .dist_async import DistributedAsyncWriter

            writer = DistributedAsyncWriter(self.world)
        except (RuntimeError, ValueError, ImportError) as e:
            log.warning("guardian: asynchronous distributed saves unavailable (%s); saving synchronously", e)
        # all ranks must take the same path: a rank saving synchronously on the default
        # group and one saving on the private group would never meet
        if self.world.all_max([0 if writer else 1])[0]:
            if writer is not None:
                writer.close()
            return SyncWriter()
        return writer

    def _per_rank(self, name: str, state: Any) -> bool:
        return (
            name in ("rng", "progress")
            or self.components.get(name) is not None
            and (self.components[name].kind == "generator" or sharded.contains_dtensor(state))
        )

    def _manifest(self, reasons: list[str], snap: snap_mod.Snapshot) -> Manifest:
        self._seq += 1
        dup = 0
        while os.path.lexists(os.path.join(self.run_dir, checkpoint_name(self.global_step, dup))):
            dup += 1
        if self.world.distributed:  # rank 0 sees the directory as it is: its answer counts
            dup = self.world.broadcast_ints([dup])[0]
        extra: dict[str, Any] = {"monitor": self.best.monitor if self.best else None}
        if knobs.attempt() is not None:
            extra["attempt"] = knobs.attempt()
        if self.resumed_from:
            extra["resumed_from"] = self.resumed_from
        return Manifest(
            name=checkpoint_name(self.global_step, dup),
            step=self.global_step,
            epoch=self.epoch,
            seq=self._seq,
            files={},
            reason=reasons,
            metrics=dict(self.metrics),
            batch_in_epoch=self.batch_in_epoch,
            world_size=self.world.world_size,
            extra=extra,
            components={n: {"kind": c["kind"]} for n, c in snap.components.items()},
        )

    def _on_committed(self, path: str, manifest: Manifest) -> None:
        self.last_checkpoint = path
        log.info(
            "guardian: saved %s (%s, step %d, epoch %d)",
            manifest.name,
            "+".join(manifest.reason),
            manifest.step,
            manifest.epoch,
        )
        self._apply_retention()

    def _apply_retention(self) -> None:
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
        for name in self.retention.doomed(listing, self.best):
            try:
                commit.delete_checkpoint(self.run_dir, name)
            except OSError as e:  # an old checkpoint left behind costs disk, never data
                log.warning("guardian: retention could not delete %s: %s", name, e)

    # ------------------------------------------------------------------ resuming

    def _resume(self) -> None:
        chosen, error = None, None
        if self.world.is_leader:
            try:
                chosen = self._choose_checkpoint()
            except GuardianError as e:
                if not self.world.distributed:
                    raise
                error = e
        if self.world.distributed:
            chosen = self._follow_leader(chosen, failed=error is not None)
            if error is not None:
                raise error
        if chosen is None:
            log.info("guardian: no checkpoint in %s; starting fresh", self.run_dir)
            return
        self._beat(0, 0, "load")
        if not self.world.distributed:
            self._load(chosen)
            return
        error = None
        try:
            self._load(chosen)
        except GuardianError as e:
            error = e
        if not self.world.agree_ok(error is None):
            if error is not None:
                raise error
            raise StateMismatchError(
                f"rank {self.world.rank}: another rank could not resume from {chosen}; see its log"
            )

    def _choose_checkpoint(self) -> str | None:
        request = knobs.resume_from() or self._resume_request
        existing = reader.list_checkpoints(self.run_dir)
        self._seq = max((i.manifest.seq for i in existing if i.manifest), default=0)
        if request is False:
            for info in existing:
                commit.set_aside(self.run_dir, info.name, "protect(resume=False): starting fresh")
            return None
        if request is True:
            return self._newest_verified(existing)
        return self._named_checkpoint(str(request), existing)

    def _follow_leader(self, chosen: str | None, failed: bool) -> str | None:
        """Rank 0 chose (and verified, and set aside what was corrupt); the others take
        its answer by name, so every rank resumes from the same checkpoint."""
        code = 1 if failed else 0
        name = os.path.basename(chosen.rstrip("/")) if chosen else ""
        encoded = list(name.encode()[:255].ljust(256, b"\0")) if self.world.is_leader else [0] * 256
        outside = int(
            bool(chosen) and os.path.dirname(os.path.realpath(chosen)) != os.path.realpath(self.run_dir)
        )
        code, self._seq, outside, *encoded = self.world.broadcast_ints([code, self._seq, outside, *encoded])
        if code and not self.world.is_leader:
            raise CheckpointNotFoundError(
                f"rank {self.world.rank}: rank 0 could not choose a checkpoint to "
                "resume from; its log says why"
            )
        name = bytes(b for b in encoded if b).decode()
        if not name or code:
            return None
        if outside:  # an explicit path outside the run dir: every rank was given the same request
            return chosen if self.world.is_leader else str(knobs.resume_from() or self._resume_request)
        return os.path.join(self.run_dir, name)

    def _newest_verified(self, existing: list[reader.CheckpointInfo]) -> str | None:
        for info in reversed(existing):
            checked = reader.inspect_checkpoint(info.path, verify=True)
            if checked.format_error is not None:  # newer, not corrupt: never set it aside
                raise checked.format_error
            if checked.valid:
                return info.path
            log.error(
                "guardian: checkpoint %s is corrupt and will not be used:\n  %s",
                info.name,
                "\n  ".join(checked.problems),
            )
            commit.set_aside(
                self.run_dir, info.name, "failed verification: " + "; ".join(checked.problems)[:500]
            )
        return None

    def _named_checkpoint(self, request: str, existing: list[reader.CheckpointInfo]) -> str:
        path = request if os.path.isdir(request) else os.path.join(self.run_dir, request)
        if not os.path.isdir(path):
            raise CheckpointNotFoundError(f"resume={request!r}: no such checkpoint (looked for {path})")
        checked = reader.inspect_checkpoint(path, verify=True)
        if checked.format_error is not None:
            raise checked.format_error
        if not checked.valid:
            raise CorruptCheckpointError(
                f"cannot resume from {path}: " + "; ".join(checked.problems), checked.problems
            )
        chosen_real = os.path.realpath(path)
        newer = [
            i for i in existing if i.manifest and checked.manifest and i.manifest.seq > checked.manifest.seq
        ]
        if os.path.dirname(chosen_real) == os.path.realpath(self.run_dir):
            for info in newer:
                commit.set_aside(self.run_dir, info.name, f"superseded: resuming from older {checked.name}")
        return path

    def _load(self, path: str) -> None:
        self._check_fits(path)
        # Checked: now the model tensors' bytes can be read straight into the live
        # parameters and buffers (no second full copy of the weights in memory).
        live = snap_mod.capture(
            {n: (a.kind, a.state_dict()) for n, a in self.components.items() if a.kind == "module"}
        ).tensors
        loaded: dict[str, Any] = {}
        for prefix in self._parts(path):
            loaded.update(snap_mod.load(path, prefix, into=live if not prefix else None))
        self._reshard(path, loaded)
        for name, adapter in self.components.items():
            if name in loaded:
                kind, state = loaded[name]
                if adapter.kind in ("module", "optimizer"):
                    adapter.load_state_dict(state, name)
                else:
                    adapter.load_state_dict(state)
                if adapter.kind == "generator":
                    self._loaded_generators[name] = state
        self.policy.load_state_dict(loaded.get("policy", ("policy", {}))[1])
        self.extra.update(loaded.get("extra", ("extra", {}))[1])
        self._restore_progress(loaded["progress"][1])
        self._pending_rng = loaded["rng"][1]
        rng_mod.restore_global(self._pending_rng)
        self.resumed_from = path
        self.last_checkpoint = path
        self.retention.protected.add(os.path.basename(path.rstrip("/")))
        man = reader.inspect_checkpoint(path, verify=False).manifest
        self.metrics = dict((man.metrics if man else {}) or {})
        self._last_saved_position = self._position()
        self._last_save_step = self.global_step
        log.info(
            "guardian: resumed from %s (epoch %d, step %d%s)",
            path,
            self.epoch,
            self.global_step,
            f", batch {self.batch_in_epoch} of the epoch" if self._pending_position else "",
        )

    def _check_fits(self, path: str) -> None:
        """Every check a resume needs, on shapes alone (meta tensors), before any live
        tensor is touched: a refused resume leaves the model exactly as it was."""
        meta: dict[str, Any] = {}
        for prefix in self._parts(path):
            meta.update(
                {n: (k, sharded.global_meta(t)) for n, (k, t) in snap_mod.load_meta(path, prefix).items()}
            )
        self._check_component_sets(meta, path)
        for name, adapter in self.components.items():
            if name not in meta:
                continue
            kind, state = meta[name]
            if kind != adapter.kind:
                raise StateMismatchError(
                    f"{path}: component {name!r} is a {kind} in the checkpoint but a {adapter.kind} here"
                )
            if hasattr(adapter, "check_state"):
                adapter.check_state(state, name)

    def _reshard(self, path: str, loaded: dict[str, Any]) -> None:
        """Sharded components (saved as per-rank shards, or loaded into a live sharded
        model) are rebuilt for this rank's placement from every saved rank's pieces —
        so a run saved by N ranks resumes on M (reading only the regions it needs)."""
        names = [
            n
            for n, (kind, tree) in loaded.items()
            if n in self.components
            and (sharded.contains_records(tree) or sharded.contains_dtensor(self.components[n].state_dict()))
        ]
        if not names:
            return
        from .format import manifest as manifest_mod

        all_ranks = sharded.load_all_ranks(path, manifest_mod.read(path).world_size)
        for name in names:
            adapter = self.components[name]
            trees = [rank_parts[name][1] for rank_parts in all_ranks if name in rank_parts]
            if not trees:
                raise CorruptCheckpointError(f"{path}: no rank holds component {name!r}")
            target_for = None
            if isinstance(adapter, OptimizerState):
                target_for = sharded.params_as_targets(adapter.named_params())
            state = sharded.walk_pairs(
                trees, adapter.state_dict(), rank=self.world.rank, target_for=target_for
            )
            loaded[name] = (loaded[name][0], state)

    def _parts(self, path: str) -> list[str]:
        """Which state files this rank reads: the top level, plus its own rank's part
        of a multi-rank checkpoint."""
        from .format import manifest as manifest_mod

        saved_ws = manifest_mod.read(path).world_size
        if saved_ws <= 1:
            return [""]
        if saved_ws != self.world.world_size:
            source = self.world.rank if self.world.rank < saved_ws else 0
            log.warning(
                "guardian: %s was saved by %d ranks and is resumed by %d; rank %d takes rank %d's RNG and "
                "data position — the run continues but is no longer bit-exact",
                path,
                saved_ws,
                self.world.world_size,
                self.world.rank,
                source,
            )
        else:
            source = self.world.rank
        return ["", rank_prefix(source, saved_ws)]

    def _check_component_sets(self, loaded: dict[str, Any], path: str) -> None:
        saved = set(loaded) - RESERVED
        live = set(self.components)
        if saved == live:
            return
        msg = (
            f"{path} does not match what protect() found: only in the checkpoint: "
            f"{sorted(saved - live) or 'nothing'}; only here: {sorted(live - saved) or 'nothing'}."
        )
        if self.strict:
            raise StateMismatchError(
                msg + " Pass the same objects as the run that saved it, "
                "or protect(strict=False) to load what matches."
            )
        log.warning("guardian: %s Loading the components both have (strict=False).", msg)

    def _restore_progress(self, progress: dict[str, Any]) -> None:
        self._loaded_progress = progress
        self.epoch = progress["epoch"]
        self.global_step = progress["global_step"]
        self.batch_in_epoch = progress["batch_in_epoch"]
        self.batches_total = progress["batches_total"]
        if progress.get("epoch_start") is not None:
            self._pending_position = progress

    def _restore_checkpoint_rng(self) -> None:
        """Called by the resumed iterator right before the first remaining batch."""
        if self._pending_rng is not None:
            rng_mod.restore_global(self._pending_rng)
        gens = data_pos.loader_generators(self._loader)
        saved = self._loaded_progress.get("loader_generators") or []
        for g, s in zip(gens, saved, strict=bool(saved)):
            g.set_state(s)
        for name, state in self._loaded_generators.items():
            self.components[name].load_state_dict(state)

    def load_best_weights(self) -> None:
        """Load the best checkpoint's model weights into the live model(s)."""
        best = self._best_checkpoint()
        if best is None:
            log.warning("guardian: restore_best requested but no best checkpoint exists")
            return
        loaded = snap_mod.load(best)
        for name, adapter in self.components.items():
            if adapter.kind == "module" and name in loaded:
                adapter.load_state_dict(loaded[name][1], name)
        log.info(
            "guardian: restored the best weights from %s (%s=%s)",
            best,
            self.best.monitor if self.best else "?",
            self.policy.best,
        )

    def _best_checkpoint(self) -> str | None:
        for info in reversed(reader.list_checkpoints(self.run_dir)):
            if info.manifest and "best" in info.manifest.reason:
                return info.path
        return None
