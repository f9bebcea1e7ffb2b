"""guardian for Hugging Face Transformers: one callback, exact resume, no pickle.

    from guardian.integrations.transformers import GuardianCallback

    args = TrainingArguments("out", save_strategy="no", ...)     # guardian does the saving
    trainer = Trainer(model, args, train_dataset=ds,
                      callbacks=[GuardianCallback("runs/exp1", every_n_steps=100)])
    trainer.train()              # re-run the same script: it resumes by itself

What it saves, through guardian's commit protocol (verified, fsynced, retained): the
model's weights, the optimizer (keyed by parameter name, unwrapped from Accelerate)
and LR scheduler, the AMP scaler, HF's ``TrainerState`` (as JSON: step, epoch,
``log_history``, best metric, every ``ExportableState`` callback's state), the
running training loss, every RNG, the data position, and the model's config (so
``guardian export-weights`` writes the ``from_pretrained`` layout).

**Where checkpoints are taken**: after an optimizer step once HF has finished with
it (the optimizer and scheduler stepped, the step logged and evaluated: the state is
whole) every ``every_n_steps`` steps and on a preemption signal (SIGTERM, SIGUSR1,
SIGUSR2, SIGINT set a flag; the save happens at the next step, then the process
exits 75); when ``monitor`` improves at an evaluation; once an epoch has run to its
end (its evaluation included) every ``every_n_epochs``; and at the end of ``train()``.

**Resume** happens when ``train()`` starts (``on_train_begin``), with no
``resume_from_checkpoint``: the newest checkpoint that verifies and fits the model is
loaded into the live objects, and the Trainer's epoch loop continues from it. The
epochs already trained are passed over; a run stopped inside an epoch continues
with the very next batch: the epoch's iterator is re-created with every RNG as it
was at the epoch start (same shuffle, same worker seeds), the batches already
trained are skipped at the batch sampler (never loaded), and every RNG is put back
to its checkpointed value before the first remaining batch — so the result is
bit-for-bit the uninterrupted run's.

How it reaches into the Trainer (HF has no resume hook a callback can use): the
callback finds its ``Trainer`` on the call stack at ``on_train_begin`` and, for the
duration of ``train()``, wraps three methods of that instance: ``_run_epoch`` (to
pass over trained epochs and position the resumed one), ``_load_rng_state`` (so HF's
own "restore the RNG after the skipped batches" step restores guardian's state, not
a pickle) and ``_maybe_log_save_evaluate`` (its end is a step's exact point). They
are private Trainer methods of transformers 5: a release without them is refused
with a clear error rather than resumed wrongly.

Limits of that exactness: other callbacks' ``on_epoch_begin`` runs once more for
each epoch passed over; ``IterableDataset`` inputs resume at the right batch but are
read, not skipped; random augmentation inside DataLoader workers is exact only if
it derives from the sample index or the worker seed.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import sys
from types import FrameType
from typing import Any

from . import missing, protect_options

try:
    import transformers
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState, TrainerControl
except ImportError as _e:  # pragma: no cover - exercised in a subprocess without transformers
    raise missing("Hugging Face", "transformers", "transformers", _e) from None

import torch

from ..errors import GuardianError
from ..policies import Mode
from ..preemption import handling_signals
from ..state import data as data_pos
from ..state import rng as rng_mod
from ..worker_signals import LeaveSignalsToMain

log = logging.getLogger(__name__)

# The Trainer methods wrapped per instance for the duration of train() (module docstring).
_WRAPPED = ("_run_epoch", "_load_rng_state", "_maybe_log_save_evaluate")

# TrainerState fields that describe this run's configuration, not its progress: the
# re-run's own values stand.
_CONFIG_FIELDS = frozenset(
    {
        "max_steps",
        "num_train_epochs",
        "logging_steps",
        "eval_steps",
        "save_steps",
        "train_batch_size",
        "is_local_process_zero",
        "is_world_process_zero",
        "stateful_callbacks",
    }
)


class GuardianCallback(TrainerCallback):
    """Add to ``Trainer(callbacks=[...])``; see the module docstring.

    ``dir``: the run directory (one per run; re-running the script resumes from it).
    ``every_n_steps`` / ``every_n_epochs``: periodic checkpoints.
    ``monitor`` / ``mode`` / ``min_delta``: a metric ``evaluate()`` reports
    (``"eval_loss"``; ``"loss"`` finds ``eval_loss`` as HF's ``metric_for_best_model``
    does) defining the best checkpoint; ``best_checkpoint`` / ``best_score`` name it.
    ``keep_last`` / ``keep_best``: retention (the best and newest are never deleted).
    ``async_save``: persist in the background (the training stall is the copy only).
    """

    def __init__(
        self,
        dir: str | os.PathLike[str],
        *,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = 1,
        monitor: str | None = None,
        mode: Mode = "min",
        min_delta: float = 0.0,
        keep_last: int | None = 3,
        keep_best: int = 1,
        async_save: bool = True,
        strict: bool = True,
    ) -> None:
        self.dir = os.fspath(dir)
        self.every_n_epochs = every_n_epochs
        self.monitor = monitor
        self.options = protect_options(
            every_n_steps,
            monitor=monitor,
            mode=mode,
            min_delta=min_delta,
            keep_last=keep_last,
            keep_best=keep_best,
            async_save=async_save,
            strict=strict,
        )
        self.guard: Any = None
        self._open = False
        self._state: _TrainerProgress | None = None
        self._trainer: Any = None
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches already trained in it)
        self._checkpoint_rng: dict[str, Any] | None = None  # every RNG as the checkpoint holds it
        self._rng_pending = False  # the checkpoint's RNG is yet to be put back (after the skip)
        self._step_ended = False  # on_step_end ran; the step's log/evaluate has not finished
        self._step_metrics: dict[str, Any] = {}

    best_checkpoint = property(lambda self: self.guard.best_checkpoint if self.guard else None)
    best_score = property(lambda self: self.guard.best_score if self.guard else None)
    last_checkpoint = property(lambda self: self.guard.last_checkpoint if self.guard else None)

    # ------------------------------------------------------------------ lifecycle

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        import guardian

        if self._open:  # the previous train() of this process ended without on_train_end
            self._close(RuntimeError, RuntimeError("train() ended without on_train_end"))
        trainer = _find_trainer(self)
        self._warn_about_other_checkpointing(args)
        hf_step = state.global_step  # > 0 when train(resume_from_checkpoint=...) loaded HF's own
        self._state = _TrainerProgress(trainer)
        components: dict[str, Any] = {
            "model": trainer.model,
            "optimizer": _unwrap(trainer.optimizer, "optimizer"),
            "transformers": self._state,
        }
        if trainer.lr_scheduler is not None:
            components["scheduler"] = _unwrap(trainer.lr_scheduler, "scheduler")
        scaler = getattr(trainer.accelerator, "scaler", None)
        if scaler is not None:
            components["scaler"] = scaler
        self.guard = guardian.protect(components, dir=self.dir, **self.options)
        self.guard.__enter__()
        self._open = True
        self._trainer = trainer
        try:
            self._start(trainer, hf_step)
        except BaseException as e:
            self._close(type(e), e)
            raise

    def _start(self, trainer: Any, hf_step: int) -> None:
        config = getattr(trainer.model, "config", None)
        if config is not None and hasattr(config, "to_json_string"):
            self.guard.extra["hf_config"] = json.loads(config.to_json_string(use_diff=False))
        progress = self._state
        assert progress is not None
        if self.guard.resumed_from:
            if progress.global_step < hf_step:
                raise GuardianError(
                    f"guardian's newest checkpoint {self.guard.resumed_from} is at step {progress.global_step}, "
                    f"older than the resume_from_checkpoint given to train() (step {hf_step}); guardian "
                    "cannot rewind HF's loop. Drop resume_from_checkpoint (guardian resumes by itself) "
                    "or start a new guardian run directory."
                )
            if hf_step:
                log.warning(
                    "train(resume_from_checkpoint=...) was given, but guardian resumed from %s (verified, "
                    "step %d); HF's checkpoint is ignored and left as it is.",
                    self.guard.resumed_from,
                    progress.global_step,
                )
            self._checkpoint_rng = rng_mod.capture_global()  # as guardian restored it
            self._resume_at = (progress.epoch, progress.batches_in_epoch)
        else:
            self.guard.position.global_step = hf_step
            progress.global_step = hf_step
        self._wrap(trainer)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        progress = self._state
        assert progress is not None
        progress.batches_in_epoch += 1
        progress.global_step = state.global_step
        position = self.guard.position
        position.epoch, position.batch_in_epoch = progress.epoch, progress.batches_in_epoch
        self._step_ended = True  # the step's checkpoint comes once HF has logged and evaluated it

    def on_substep_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        assert self._state is not None
        self._state.batches_in_epoch += 1  # a micro-batch of a gradient accumulation

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self._rng_pending:  # a resumed epoch whose batches had all been trained
            self._put_back_checkpoint_rng()
        assert self._state is not None
        self._state.end_epoch()
        self.guard.position.epoch, self.guard.position.batch_in_epoch = self._state.epoch, 0

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kw: Any) -> None:
        if self.guard is None or not self.monitor or not metrics:
            return
        value = metrics.get(self.monitor, metrics.get(f"eval_{self.monitor}"))
        if value is None:
            return
        if self._step_ended:  # an evaluation at a step: reported after that step's g.step()
            self._step_metrics[self.monitor] = value
        else:
            self.guard.report(**{self.monitor: value})

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._close(None, None)

    def _close(self, exc_type: Any, exc: BaseException | None) -> None:
        if self._trainer is not None:
            for name in _WRAPPED:
                self._trainer.__dict__.pop(name, None)  # the class's own methods again
            self._trainer = None
        if self._open:
            self._open = False
            self.guard.__exit__(exc_type, exc, None)

    # ------------------------------------------------------------------ the epoch loop

    def _wrap(self, trainer: Any) -> None:
        """Install the per-instance wrappers of the Trainer methods in ``_WRAPPED``."""
        run_epoch, load_rng, log_save_evaluate = (getattr(trainer, n, None) for n in _WRAPPED)
        if (
            run_epoch is None
            or load_rng is None
            or log_save_evaluate is None
            or "epoch" not in inspect.signature(run_epoch).parameters
        ):
            raise GuardianError(
                f"transformers {transformers.__version__}: Trainer.{'/'.join(_WRAPPED)} are not all there; "
                "guardian's Trainer integration supports transformers 5.x. "
                "Use guardian.protect() around your own loop, or install a supported transformers."
            )
        signature = inspect.signature(run_epoch)

        def guarded_run_epoch(*a: Any, **kw: Any) -> Any:
            call = signature.bind(*a, **kw)
            try:
                return self._run_epoch(trainer, run_epoch, call.arguments)
            except BaseException as e:  # a preemption exit, a crash: close the guard (no save)
                self._close(type(e), e)
                raise

        def guarded_load_rng_state(checkpoint: Any) -> None:
            if self._rng_pending and checkpoint == self.guard.resumed_from:
                self._put_back_checkpoint_rng()
            else:
                load_rng(checkpoint)

        def log_save_evaluate_then_step(*a: Any, **kw: Any) -> Any:
            result = log_save_evaluate(*a, **kw)
            if self._step_ended:  # the optimizer step's exact point: logged, evaluated, whole
                self._step_ended = False
                self.guard.step()
                metrics, self._step_metrics = self._step_metrics, {}
                if metrics:
                    self.guard.report(**metrics)
            return result

        trainer._run_epoch = guarded_run_epoch
        trainer._load_rng_state = guarded_load_rng_state
        trainer._maybe_log_save_evaluate = log_save_evaluate_then_step

    def _run_epoch(self, trainer: Any, run_epoch: Any, call: dict[str, Any]) -> Any:
        epoch, loader = call["epoch"], call["train_dataloader"]
        progress = self._state
        assert progress is not None
        resume, state = self._resume_at, trainer.state
        if resume is not None and (epoch < resume[0] or state.global_step >= state.max_steps):
            if state.global_step >= state.max_steps:
                trainer.control.should_training_stop = True
            return None  # trained before the checkpoint
        if resume is not None:  # guardian resumed: its position replaces any HF resume arguments
            self._resume_at = None
            if resume[1] > 0:  # inside this epoch
                progress.restore_epoch_start(loader)
                self._rng_pending = True  # put back by _load_rng_state, after the skipped batches
                call.update(
                    resume_from_checkpoint=self.guard.resumed_from,
                    epochs_trained=epoch,
                    steps_trained_in_current_epoch=resume[1],
                )
            else:  # at this epoch's start
                call.update(resume_from_checkpoint=None)
                self._put_back_checkpoint_rng()
                progress.restore_generators(loader)
                progress.start_epoch(epoch, loader)
        else:
            hf_resumes_here = call.get("resume_from_checkpoint") is not None and epoch == call.get(
                "epochs_trained"
            )
            skipped = call["steps_trained_in_current_epoch"] if hf_resumes_here else 0
            progress.batches_in_epoch = 0 if trainer.args.ignore_data_skip else skipped
            progress.start_epoch(epoch, loader)
        if hasattr(loader, "set_epoch"):  # the shuffle of a resumed epoch is that epoch's
            loader.set_epoch(epoch)
        with _workers_leave_signals_to_main(loader):
            result = run_epoch(**call)
        if self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0:
            self.guard.save("epoch")  # the epoch ran to its end, evaluation included
        return result

    def _put_back_checkpoint_rng(self) -> None:
        self._rng_pending = False
        if self._checkpoint_rng is not None:
            rng_mod.restore_global(self._checkpoint_rng)

    # ------------------------------------------------------------------ other checkpointing

    def _warn_about_other_checkpointing(self, args: Any) -> None:
        strategy = getattr(
            getattr(args, "save_strategy", "no"), "value", getattr(args, "save_strategy", "no")
        )
        if strategy != "no":
            log.warning(
                "this Trainer also saves its own checkpoints (save_strategy=%r: pickled optimizer.pt, "
                "rng_state.pth… in %s). guardian resumes from its own checkpoints in %s and never touches "
                "those files; pass TrainingArguments(save_strategy='no') to stop the duplicate saves.",
                strategy,
                args.output_dir,
                self.dir,
            )


class _TrainerProgress:
    """The ``transformers`` component: HF's TrainerState, the running loss, the data position."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.epoch = 0  # the epoch being trained (the next one at an epoch boundary)
        self.batches_in_epoch = 0  # batches (micro-batches) of it already trained
        self.global_step = 0
        self.epoch_start: dict[str, Any] | None = None  # every data RNG as this epoch began

    def start_epoch(self, epoch: int, loader: Any) -> None:
        self.epoch = epoch
        gens = [g.get_state() for g in data_pos.loader_generators(loader)]
        self.epoch_start = {"torch": torch.get_rng_state(), "generators": gens}

    def end_epoch(self) -> None:
        self.epoch, self.batches_in_epoch, self.epoch_start = self.epoch + 1, 0, None

    def restore_epoch_start(self, loader: Any) -> None:
        """The RNGs as the resumed epoch began: its iterator draws the same order and seeds."""
        assert self.epoch_start is not None
        torch.set_rng_state(self.epoch_start["torch"])
        _set_generators(loader, self.epoch_start["generators"])

    def restore_generators(self, loader: Any) -> None:
        _set_generators(loader, self._boundary_generators or [])

    _boundary_generators: list[Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        trainer = self.trainer
        mid_epoch = self.batches_in_epoch > 0
        loader = trainer.callback_handler.train_dataloader
        return {
            "trainer_state": _trainer_state_json(trainer),
            "loss": {
                "tr_loss": trainer._tr_loss.detach().clone(),  # accumulated since the last log
                "total": trainer._total_loss_scalar,
                "last_logged_step": trainer._globalstep_last_logged,
                "flos": trainer.current_flos,
            },
            "data": {
                "epoch": self.epoch,
                "batches_in_epoch": self.batches_in_epoch,
                "epoch_start": self.epoch_start if mid_epoch else None,
                "generators": [g.get_state() for g in data_pos.loader_generators(loader)] if loader else [],
            },
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        trainer = self.trainer
        _load_trainer_state(trainer, saved["trainer_state"])
        loss = saved["loss"]
        with torch.no_grad():
            trainer._tr_loss.copy_(loss["tr_loss"])
        trainer._total_loss_scalar = float(loss["total"])
        trainer._globalstep_last_logged = int(loss["last_logged_step"])
        trainer.current_flos = float(loss["flos"])
        trainer._initial_num_input_tokens_seen = trainer.state.num_input_tokens_seen
        data = saved["data"]
        self.epoch, self.batches_in_epoch = int(data["epoch"]), int(data["batches_in_epoch"])
        self.global_step = trainer.state.global_step
        self.epoch_start = data["epoch_start"]
        self._boundary_generators = data["generators"]


def _trainer_state_json(trainer: Any) -> dict[str, Any]:
    """``TrainerState`` as HF's own trainer_state.json holds it, callbacks' state included."""
    state = dataclasses.asdict(trainer.state)
    stateful: dict[str, Any] = {}
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, ExportableState) and not isinstance(cb, TrainerControl):
            stateful.setdefault(type(cb).__name__, []).append(cb.state())
    state["stateful_callbacks"] = stateful
    return state


def _load_trainer_state(trainer: Any, saved: dict[str, Any]) -> None:
    """Progress fields into the live TrainerState (the loop holds that object); stateful
    callbacks get their saved attributes back in place."""
    state = trainer.state
    for f in dataclasses.fields(state):
        if f.name in saved and f.name not in _CONFIG_FIELDS:
            setattr(state, f.name, saved[f.name])
    for name, entries in (saved.get("stateful_callbacks") or {}).items():
        live = [cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == name]
        for cb, entry in zip(live, entries, strict=False):
            for attribute, value in (entry.get("attributes") or {}).items():
                setattr(cb, attribute, value)


def _set_generators(loader: Any, states: list[Any]) -> None:
    gens = data_pos.loader_generators(loader)
    if len(gens) == len(states):  # a lazily created generator (Accelerate's) re-seeds itself
        for g, s in zip(gens, states, strict=True):
            g.set_state(s)


def _unwrap(obj: Any, attr: str) -> Any:
    """Accelerate's AcceleratedOptimizer/AcceleratedScheduler hold the torch object."""
    inner = getattr(obj, attr, None)
    return inner if type(obj).__module__.startswith("accelerate") and inner is not None else obj


class _workers_leave_signals_to_main:
    """DataLoader workers started during the epoch leave preemption signals to the main
    process (a SIGTERM to the process group must not kill a worker mid-save)."""

    def __init__(self, loader: Any) -> None:
        has_workers = getattr(loader, "num_workers", 0) > 0
        self.loader = loader if handling_signals() and has_workers else None

    def __enter__(self) -> None:
        if self.loader is not None:
            self.original = self.loader.worker_init_fn
            self.loader.worker_init_fn = LeaveSignalsToMain(self.original)

    def __exit__(self, *exc: Any) -> None:
        if self.loader is not None:
            self.loader.worker_init_fn = self.original


def _find_trainer(callback: GuardianCallback) -> Any:
    """The ``transformers.Trainer`` whose ``on_train_begin`` is calling ``callback``."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, transformers.Trainer) and callback in candidate.callback_handler.callbacks:
            return candidate
        frame = frame.f_back
    raise GuardianError(
        "GuardianCallback must be called by a transformers.Trainer (pass it in Trainer(callbacks=[...]) "
        "or trainer.add_callback); it was called from elsewhere"
    )
