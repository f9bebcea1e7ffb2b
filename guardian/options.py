"""``guardian.protect()`` and its options, checked before anything starts.

Keyword arguments that are not options are the objects to protect
(``protect(model=m, optimizer=opt)``). That convenience must not swallow a typo: a
keyword whose value is not a training object (``every_step=5``, ``keep_lst=1``) is a
``TypeError`` that names the option it was probably meant to be.
"""

from __future__ import annotations

import difflib
import inspect
import os
from typing import Any

from . import adopt, knobs
from .config import GuardConfig, OnSaveError
from .guard import Guard
from .policies import BestMetric, EarlyStopping, Mode, Retention, SaveSchedule
from .state.discover import is_training_object
from .writer import SyncWriter, Writer


def protect(
    trainer: Any = None,
    *,
    dir: str | os.PathLike[str] | None = None,
    every_steps: int | None = None,
    every_seconds: float | None = None,
    every_epochs: int | None = 1,
    monitor: str | None = None,
    mode: Mode = "min",
    min_delta: float = 0.0,
    save_best: bool = True,
    keep_last: int | None = 3,
    keep_best: int = 1,
    keep_every: int | None = None,
    patience: int | None = None,
    restore_best: bool | None = None,
    resume: bool | str | os.PathLike[str] = True,
    strict: bool = True,
    save_on_exit: bool = True,
    on_save_error: OnSaveError = "raise",
    handle_signals: bool = True,
    writer: Writer | None = None,
    async_save: bool = True,
    overlap: bool | None = None,
    tensorboard: bool = False,
    watch: bool | None = None,
    replicate_to: str | os.PathLike[str] | None = None,
    incremental: bool | int = False,
    **components: Any,
) -> Guard:
    """Wrap a training loop (see ``guardian.guard`` for the loop API and its rules).

    ``dir``: the run directory; defaults to ``$GUARDIAN_RUN_DIR`` (set by ``guardian run``).
    ``trainer``: an object whose attributes hold the model(s), optimizer(s),
    scheduler(s), GradScaler and any object with ``state_dict``/``load_state_dict``;
    or a dict of them; extra ones may be passed as keywords.
    ``every_steps`` / ``every_seconds`` / ``every_epochs``: periodic saves (combinable);
    step saves fall on multiples of ``every_steps``.
    ``monitor``/``mode``/``min_delta``: the metric (given to ``g.report``) that defines
    the best checkpoint; ``save_best`` saves whenever it improves.
    ``keep_last`` / ``keep_best`` / ``keep_every``: retention; the newest, the best and
    the resumed-from checkpoints are never deleted.
    ``patience``: early stopping after that many consecutive epochs without
    improvement of ``monitor`` (by more than ``min_delta``).
    ``restore_best``: load the best checkpoint's weights into the model when the block
    ends — None (default): only when early stopping fired; True: always (when a best
    checkpoint exists); False: never.
    ``resume``: True (newest checkpoint that can be restored), False (start fresh:
    existing checkpoints are set aside, never deleted), or a checkpoint path/name.
    ``on_save_error``: "raise" (default) stops training when a save fails (disk
    full…); "warn" logs an error and tries again at the next save point.
    ``async_save``: True (default) copies the state to a staging buffer at each save and
    persists it in the background; False, or GUARDIAN_ASYNC=0, saves synchronously.
    ``overlap``: True lets an asynchronous save copy parameters and optimizer state
    while the next forward/backward runs (the next ``optimizer.step()`` waits for it;
    docs/performance.md, "Overlap"); False copies the whole state before the save
    returns; None (default) follows GUARDIAN_OVERLAP=1 (off unless set). ``writer`` overrides all three.
    ``tensorboard``: also write the metric history as TensorBoard event files in
    ``RUN/tensorboard`` (needs ``pip install 'torch-guardian[tensorboard]'``); the history
    itself, ``RUN/history.csv``, is always kept (docs/history.md).
    ``watch``: register this run with the user's ``guardian watch`` daemon, which restarts
    it if it dies (docs/daemon.md); None (default) follows ``GUARDIAN_WATCH=1``.
    ``replicate_to``: a remote prefix (``s3://bucket/prefix/run``, any fsspec URL, or a
    path on a shared file system); defaults to ``$GUARDIAN_REPLICATE_TO``. Each committed
    checkpoint is uploaded in the background, and a run directory with nothing to
    resume from resumes from there (docs/remote.md). Checked writable here.
    ``incremental``: tensors unchanged since the previous save (a frozen backbone) are
    not written again: the new checkpoint hard-links the previous one's file of them
    (docs/format.md). An int N also rewrites that file every N saves, so one damaged
    file reaches at most N checkpoints. Single-process runs only.
    """
    _refuse_unknown_options(components)
    dir = dir if dir is not None else knobs.run_dir()
    if dir is None:
        raise ValueError(
            "protect() needs dir= (the run's checkpoint directory), or GUARDIAN_RUN_DIR "
            "in the environment as `guardian run --dir` sets it"
        )
    if on_save_error not in ("raise", "warn"):
        raise ValueError(f"on_save_error must be 'raise' or 'warn', got {on_save_error!r}")
    best = BestMetric(monitor, mode, min_delta) if monitor else None
    if patience is not None and best is None:
        raise ValueError("early stopping (patience=) needs monitor= to know what to watch")
    if restore_best and best is None:
        raise ValueError("restore_best=True needs monitor= to know which checkpoint is the best")
    if not isinstance(incremental, bool) and (not isinstance(incremental, int) or incremental < 1):
        raise ValueError(f"incremental must be True, False or a number of saves ≥ 1, got {incremental!r}")
    replicate_to = replicate_to if replicate_to is not None else os.environ.get("GUARDIAN_REPLICATE_TO")
    if replicate_to:
        from .remote import check_target

        check_target(os.fspath(replicate_to))
    config = GuardConfig(
        run_dir=os.fspath(dir),
        schedule=SaveSchedule(every_steps, every_seconds, every_epochs),
        best=best,
        save_best=save_best,
        retention=Retention(keep_last, keep_best, keep_every),
        early=EarlyStopping(patience, min_delta) if patience is not None else None,
        restore_best=restore_best,
        resume=resume,
        strict=strict,
        save_on_exit=save_on_exit,
        on_save_error=on_save_error,
        handle_signals=handle_signals,
        tensorboard=tensorboard,
        replicate_to=os.fspath(replicate_to) if replicate_to else None,
        incremental=incremental,
    )
    adopt.register_if_asked(config.run_dir, watch)  # the daemon restarts this script if it dies
    return Guard(trainer, components, config, writer or _default_writer(async_save, overlap))


def _default_writer(async_save: bool, overlap: bool | None) -> Writer:
    if async_save and knobs.async_save():
        from .async_writer import AsyncWriter

        return AsyncWriter(overlap=knobs.overlap() if overlap is None else overlap)
    return SyncWriter()


OPTIONS = [n for n in inspect.signature(protect).parameters if n not in ("trainer", "components")]


def _refuse_unknown_options(components: dict[str, Any]) -> None:
    for name, value in components.items():
        if value is None or is_training_object(value):  # None: an optional piece left out
            continue
        close = difflib.get_close_matches(name, OPTIONS, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}=?" if close else ""
        raise TypeError(
            f"protect() got an unexpected keyword argument {name!r}{hint} "
            f"(a keyword that is not an option must be a training object to protect, like "
            f"model=… or optimizer=…; {type(value).__name__} is not one)"
        )
