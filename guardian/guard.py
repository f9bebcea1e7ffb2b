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

* at the end of a batch's body, inside ``g.batches()``: everything the body does
  after ``g.step()`` (a mid-epoch ``report()`` and its evaluation, ``g.save()``) has run,
  and the resumed run continues with the next batch. Saves that ``g.step()`` decides
  (``every_steps``, ``every_seconds``), the best checkpoint of such a report, and a
  preemption noticed during the body are taken there, as one checkpoint. A loop that
  does not iterate ``g.batches()`` has its exact point at ``g.step()`` itself;
* at the epoch boundary (the end of an iteration of ``g.epochs()``): a save
  requested between the batch loop and the end of the epoch body — the best checkpoint
  of a ``report()`` after the batch loop, a manual ``save()``, a signal that arrives
  during evaluation — is taken there, once the whole body (per-epoch scheduler steps,
  evaluation, ``ReduceLROnPlateau.step``) has run, merged with the epoch save.

Pending gradients (an accumulation in progress) move any save to the batch boundary
after the next optimizer step; a loop that ends with gradients pending takes no final
checkpoint. A step save due on an epoch's last batch joins the epoch save.

Signals only set a flag; the save happens at the next such point and the process
exits with 75 ("checkpointed, restart me"). Leaving the block normally saves a final
checkpoint and marks the run finished; leaving it with an exception saves nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from . import commit, hparams
from .agreement import Agreement
from .config import GuardConfig
from .distributed import World
from .errors import EXIT_REQUEUE
from .faults import fault_point
from .history import History
from .liveness import RunVoice
from .locking import RunLock
from .logs import ensure_visible_logging
from .monitoring import MetricWatch
from .policies import (
    to_float,
)
from .position import LoopPosition, StepBoundaries
from .preemption import PreemptionFlag
from .restore import Restored, Restorer
from .resume import Resumer
from .rundir import take_run_dir
from .saving import SaveFacts, Saver, SaveRequests
from .state.discover import describe, discover
from .worker_signals import is_worker_death, requeue_after_worker_death, stop_reporting_worker_deaths

log = logging.getLogger(__name__)


