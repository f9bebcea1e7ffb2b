"""guardian for PyTorch Lightning: one callback, exact resume, no pickle.

    from guardian.integrations.lightning import GuardianCallback

    trainer = L.Trainer(max_epochs=5, enable_checkpointing=False,
                        callbacks=[GuardianCallback("runs/exp1", every_n_train_steps=100)])
    trainer.fit(model, datamodule=dm)        # re-run the same script: it resumes by itself

What it saves, through guardian's commit protocol (verified, fsynced, retained): the
LightningModule's weights, every optimizer (keyed by parameter name) and LR
scheduler, the fit loop's progress (``fit_loop.state_dict()``), every callback's
``state_dict``, the module's hyper-parameters and what its ``on_save_checkpoint``
adds (all as JSON — a value that cannot be is refused with an error naming its key),
every RNG, and the training data position.

**Where checkpoints are taken**: at ``on_train_batch_end`` (after the optimizer and
the step-interval schedulers stepped: the state is whole) every
``every_n_train_steps`` optimizer steps and on a preemption signal (SIGTERM, SIGUSR1,
SIGUSR2, SIGINT set a flag; the save happens at the next batch end, then the process
exits 75); at ``on_train_epoch_end`` every ``every_n_epochs``; when ``monitor``
improves at ``on_validation_end``; and once at the end of ``fit``.

**Resume** happens in ``on_fit_start`` of the re-run, with no ``ckpt_path``: the
newest checkpoint that verifies and fits the model is loaded, and Lightning's loops
continue from the saved progress. A run stopped inside an epoch continues with the
very next batch: the epoch's shuffled order is regenerated from the RNG state at
its start and the batches already trained are skipped at the sampler (never loaded),
so the result is bit-for-bit the uninterrupted run's. Limits of that exactness: a
step checkpoint followed by an in-epoch validation (``val_check_interval`` < 1
epoch) resumes after that validation; ``reload_dataloaders_every_n_epochs`` and
iterable datasets are resumed at the right batch but not bit-exact.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from . import missing, protect_options

if TYPE_CHECKING:  # the types of the `lightning` package; the older name has the same classes
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
else:
    try:
        from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    except ImportError as _e:  # pragma: no cover - exercised in a subprocess without Lightning
        try:
            from pytorch_lightning.callbacks import Callback, ModelCheckpoint
        except ImportError:
            raise missing("Lightning", "lightning", "lightning", _e) from None

import torch

from ..errors import UnsupportedStateError
from ..policies import Mode
from ..state import data as data_pos
from ..state import rng as rng_mod

log = logging.getLogger(__name__)


class GuardianCallback(Callback):
    """Add to ``Trainer(callbacks=[...])``; see the module docstring.

    ``dir``: the run directory (one per run; re-running the script resumes from it).
    ``every_n_train_steps`` / ``every_n_epochs``: periodic checkpoints.
    ``monitor`` / ``mode`` / ``min_delta``: a metric Lightning logs (``self.log``)
    defining the best checkpoint; ``best_model_path`` / ``best_model_score`` name it.
    ``keep_last`` / ``keep_best``: retention (the best and newest are never deleted).
    ``async_save``: persist in the background (the training stall is the copy only).
    """

    def __init__(
        self,
        dir: str | os.PathLike[str],
        *,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = 1,
        monitor: str | None = None,
        mode: Mode = "min",
        min_delta: float = 0.0,
        keep_last: int | None = 3,
        keep_best: int = 1,
        async_save: bool = True,
        strict: bool = True,
    ) -> None:
        super().__init__()
        self.dir = os.fspath(dir)
        self.every_n_epochs = every_n_epochs
        self.options = protect_options(
            every_n_train_steps,
            monitor=monitor,
            mode=mode,
            min_delta=min_delta,
            keep_last=keep_last,
            keep_best=keep_best,
            async_save=async_save,
            strict=strict,
        )
        self.monitor = monitor
        self.guard: Any = None
        self._open = False
        self._state: _LightningState | None = None

    # ------------------------------------------------------------------ Lightning's names

    @property
    def best_model_path(self) -> str:
        """The best checkpoint so far ("" before there is one), as ModelCheckpoint says it."""
        return (self.guard.best_checkpoint if self.guard else None) or ""

    @property
    def best_model_score(self) -> torch.Tensor | None:
        best = self.guard.best_score if self.guard else None
        return None if best is None else torch.tensor(best)

    @property
    def last_model_path(self) -> str:
        return (self.guard.last_checkpoint if self.guard else None) or ""

    # ------------------------------------------------------------------ lifecycle

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        import guardian

        self._warn_about_other_checkpointing(trainer)
        self._state = _LightningState(trainer, pl_module)
        self._state.state_dict()  # refuse what cannot be stored now, not at the first save
        components: dict[str, Any] = {"model": pl_module, "lightning": self._state}
        for i, opt in enumerate(trainer.optimizers):
            components[f"optimizer.{i}" if len(trainer.optimizers) > 1 else "optimizer"] = opt
        for i, config in enumerate(trainer.lr_scheduler_configs):
            components[f"scheduler.{i}"] = config.scheduler
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            components["scaler"] = scaler
        self.guard = guardian.protect(components, dir=self.dir, **self.options)
        self.guard.__enter__()
        self._open = True
        if self.guard.resumed_from:
            self._state.checkpoint_rng = rng_mod.capture_global()  # as guardian restored it
            self._drop_lightnings_own_restore(trainer)
        else:
            self._state.epoch_start = self._state.capture_epoch_start()
        self._state.iterator_from_setup = True

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # Lightning installs its signal handlers after on_fit_start: put guardian's back
        # on top, so a SIGTERM is a checkpoint at the next batch end (then exit 75).
        if self.guard.preemption is not None:
            self.guard.preemption.reinstall()
        if self._state is not None and self._state.pending is not None:
            self._state.reposition_iterator()

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        assert self._state is not None
        if self._state.iterator_from_setup:  # this epoch's iterator was made in setup_data
            self._state.iterator_from_setup = False
        else:  # Lightning makes the iterator right after this hook
            self._state.epoch_start = self._state.capture_epoch_start()

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        assert self._state is not None
        self._state.iterator_from_setup = False
        self._state.mid_epoch = True
        self.guard.position.epoch = trainer.current_epoch
        self.guard.step()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        assert self._state is not None
        self._state.mid_epoch = False
        # The epoch number stays the one that just ended: a best checkpoint taken at this
        # epoch's validation is then the same moment, and the epoch save merges into it
        # instead of superseding (and deleting) it.
        self.guard.position.epoch = trainer.current_epoch
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.guard.save("epoch")

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self.guard is None or trainer.sanity_checking or not self.monitor:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None:
            self.guard.report(**{self.monitor: value})

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._close(None, None)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close(type(exception), exception)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._open:  # an exit no other hook reported
            self._close(RuntimeError, RuntimeError("Lightning tore down without on_fit_end"))

    def _close(self, exc_type: Any, exc: BaseException | None) -> None:
        if self._open:
            self._open = False
            self.guard.__exit__(exc_type, exc, None)

    # ------------------------------------------------------------------ other checkpointing

    def _warn_about_other_checkpointing(self, trainer: Any) -> None:
        others = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
        if others:
            where = ", ".join(str(cb.dirpath or trainer.default_root_dir) for cb in others)
            log.warning(
                "this Trainer also has Lightning's ModelCheckpoint (writing pickled .ckpt files to %s). "
                "guardian resumes from its own checkpoints in %s and never touches those files; "
                "pass Trainer(enable_checkpointing=False) to stop the duplicate saves.",
                where,
                self.dir,
            )

    def _drop_lightnings_own_restore(self, trainer: Any) -> None:
        """A ``ckpt_path`` given to ``fit`` as well: guardian's newer, verified state wins.
        Lightning restored the weights before on_fit_start and would restore its
        optimizers and loops right after it: both are superseded by guardian's load."""
        connector = trainer._checkpoint_connector
        if getattr(connector, "_loaded_checkpoint", None):
            log.warning(
                "fit(ckpt_path=%s) was given, but guardian resumed from %s (verified, newer); "
                "Lightning's checkpoint is ignored and left as it is.",
                trainer.ckpt_path,
                self.guard.resumed_from,
            )
            connector._loaded_checkpoint = {}


