"""One save persisting on a background thread at a time, its outcome delivered on the
training thread — the part the single-process writer (async_writer) and the ranks'
writer (dist_async) share.

Why the outcome waits for the training thread: the commit callback touches the
guard's state (``last_checkpoint``, retention) and a failure must be raised where the
user's loop can see it, so the background thread only *records* what happened and
``_reap`` — called from ``check``/``collect``/``wait`` on the training thread —
delivers it: the callback first (a commit that happened is never forgotten), then the
error. Only an I/O failure (``OSError``) is a ``CheckpointWriteError``, which
``on_save_error="warn"`` may turn into a log line; anything else — a ``TypeError``,
``KeyboardInterrupt`` — is a bug or a request to stop and is raised as itself.

The thread is non-daemon: an interpreter that exits without the guard still finishes
the in-flight commit first (only SIGKILL/``os._exit`` cut it short, and then the commit
protocol leaves no partial checkpoint). So it must never wait for something that
cannot come: a save whose staging (the copy on the training thread) was cut short —
by an exception raised anywhere in ``submit``, even inside its own clean-up — is
failed by the next ``wait``, which only the submitting thread calls; the persist
thread then aborts its transaction and nothing is committed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from .errors import CheckpointWriteError, GuardianError
from .format.manifest import Manifest
from .staging import StagedImage, StagingAborted
from .writer import Committed, WriterMode

log = logging.getLogger(__name__)


class BackgroundSave:
    """Base of the asynchronous writers; subclasses start work with ``_start`` and
    report it with ``_succeeded``/``_failed`` from the background thread."""

    mode: WriterMode  # set by each subclass; declared here so the writers satisfy writer.Writer

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._done: list[tuple[Committed, str, Manifest]] = []
        self._error: BaseException | None = None
        self._staging: StagedImage | None = None  # the image the training thread is filling

    @property
    def busy(self) -> bool:
        """True while a save is being persisted."""
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Block until the in-flight save is durable (or failed), then report it.
        A save abandoned while being staged is failed first (module docstring), so
        this always returns; it reports nothing for that save: the exception that
        abandoned it has already been raised."""
        if self._thread is None:
            return
        if self._staging is not None and not self._staging.complete:
            self._abandon_staging(RuntimeError("the save was abandoned while it was being staged"))
            return
        self._thread.join()
        self._reap()

    # ------------------------------------------------------------------ for subclasses

    def _start(
        self,
        target: Callable[..., None],
        args: tuple[Any, ...],
        name: str,
        staging: StagedImage | None = None,
    ) -> None:
        """Start the persist thread. ``staging``: the image the caller fills after this
        returns; whatever ends that filling early must call ``_abandon_staging``."""
        self._staging = staging
        thread = threading.Thread(target=target, args=args, name=name, daemon=False)
        self._thread = thread  # before start(): an exception raised inside start() leaves it known
        thread.start()

    def _finished(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def _succeeded(self, on_committed: Committed, path: str, manifest: Manifest) -> None:
        self._done.append((on_committed, path, manifest))

    def _failed(self, error: BaseException) -> None:
        self._error = error

    def _abandon_staging(self, error: BaseException) -> None:
        """The image will never be complete: make the persist thread give up (it
        aborts its transaction, so nothing is committed), join it and forget it."""
        staging = self._staging
        if staging is not None and not staging.complete:
            staging.fail(error)
            log.warning("the checkpoint being staged was abandoned (%s); it is not saved", error)
        if self._thread is not None:
            self._thread.join()
        self._thread, self._error, self._done, self._staging = None, None, [], None

    def _wait_quietly(self) -> None:
        """For ``close``: the guard has already called ``wait`` on every path that can
        still report an error, so one left over is logged, not raised."""
        try:
            self.wait()
        except GuardianError as e:
            log.error("the last checkpoint failed in the background: %s", e)

    def _who(self) -> str:
        """Prefix for error messages (the rank, where there are several)."""
        return ""

    def _reap(self) -> None:
        self._thread, self._staging = None, None
        done, self._done = self._done, []
        for on_committed, path, manifest in done:
            on_committed(path, manifest)
        error, self._error = self._error, None
        if error is None:
            return
        if isinstance(error, StagingAborted):  # its cause was raised on this thread already
            log.warning("the checkpoint being staged was abandoned (%s); it is not saved", error)
            return
        if isinstance(error, GuardianError):
            raise error
        if isinstance(error, OSError):
            raise CheckpointWriteError(
                f"{self._who()}the background save failed: {type(error).__name__}: {error}. "
                "Earlier checkpoints are untouched.",
                error.errno,
            ) from error
        raise error  # a bug or an interrupt: never disguised as a write error