class Guard:
    """What ``protect()`` returns: counters (``epoch``, ``global_step``, ``batch_in_epoch``),
    ``resumed_from``, ``extra`` (JSON-able values saved with every checkpoint),
    ``best_checkpoint``/``best_score``, and the loop API below."""

    def __init__(self, trainer: Any, explicit: dict[str, Any], config: GuardConfig, writer: Any) -> None:
        self.config = config
        self.run_dir = config.run_dir
        self.components, self._loaders = discover(trainer, explicit)
        self._optimizers = {n: a.optimizer for n, a in self.components.items() if a.kind == "optimizer"}
        self.preemption = PreemptionFlag() if config.handle_signals else None
        self._lock: RunLock | None = None
        self.world = World()  # detected in __enter__: the process group may be set up after protect()
        self.agreement = Agreement(self.world)  # how ranks agree on per-step flags (agreement.py)
        self.saver = Saver(config, self.components, writer)
        self.voice = RunVoice(self.run_dir)
        self.history = History(self.run_dir, tensorboard=config.tensorboard)  # history.csv: see history/
        self.saver.on_commit = self.history.committed
        self.position = LoopPosition()
        self.watch = MetricWatch(config.best, config.early)
        self.requests = SaveRequests()
        self.extra: dict[str, Any] = {}
        self.metrics: dict[str, float] = {}
        self.resumed_from: str | None = None
        self._script_hparams: dict[str, Any] = {}
        self._restored: Restored | None = None
        self._in_epoch_body = False
        self.boundaries = StepBoundaries(list(self._optimizers.values()))
        self._preempting = False

    # ------------------------------------------------------------------ public state

    epoch = property(lambda self: self.position.epoch)
    global_step = property(lambda self: self.position.global_step)
    batch_in_epoch = property(lambda self: self.position.batch_in_epoch)
    batches_total = property(lambda self: self.position.batches_total)
    last_checkpoint = property(lambda self: self.saver.last_checkpoint)
    best_checkpoint = property(lambda self: self.saver.best_checkpoint)
    policy = property(lambda self: self.watch.state)
    should_stop = property(lambda self: self.watch.state.stopped)
    best_score = property(lambda self: self.watch.state.best)
    _writer = property(lambda self: self.saver.writer)  # tests and benchmarks look at it

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Guard:
        ensure_visible_logging()
        self.world = World.detect()
        self.voice.is_leader, self.voice.world_size = self.world.is_leader, self.world.world_size
        self._lock = take_run_dir(self.run_dir, lock=self.world.is_leader)  # rank 0 holds the lock
        try:
            if self.world.is_leader:
                commit.clean_stale(self.run_dir)
            self.voice.beat(0, 0, "init", force=True)
            self.saver.attach(self.world)
            self.agreement = Agreement.open(self.world)
            log.info("protecting %s → %s", describe(self.components, self._loaders), self.run_dir)
            self._script_hparams = hparams.script_values(self._optimizers)
            self.boundaries.attach()
            self._resume()
            progress = self._restored.progress if self._restored else None
            self.history.start(leader=self.world.is_leader, progress=progress, checkpoint=self.resumed_from)
            if self.preemption:
                self.preemption.install()
            self.voice.status("running", **self._status_fields(resumed_from=self.resumed_from))
        except BaseException as e:
            self._record_failure(type(e), e)  # run.json must not go on saying "running"
            self._cleanup(failed=True)
            raise
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        try:
            if exc_type is None:
                self._finish()
            else:
                self._abandon(exc_type, exc)
        finally:
            self._cleanup(failed=exc_type is not None)

    def _finish(self) -> None:
        if self.position.epoch_batches_done and self._in_epoch_body:
            self.position.end_epoch()  # the body was left after its batch loop: the epoch is over
        if self.config.save_on_exit and self.boundaries.gradients_pending:
            warn_final_save_skipped(self.last_checkpoint)
        elif self.config.save_on_exit:
            self._save_now(self.requests.take(["final"]))
        self.saver.wait_in_flight()
        if self.config.restores_best(early_stopped=self.policy.stopped):
            self.load_best_weights()
        self.voice.beat(self.global_step, self.epoch, "done", force=True)
        self.voice.status("finished", **self._status_fields(early_stopped=self.policy.stopped, exit_code=0))

    def _abandon(self, exc_type: Any, exc: BaseException | None) -> None:
        """Nothing of the (maybe half-updated) state is saved; a save in flight completes."""
        requeue = self._preempt_requested() and is_worker_death(exc)
        if requeue:  # the other workers die of the same signal: their reports must not cut the exit short
            stop_reporting_worker_deaths()
        self.saver.settle()
        if self._preempting and isinstance(exc, SystemExit):
            self.voice.status_best_effort("preempted", **self._status_fields(exit_code=exc.code))
            return
        if requeue and self.preemption:
            self.voice.status_best_effort(
                "preempted", **self._status_fields(exit_code=self.preemption.exit_code)
            )
            requeue_after_worker_death(
                self.preemption.signum, self.preemption.exit_code, exc, self.last_checkpoint
            )
        self._record_failure(exc_type, exc)
        last = self.last_checkpoint or "none"
        log.error("training raised %s; the last good checkpoint is %s", exc_type.__name__, last)

    def _record_failure(self, exc_type: Any, exc: BaseException | None) -> None:
        error = {"type": exc_type.__name__, "message": str(exc)[:2000]}
        self.voice.status_best_effort("failed", **self._status_fields(error=error))

    def _status_fields(self, **fields: Any) -> dict[str, Any]:
        return dict(step=self.global_step, epoch=self.epoch, last_checkpoint=self.last_checkpoint, **fields)

    def _cleanup(self, failed: bool) -> None:
        self.boundaries.detach()
        self.agreement.close(failed=failed)
        if self.preemption:
            self.preemption.uninstall()
        self.saver.close()
        self.history.close()
        if self._lock:
            self._lock.release()

    # ------------------------------------------------------------------ loop API

    def epochs(self, n: int) -> Iterator[int]:
        """Epoch numbers from where the run stands up to ``n`` (exclusive). Ends early
        when early stopping triggers. The end of each iteration is the epoch boundary."""
        self.voice.totals["epochs_total"] = n  # progress and ETA in `guardian status`
        while self.epoch < n and not self.policy.stopped:
            self._in_epoch_body = True
            self.history.epoch_started()
            yield self.epoch
            self._in_epoch_body = False
            self._end_epoch()

    def batches(self, loader: Any) -> Iterator[Any]:
        """The current epoch's batches; a mid-epoch resume skips at the sampler level."""
        inner = self.position.iterate(loader, self._restore_checkpoint_rng, self._exact_point_reached)
        return self.history.batches(inner)

    def step(self, *, boundary: bool | None = None) -> None:
        """Call after each optimizer step (or each micro-batch: boundaries are detected).
        ``boundary`` overrides the detection: False for a micro-batch of an accumulation,
        True when no discovered optimizer stepped but the state is whole."""
        self.position.step_done()
        self.voice.step_taken(now := time.monotonic())
        boundary = self.boundaries.take(boundary)
        self.voice.beat(self.global_step, self.epoch, "train")
        self.saver.check()
        if not boundary:
            return
        steps_due = self.config.schedule.steps_due(self.global_step)
        seconds_due = self.config.schedule.seconds_due(now - self.saver.last_save_time)
        agreed = self.agreement.post(self.saver.seq, self._preempt_requested(), seconds_due, self.saver.busy)
        if self.world.distributed and agreed.all_idle:
            self.saver.check(collect=True)  # every rank's save is done: all learn its outcome now
        reasons = (["steps"] if steps_due else []) + (["seconds"] if agreed.seconds_due else [])
        self.requests.defer(reasons)
        if not self.position.mid_epoch:  # no g.batches() around this step: it is the exact point
            self._exact_point_reached()

    def _exact_point_reached(self) -> None:
        """Take what was asked for since the last exact point: the end of a batch's body
        inside ``g.batches()`` (so a ``report()`` after ``g.step()`` runs first), else
        ``g.step()`` itself. Pending gradients wait for the next optimizer step."""
        if self.boundaries.accumulating:
            return
        if self.agreement.preempt_due or (not self.world.distributed and self._preempt_requested()):
            self._preempt_now(self.requests.take([]))
        if not self.requests.pending:
            self.saver.reserve_once(self._collect)
            return
        # on an epoch's last batch with an epoch save due, what is asked for now waits for
        # that boundary: one checkpoint for the step, not two
        if (
            self._in_epoch_body
            and self.position.on_last_batch()
            and self.config.schedule.epoch_due(self.epoch)
        ):
            return
        self._save_now(self.requests.take([]))
        fault_point("step.after_save")  # submitted; an async save may still be in flight

    def report(self, **metrics: Any) -> None:
        """Record metrics (floats or one-element tensors; no graph kept). An improved
        ``monitor`` is saved as the best checkpoint at the next exact point (module doc)."""
        values = {k: to_float(v, k) for k, v in metrics.items()}
        if self.world.distributed:  # one decision for all ranks: rank 0's values count
            values = {k: self.world.broadcast_float(v) for k, v in sorted(values.items())}
        self.metrics.update(values)
        self.history.record(self.global_step, self.epoch, values)  # before a save it may trigger
        self.voice.beat(self.global_step, self.epoch, "eval")
        if self.watch.observe(values) and self.config.save_best:
            self._request_save("best")
        if self._at_exact_point() and self.agreement.now(self._preempt_requested())[0]:
            self._preempt_now(self.requests.take([]))  # outside the batch loop and any epoch

    def log(self, **scalars: Any) -> None:
        """Append scalars (floats or 1-element tensors) to ``history.csv``; never saves."""
        self.history.record(self.global_step, self.epoch, {k: to_float(v, k) for k, v in scalars.items()})

    def save(self, reason: str = "manual") -> str | None:
        """A checkpoint at the next exact point; its path if committed at once, else None."""
        return self._request_save(reason)

    # ------------------------------------------------------------------ exact points

    def _at_exact_point(self) -> bool:
        """Can a checkpoint taken right now resume without running user code twice? Only
        outside ``g.batches()`` and outside any epoch body (a manual loop's step)."""
        return not (self.position.mid_epoch or self._in_epoch_body or self.boundaries.accumulating)

    def _request_save(self, reason: str) -> str | None:
        if self._at_exact_point():
            return self._save_now(self.requests.take([reason]))
        self.requests.defer([reason])
        return None

    def _end_epoch(self) -> None:
        self.watch.end_epoch(self.epoch, list(self.metrics))
        self.position.end_epoch()
        reasons = ["epoch"] if self.config.schedule.epoch_due(self.epoch) else []
        if self.policy.stopped:
            reasons = ["epoch", "early_stop"]
        if self.boundaries.accumulating:  # gradients are pending: the next optimizer step is the exact point
            self.requests.defer(reasons)
            return
        if self.agreement.preempt_due or self.agreement.now(self._preempt_requested())[0]:
            self._preempt_now(self.requests.take(reasons))
        if reasons or self.requests.pending:
            self._save_now(self.requests.take(reasons))

    def _preempt_now(self, reasons: list[str]) -> None:
        signum = self.preemption.signum if self.preemption else None
        why = f"signal {signum} received" if signum else "another rank received a stop signal"
        log.warning("%s; checkpointing at step %d and exiting", why, self.global_step)
        self._save_now(reasons + ["preempt"])
        self.saver.wait_in_flight()  # with on_save_error='warn' a failure still exits 75
        self._preempting = True
        self.agreement.drain()  # nothing in flight when the groups are torn down
        self.world.leave()
        raise SystemExit(self.preemption.exit_code if (self.preemption and signum) else EXIT_REQUEUE)

    # ------------------------------------------------------------------ saving

    def _save_now(self, reasons: list[str]) -> str | None:
        key = self.position.key()
        merged = self.requests.at(key, reasons)
        if merged is None:
            return None
        reasons = merged
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
        self.requests.saved(key, reasons)
        path = self.saver.save(self._collect(), facts)
        self.voice.beat(self.global_step, self.epoch, "train", force=True)  # no longer "save"
        return path

    def _collect(self) -> dict[str, tuple[str, Any]]:
        progress = {**self.position.state_dict(), **self.history.state(mid_epoch=self.position.mid_epoch)}
        return self.saver.collect(progress, self.policy.state_dict(), self.extra)

    def _preempt_requested(self) -> bool:
        return bool(self.preemption and self.preemption.requested)

    # ------------------------------------------------------------------ resuming

    def _resume(self) -> None:
        resumer = Resumer(self.run_dir, self.components, self.world, strict=self.config.strict)
        resumer.remote = self.config.replicate_to  # asked when the run directory has no checkpoint
        restored = resumer.resume(
            self.config.resume, on_load=lambda: self.voice.beat(0, 0, "load", force=True)
        )
        self.saver.continue_after(resumer.seq, restored.path if restored else None)
        if restored is None:
            log.info("no checkpoint in %s; starting fresh", self.run_dir)
            return
        self._restored = restored
        self.position.load_state_dict(restored.progress)
        self.position.restore_generators_now(self._loaders)
        self.watch.state.load_state_dict(restored.policy)
        self.extra.update(restored.extra)
        self.metrics = restored.metrics
        self.resumed_from = restored.path
        self.requests.saved(self.position.key(), [])
        self.watch.first_epoch = self.epoch
        hparams.warn_if_changed(restored.hparams, self._script_hparams, restored.path)

    def _restore_checkpoint_rng(self) -> None:  # right before a resumed epoch's first remaining batch
        if self._restored is not None:
            self._restored.put_back_rng(self.position.loader, self.components)

    def load_best_weights(self) -> None:
        """Load the best checkpoint's weights into the live model(s), resharded (DDP, FSDP2)."""
        self.saver.wait_in_flight()
        Restorer(self.run_dir, self.components, self.world, strict=False).restore_best(self.policy.best)


def warn_final_save_skipped(newest: str | None) -> None:
    """The loop ended between micro-batches. A checkpoint holds no gradients, so one
    taken now would resume without them; the newest checkpoint stays the exact point,
    and a rerun (or a longer run) replays the micro-batches since."""
    log.warning(
        "the run ended with gradients pending (micro-batches after the last optimizer step); "
        "no final checkpoint, which would drop them: the newest is %s, and a rerun replays "
        "from there exactly. Step the optimizer on an epoch's last micro-batch to end whole.",
        newest or "none",
    )