class _LightningState:
    """The ``lightning`` component: Lightning's own state plus the data position."""

    def __init__(self, trainer: Any, module: Any) -> None:
        self.trainer = trainer
        self.module = module
        self.epoch_start: dict[str, Any] | None = None
        self.mid_epoch = False
        self.iterator_from_setup = False
        self.pending: dict[str, Any] | None = None  # a mid-epoch position to resume into
        self.checkpoint_rng: dict[str, Any] | None = None  # every RNG as the checkpoint holds it

    def state_dict(self) -> dict[str, Any]:
        from lightning.pytorch.trainer import call

        extra: dict[str, Any] = {}
        self.module.on_save_checkpoint(extra)
        state = {
            "fit_loop": self.trainer.fit_loop.state_dict(),
            "callbacks": call._call_callbacks_state_dict(self.trainer),
            "hyper_parameters": dict(getattr(self.module, "hparams", {}) or {}),
            "module_checkpoint": extra,
            "data": {"epoch_start": self.epoch_start if self.mid_epoch else None},
        }
        _refuse_what_json_cannot_hold(state)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from lightning.pytorch.trainer import call

        self.trainer.fit_loop.load_state_dict(state["fit_loop"])
        call._call_callbacks_load_state_dict(self.trainer, {"callbacks": state["callbacks"]})
        self.module.on_load_checkpoint(dict(state["module_checkpoint"]))
        self.pending = state["data"] if state["data"]["epoch_start"] is not None else None

    # ------------------------------------------------------------------ data position

    def _loaders(self) -> list[Any]:
        combined = self.trainer.fit_loop._combined_loader
        return list(combined.flattened) if combined is not None else []

    def capture_epoch_start(self) -> dict[str, Any]:
        gens = [g.get_state() for dl in self._loaders() for g in data_pos.loader_generators(dl)]
        return {"torch": torch.get_rng_state(), "generators": gens}

    def reposition_iterator(self) -> None:
        """Re-create the resumed epoch's iterator as it was at the epoch start, skipping
        the batches already trained at the sampler, then put every RNG back to its
        value at the checkpoint. Called once the fit loop has set up its data."""
        pending, self.pending = self.pending, None
        assert pending is not None
        fetcher = self.trainer.fit_loop._data_fetcher
        skip = self.trainer.fit_loop.epoch_loop.batch_progress.current.ready
        checkpoint_rng = self.checkpoint_rng
        assert checkpoint_rng is not None
        self.epoch_start = pending["epoch_start"]
        torch.set_rng_state(self.epoch_start["torch"])
        saved_gens = iter(self.epoch_start["generators"])
        swapped: list[tuple[Any, str, Any]] = []  # (loader, attribute, its own sampler)
        for dl in self._loaders():
            for g in data_pos.loader_generators(dl):
                g.set_state(next(saved_gens))
            attr = "batch_sampler" if getattr(dl, "batch_sampler", None) is not None else "sampler"
            original = getattr(dl, attr)
            on_skipped = (lambda: rng_mod.restore_global(checkpoint_rng)) if not swapped else (lambda: None)
            object.__setattr__(dl, attr, data_pos.SkipFirstBatches(original, skip, on_skipped))
            swapped.append((dl, attr, original))
        try:
            iter(fetcher)
        finally:
            for dl, attr, original in swapped:
                object.__setattr__(dl, attr, original)
        fetcher.fetched = 0  # Lightning adds the batches already trained when the epoch loop starts
        rng_mod.restore_global(checkpoint_rng)
        self.mid_epoch = True


def _refuse_what_json_cannot_hold(state: dict[str, Any]) -> None:
    """Name the key of a value that would need pickle, with Lightning's wording."""
    from ..format.tree import Encoder
    from ..state import dtensor

    encoder = Encoder(
        lambda v: isinstance(v, torch.Tensor), lambda parts, t: "/".join(parts), dtensor.encode_ext
    )
    try:
        encoder.encode(state, (), "lightning")
    except UnsupportedStateError as e:
        raise UnsupportedStateError(
            f"{e} — Lightning state (hyper-parameters, callback or on_save_checkpoint values) is stored as "
            "JSON by guardian, never pickled; convert that value to plain numbers/strings/lists/dicts "
            "(e.g. OmegaConf.to_container(cfg)) or leave it out of save_hyperparameters().",
            key_path=e.key_path,
        ) from None
