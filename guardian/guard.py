"""The guard around a training loop: its public loop API and its lifecycle.

    with guardian.protect(trainer, dir="runs/exp1", every_steps=500,
                          monitor="val_loss", mode="min") as g:
        for epoch in g.epochs(10):
            for batch in g.batches(train_loader):
                loss = model(batch).mean(); loss.backward()
                optimizer.step(); optimizer.zero_grad(); scheduler.step()
                g.step()
            g.report(val_loss=evaluate(model))

Entering the guard finds the training state, takes the run directory's lock and
resumes from the newest checkpoint that can be restored (``resume.py``); saving is
``saving.py``'s; where the loop stands is ``position.py``'s.

**Where a checkpoint resumes** (the loop rules). A checkpoint is taken only where
the resumed program can continue without running any of the user's code twice:

* at ``g.step()``, which ends a batch's body — and right after it, for a ``report()``
  or ``save()`` that follows ``g.step()`` in the batch loop (a mid-epoch evaluation):
  the resumed run continues with the next batch;
* at the epoch boundary (the end of an iteration of ``g.epochs()``): a save
  requested anywhere else in the epoch body — the best checkpoint of a ``report()``
  after the batch loop, a manual ``save()``, a signal that arrives during evaluation —
  is taken there, once the whole body (per-epoch scheduler steps, evaluation,
  ``ReduceLROnPlateau.step``) has run, and merged with the epoch save into one
  checkpoint; a save requested between fetching a batch and its ``g.step()`` is taken
  at that ``g.step()``.

Signals only set a flag; the save happens at the next such point and the process
exits with 75 ("checkpointed, restart me"). Leaving the block normally saves a final
checkpoint and marks the run finished; leaving it with an exception saves nothing.
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from . import commit, hparams, knobs
from .distributed import World
from .errors import EXIT_REQUEUE, CheckpointWriteError, GuardianError, StateMismatchError
from .faults import fault_point
from .liveness import RunVoice
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
from .position import LoopPosition
from .preemption import PreemptionFlag
from .resume import Restored, Resumer, best_checkpoint
from .saving import SaveFacts, Saver
from .smallfiles import fsync_dir
from .state import rng as rng_mod
from .state.components import OptimizerState
from .state.data import loader_generators
from .state.discover import describe, discover
from .worker_signals import is_worker_death

log = logging.getLogger(__name__)

# Reasons that add nothing when the position has not moved since the last save: the
# state they would capture is the one already committed at that position.
_REPEATABLE = {"steps", "seconds", "epoch", "final", "preempt", "early_stop"}


class _StderrUnlessConfigured(logging.StreamHandler):
    """Shows guardian's lines on stderr while the application has no logging set up,
    and steps aside (lines propagate to the application's handlers instead) as soon as
    it configures the root logger — at any time, so no line is ever printed twice."""

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)


def _ensure_visible_logging() -> None:
    """At 3 a.m. the log is all the user has: show guardian's INFO lines on stderr
    unless the application configured logging itself (or GUARDIAN_QUIET is set)."""
    package = logging.getLogger("guardian")
    if knobs.quiet() or any(isinstance(h, _StderrUnlessConfigured) for h in package.handlers):
        return
    handler = _StderrUnlessConfigured(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s guardian: %(message)s", "%H:%M:%S"))
    package.addHandler(handler)
    if package.level == logging.NOTSET:
        package.setLevel(logging.INFO)


def make_run_dir(run_dir: str) -> None:
    """Create the run directory (and missing parents) durably: each new entry's parent
    is fsynced, so a power cut cannot lose the directory that holds the checkpoints."""
    missing = []
    path = os.path.abspath(run_dir)
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    try:
        for new in reversed(missing):
            os.mkdir(new, 0o755)
            fsync_dir(os.path.dirname(new))
    except FileExistsError as e:
        if not os.path.isdir(e.filename or ""):
            raise CheckpointWriteError(
                f"checkpoint directory {run_dir} exists and is not a directory; choose another dir=."
            ) from e
    except OSError as e:
        raise CheckpointWriteError(
            f"cannot create checkpoint directory {run_dir}: {e.strerror}. Choose a writable location with dir=.",
            e.errno,
        ) from e
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise CheckpointWriteError(
            f"checkpoint directory {run_dir} is not writable by this user; fix its permissions or choose another dir=."
        )


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
    on_save_error: str
    handle_signals: bool


class Guard:
    """The object ``protect()`` returns. ``epoch``, ``global_step`` and
    ``batch_in_epoch`` are read-only by intent; ``resumed_from`` is the checkpoint this
    run continued from (None for a fresh start); ``extra`` is a dict of JSON-able
    values saved and restored with every checkpoint; ``best_checkpoint`` and
    ``best_score`` name the best checkpoint so far and its monitored value."""

    def __init__(self, trainer: Any, explicit: dict[str, Any], config: GuardConfig, writer: Any) -> None:
        self.config = config
        self.run_dir = config.run_dir
        self.best, self.early = config.best, config.early
        self.components, self._loaders = discover(trainer, explicit)
        self._optimizers = {
            n: a.optimizer for n, a in self.components.items() if isinstance(a, OptimizerState)
        }
        self._preempt = PreemptionFlag() if config.handle_signals else None
        self._lock: RunLock | None = None
        self.world = World()  # detected in __enter__: the process group may be set up after protect()
        self.saver = Saver(
            self.run_dir,
            self.components,
            writer,
            retention=config.retention,
            best=config.best,
            on_save_error=config.on_save_error,
        )
        self.saver.on_commit = self._note_commit
        self.voice = RunVoice(self.run_dir)
        self.position = LoopPosition()
        self.policy = PolicyState()
        self.extra: dict[str, Any] = {}
        self.metrics: dict[str, float] = {}
        self.resumed_from: str | None = None
        self.best_checkpoint: str | None = None
        self._script_hparams: dict[str, Any] = {}
        self._restored_rng: dict[str, Any] | None = None
        self._restored: Restored | None = None
        self._deferred: list[str] = []  # save reasons waiting for the next exact point
        self._in_epoch_body = False
        self._epoch_metric: float | None = None
        self._monitor_seen = False
        self._first_epoch_here = 0
        self._opt_stepped = False
        self._hooks: list[Any] = []
        self._staging_reserved = False
        self._last_saved: tuple[tuple[int, int, int], list[str]] | None = None
        self._last_save_time = time.monotonic()
        self._preempting = False

    # ------------------------------------------------------------------ public state

    epoch = property(lambda self: self.position.epoch)
    global_step = property(lambda self: self.position.global_step)
    batch_in_epoch = property(lambda self: self.position.batch_in_epoch)
    batches_total = property(lambda self: self.position.batches_total)
    last_checkpoint = property(lambda self: self.saver.last_checkpoint)
    should_stop = property(lambda self: self.policy.stopped)
    best_score = property(lambda self: self.policy.best)
    _writer = property(lambda self: self.saver.writer)  # tests and benchmarks look at it

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Guard:
        _ensure_visible_logging()
        self.world = World.detect()
        self.voice.is_leader, self.voice.world_size = self.world.is_leader, self.world.world_size
        self._take_run_dir()
        try:
            if self.world.is_leader:
                commit.clean_stale(self.run_dir)
            self.voice.beat(0, 0, "init", force=True)
            self.saver.attach(self.world)
            log.info("protecting %s → %s", describe(self.components, self._loaders), self.run_dir)
            self._script_hparams = hparams.script_values(self._optimizers)
            for opt in self._optimizers.values():
                self._hooks.append(opt.register_step_post_hook(self._on_optimizer_step))
            self._resume()
            if self._preempt:
                self._preempt.install()
            self.voice.status("running", **self._status_fields(resumed_from=self.resumed_from))
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

    def _take_run_dir(self) -> None:
        make_run_dir(self.run_dir)
        if not self.world.is_leader:  # one lock per run directory, held by rank 0
            return
        try:
            self._lock = RunLock(self.run_dir)
            self._lock.acquire()
        except GuardianError:
            raise
        except OSError as e:
            raise CheckpointWriteError(
                f"cannot use checkpoint directory {self.run_dir}: {e.strerror}; fix its permissions "
                "or choose another dir=.",
                e.errno,
            ) from e

    def _finish(self) -> None:
        if self.position.epoch_batches_done and self._in_epoch_body:
            self.position.end_epoch()  # the body was left after its batch loop: the epoch is over
        if self.config.save_on_exit:
            self._save_now(self._take_deferred(["final"]))
        self.saver.wait_in_flight()
        self._restore_best_if_asked()
        self.voice.beat(self.global_step, self.epoch, "done", force=True)
        self.voice.status("finished", **self._status_fields(early_stopped=self.policy.stopped, exit_code=0))

    def _abandon(self, exc_type: Any, exc: BaseException | None) -> None:
        """No checkpoint of the current (possibly half-updated) state; but a save already
        in flight was taken at an exact point, so it is completed."""
        try:
            self.saver.writer.wait()
        except GuardianError as e:
            log.error("the checkpoint in flight failed too: %s", e)
        if self._preempting and isinstance(exc, SystemExit):
            self.voice.status_best_effort("preempted", **self._status_fields(exit_code=exc.code))
            return
        if self._preempt_requested() and is_worker_death(exc):
            self._requeue_without_checkpoint(exc)
        error = {"type": exc_type.__name__, "message": str(exc)[:2000]}
        self.voice.status_best_effort("failed", **self._status_fields(error=error))
        log.error(
            "training raised %s; the last good checkpoint is %s",
            exc_type.__name__,
            self.last_checkpoint or "none",
        )

    def _requeue_without_checkpoint(self, exc: BaseException | None) -> None:
        """A preemption signal also killed the workers of a loader guardian did not
        start (one the program iterates itself, e.g. for evaluation) before the next
        exact point: no checkpoint can be taken, but this is a preemption, not a crash."""
        assert self._preempt is not None
        code = self._preempt.exit_code
        log.warning(
            "signal %s received and a DataLoader worker died of it before a checkpoint could be "
            "taken (%s); exiting %d — the run restarts from %s. Iterate loaders through "
            "g.batches() to have their workers leave the signal to this process.",
            self._preempt.signum,
            exc,
            code,
            self.last_checkpoint or "the beginning",
        )
        self.voice.status_best_effort("preempted", **self._status_fields(exit_code=code))
        raise SystemExit(code) from exc

    def _status_fields(self, **fields: Any) -> dict[str, Any]:
        return {
            "step": self.global_step,
            "epoch": self.epoch,
            "last_checkpoint": self.last_checkpoint,
            **fields,
        }

    def _cleanup(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self._preempt:
            self._preempt.uninstall()
        self.saver.close()
        if self._lock:
            self._lock.release()

    # ------------------------------------------------------------------ loop API

    def epochs(self, n: int) -> Iterator[int]:
        """Epoch numbers from where the run stands up to ``n`` (exclusive). Ends early
        when early stopping triggers. The end of each iteration is the epoch boundary."""
        while self.epoch < n and not self.policy.stopped:
            self._in_epoch_body = True
            yield self.epoch
            self._in_epoch_body = False
            self._end_epoch()

    def batches(self, loader: Any) -> Iterator[Any]:
        """Iterate the training loader for the current epoch, resuming mid-epoch at the
        sampler level when the run was checkpointed inside this epoch."""
        return self.position.iterate(loader, self._restore_checkpoint_rng)

    def step(self, *, boundary: bool | None = None) -> None:
        """Call after each optimizer step (or each micro-batch: boundaries are detected).

        ``boundary`` overrides the detection: False for a micro-batch of an
        accumulation, True when no discovered optimizer stepped but the state is whole.
        """
        self.position.step_done()
        now = time.monotonic()
        self.voice.step_taken(now)
        if boundary is None:
            boundary = self._opt_stepped or not self._optimizers
        self._opt_stepped = False
        self.voice.beat(self.global_step, self.epoch, "train")
        self.saver.check()
        if not boundary:
            return
        steps_due = self.config.schedule.steps_due(self.global_step)
        seconds_due = self.config.schedule.seconds_due(now - self._last_save_time)
        preempt, seconds_due, any_busy = self._agree(self._preempt_requested(), seconds_due, self._busy())
        if self.world.distributed and not any_busy:
            self.saver.check(collect=True)  # every rank's save is done: all learn its outcome now
        reasons = (["steps"] if steps_due else []) + (["seconds"] if seconds_due else [])
        if preempt:
            self._preempt_now(self._take_deferred(reasons))
        if reasons or self._deferred:
            self._save_now(self._take_deferred(reasons))
            fault_point("step.after_save")  # submitted; an async save may still be in flight
        elif not self._staging_reserved:
            self._staging_reserved = True
            self.saver.reserve(self._collect())

    def report(self, **metrics: Any) -> None:
        """Record metrics (floats or one-element tensors; graphs are never retained).
        If the monitored metric improved, the best checkpoint is saved at the next
        exact point (see the module docstring): it holds the weights that produced
        the value as long as no training happens in between."""
        values = {k: to_float(v, k) for k, v in metrics.items()}
        if self.world.distributed:  # one decision for all ranks: rank 0's values count
            values = {k: self.world.broadcast_float(v) for k, v in sorted(values.items())}
        self.metrics.update(values)
        self.voice.beat(self.global_step, self.epoch, "eval")
        if self.best and self.best.monitor in values:
            self._monitor_seen = True
            value = values[self.best.monitor]
            self._epoch_metric = value
            if self.best.improves(value, self.policy.best):
                self.policy.best = value
                if self.config.save_best:
                    self._request_save("best")
        if self._at_exact_point() and self._agree(self._preempt_requested())[0]:
            self._preempt_now(self._take_deferred([]))

    def save(self, reason: str = "manual") -> str | None:
        """Ask for a checkpoint now. Taken at once where the program stands at an exact
        point, else at the next one. Returns the path when it was committed
        synchronously, else None (``last_checkpoint`` follows the commits)."""
        return self._request_save(reason)

    # ------------------------------------------------------------------ exact points

    def _at_exact_point(self) -> bool:
        """Can a checkpoint taken right now resume without running user code twice?
        Yes right after ``g.step()`` inside the batch loop, or outside any epoch body."""
        if self.position.in_iteration:
            return False
        if self._in_epoch_body:
            return self.position.mid_epoch
        return True

    def _request_save(self, reason: str) -> str | None:
        if self._at_exact_point():
            return self._save_now(self._take_deferred([reason]))
        if reason not in self._deferred:
            self._deferred.append(reason)
        return None

    def _take_deferred(self, reasons: list[str]) -> list[str]:
        merged = self._deferred + [r for r in reasons if r not in self._deferred]
        self._deferred = []
        return merged

    def _on_optimizer_step(self, *args: Any) -> None:
        self._opt_stepped = True

    def _end_epoch(self) -> None:
        self._check_monitor_reported()
        if self.early and self.best:
            early_stopping_update(self.early, self.best, self.policy, self._epoch_metric)
            if self.policy.stopped:
                log.info(
                    "early stopping after epoch %d: %s has not improved for %d epoch(s) (best %s at step %s)",
                    self.epoch,
                    self.best.monitor,
                    self.policy.bad_epochs,
                    self.policy.best,
                    self.policy.best_step,
                )
        self._epoch_metric = None
        self.position.end_epoch()
        reasons = ["epoch"] if self.config.schedule.epoch_due(self.epoch) else []
        if self.policy.stopped:
            reasons = ["epoch", "early_stop"]
        if self._agree(self._preempt_requested())[0]:
            self._preempt_now(self._take_deferred(reasons))
        if reasons or self._deferred:
            self._save_now(self._take_deferred(reasons))

    def _check_monitor_reported(self) -> None:
        if not self.best or self._monitor_seen or self.epoch != self._first_epoch_here:
            return
        reported = sorted(self.metrics)
        close = difflib.get_close_matches(self.best.monitor, reported, n=1)
        log.warning(
            "monitor=%r was not reported during epoch %d (g.report() got: %s)%s: no best checkpoint "
            "is saved and early stopping cannot fire until it is.",
            self.best.monitor,
            self.epoch,
            ", ".join(reported) or "nothing",
            f"; did you mean {close[0]!r}?" if close else "",
        )

    def _preempt_now(self, reasons: list[str]) -> None:
        signum = self._preempt.signum if self._preempt else None
        why = f"signal {signum} received" if signum else "another rank received a stop signal"
        log.warning("%s; checkpointing at step %d and exiting", why, self.global_step)
        self._save_now(reasons + ["preempt"])
        self.saver.wait_in_flight()  # with on_save_error='warn' a failure still exits 75
        self._preempting = True
        if self.world.distributed:
            self._leave_process_group()
        raise SystemExit(self._preempt.exit_code if (self._preempt and signum) else EXIT_REQUEUE)

    def _leave_process_group(self) -> None:
        """Every rank has saved; tear the process group down in step on all ranks: a
        rank that exits while a peer's communication threads still hold connections
        to it makes that peer abort (SIGABRT) instead of exiting with the requeue code."""
        import torch.distributed as dist

        self.world.barrier()
        if dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------ saving

    def _save_now(self, reasons: list[str]) -> str | None:
        key = self.position.key()
        if self._last_saved and self._last_saved[0] == key:
            if set(reasons) <= _REPEATABLE | set(self._last_saved[1]):
                return None
            reasons = self._last_saved[1] + [r for r in reasons if r not in self._last_saved[1]]
        if "best" in reasons:
            self.policy.best_step = self.global_step
        self.voice.beat(self.global_step, self.epoch, "save", force=True)
        facts = SaveFacts(
            reasons=reasons,
            step=self.global_step,
            epoch=self.epoch,
            batch_in_epoch=self.batch_in_epoch if self.position.mid_epoch else 0,
            metrics=dict(self.metrics),
            resumed_from=self.resumed_from,
            hparams=self._script_hparams,
        )
        self._last_saved = (key, reasons)
        self._last_save_time = time.monotonic()
        path = self.saver.save(self._collect(), facts)
        self.voice.beat(self.global_step, self.epoch, "train", force=True)  # no longer "save"
        return path

    def _collect(self) -> dict[str, tuple[str, Any]]:
        states: dict[str, tuple[str, Any]] = {n: (a.kind, a.state_dict()) for n, a in self.components.items()}
        states["rng"] = ("rng", rng_mod.capture_global())
        states["progress"] = ("progress", self.position.state_dict())
        states["policy"] = ("policy", self.policy.state_dict())
        states["extra"] = ("extra", dict(self.extra))
        return states

    def _note_commit(self, path: str, manifest: Any) -> None:
        if "best" in manifest.reason:
            self.best_checkpoint = path

    def _busy(self) -> bool:
        return self.world.distributed and self.saver.busy

    def _preempt_requested(self) -> bool:
        return bool(self._preempt and self._preempt.requested)

    def _agree(self, *flags: bool) -> list[bool]:
        """Rank-local facts (a signal, a wall clock) become one decision for all ranks:
        if any rank saw it, every rank acts on it at this same step."""
        if not self.world.distributed:
            return list(flags)
        return [bool(v) for v in self.world.all_max([int(f) for f in flags])]

    # ------------------------------------------------------------------ resuming

    def _resume(self) -> None:
        resumer = Resumer(self.run_dir, self.components, self.world, strict=self.config.strict)
        chosen = resumer.choose(self.config.resume)
        self.saver.seq = resumer.seq
        self._first_epoch_here = self.epoch
        if chosen is None:
            log.info("no checkpoint in %s; starting fresh", self.run_dir)
            return
        self.voice.beat(0, 0, "load", force=True)
        restored = self._agreed_load(resumer, chosen)
        self.position.load_state_dict(restored.progress)
        self.policy.load_state_dict(restored.policy)
        self.extra.update(restored.extra)
        self.metrics = restored.metrics
        self._restored, self._restored_rng = restored, restored.rng
        rng_mod.restore_global(restored.rng)
        self.resumed_from = self.saver.last_checkpoint = chosen
        self.best_checkpoint = best_checkpoint(self.run_dir)
        self.saver.retention.protected.add(os.path.basename(chosen.rstrip("/")))
        self._last_saved = (self.position.key(), [])
        self._first_epoch_here = self.epoch
        hparams.warn_if_changed(resumer.saved_hparams(chosen), self._script_hparams, chosen)
        log.info(
            "resumed from %s (epoch %d, step %d%s)",
            chosen,
            self.epoch,
            self.global_step,
            f", batch {self.batch_in_epoch} of the epoch" if self.position.resumes_mid_epoch else "",
        )

    def _agreed_load(self, resumer: Resumer, chosen: str) -> Restored:
        if not self.world.distributed:
            return resumer.load(chosen)
        restored, error = None, None
        try:
            restored = resumer.load(chosen)
        except GuardianError as e:
            error = e
        if not self.world.agree_ok(error is None):
            if error is not None:
                raise error
            raise StateMismatchError(
                f"rank {self.world.rank}: another rank could not resume from {chosen}; see its log"
            )
        assert restored is not None
        return restored

    def _restore_checkpoint_rng(self) -> None:
        """Called by the resumed iterator right before the first remaining batch."""
        if self._restored is None:
            return
        rng_mod.restore_global(self._restored.rng)
        saved = self._restored.progress.get("loader_generators") or []
        for gen, state in zip(loader_generators(self.position.loader), saved, strict=bool(saved)):
            gen.set_state(state)
        for name, state in self._restored.generators.items():
            self.components[name].load_state_dict(state)

    # ------------------------------------------------------------------ best weights

    def _restore_best_if_asked(self) -> None:
        wanted = self.config.restore_best
        if wanted is None:
            wanted = bool(self.policy.stopped and self.early)
        if wanted:
            self.load_best_weights()

    def load_best_weights(self) -> None:
        """Load the best checkpoint's model weights into the live model(s) — resharded
        like a resume under DDP and FSDP2."""
        self.saver.wait_in_flight()
        best = best_checkpoint(self.run_dir)
        if best is None:
            log.warning("restore_best requested but no best checkpoint exists in %s", self.run_dir)
            return
        Resumer(self.run_dir, self.components, self.world, strict=False).load_best_weights(best)
        log.info(
            "restored the best weights from %s (%s=%s)",
            best,
            self.best.monitor if self.best else "?",
            self.policy.best,
        )
