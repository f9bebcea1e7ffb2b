"""Asynchronous checkpointing: the loop waits for a memcpy, not for the disk.

``AsyncWriter.submit`` does only what must happen while the state is frozen: it
lays out the tensor file (safetensors header + data) and copies every tensor into
its slot of the staging arena (guardian/staging.py), then returns. A background
thread hashes and writes that image with large O_DIRECT writes
(guardian/direct_io.py), writes state.json, and commits through ``CheckpointTxn``
— the same protocol, and the same bytes, as ``SyncWriter``.

Policies (the contract the guard relies on):
  * Back-pressure: **block**. There is one staging arena, so a ``submit`` that
    arrives while the previous save is still being persisted waits for it to become
    durable before copying. Memory stays bounded at one state's worth; a save is
    never skipped or dropped silently. (If saves are that frequent, the log shows
    the stall; save less often.)
  * Failures are never lost: an exception in the background is stored and raised —
    as ``CheckpointWriteError`` — by the next ``check`` (every ``g.step()``),
    ``submit`` or ``wait``; ``close`` logs one that nobody collected.
  * ``on_committed`` (retention, ``last_checkpoint``) runs on the *caller's* thread,
    at the first ``check``/``submit``/``wait`` after the commit, so the guard's state
    is only ever touched by the training thread. Retention may therefore lag the
    commit by one step; it never runs before the checkpoint is durable.
  * Exit: the guard calls ``wait`` on normal exit, on exceptions and on preemption;
    and the persist thread is non-daemon, so even an interpreter that exits without
    the guard finishes the in-flight commit first (only SIGKILL/``os._exit`` cut it
    short — and then the commit protocol leaves no partial checkpoint).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

import numpy as np
import torch

from .commit import CheckpointTxn, check_free_space
from .direct_io import image_writer
from .errors import CheckpointWriteError, GuardianError
from .format.layout import STATE_FILE, TENSORS_FILE, checkpoint_name, parse_checkpoint_name, rank_prefix
from .format.manifest import Manifest
from .staging import StagingArena
from .state.snapshot import Snapshot
from .writer import SPACE_MARGIN, SPACE_SLACK, Committed

log = logging.getLogger("guardian")


@dataclass
class _Staged:
    """What the persist thread needs: no reference to a live tensor."""

    image: memoryview  # the complete tensors.safetensors file, in the arena
    state_json: bytes


class AsyncWriter:
    """Same interface as ``SyncWriter``; see the module docstring for the policies."""

    mode = "async"

    def __init__(self, *, direct_io: bool | None = None) -> None:
        self._arena = StagingArena()
        self._direct = direct_io
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._done: list[tuple[Committed, str, Manifest]] = []

    # ------------------------------------------------------------------ interface

    def submit(self, run_dir: str, snap: Snapshot, manifest: Manifest, on_committed: Committed) -> None:
        """Stage ``snap`` and persist it in the background; returns once the live
        tensors may change again. Returns None: the path is known only at commit."""
        self.wait()  # back-pressure (block) + report the previous save's outcome
        _settle_name(run_dir, manifest)
        check_free_space(run_dir, int(snap.tensor_bytes * SPACE_MARGIN) + SPACE_SLACK)
        staged = self._stage(snap)
        self._thread = threading.Thread(
            target=self._persist,
            args=(run_dir, staged, manifest, on_committed),
            name=f"guardian-persist-{manifest.name}",
            daemon=False,
        )
        self._thread.start()

    def check(self) -> None:
        """Cheap; called every step. Reports a finished save (callback or error)."""
        if self._thread is not None and not self._thread.is_alive():
            self._reap()

    def wait(self) -> None:
        """Block until the in-flight save is durable (or failed), then report it."""
        if self._thread is not None:
            self._thread.join()
            self._reap()

    @property
    def busy(self) -> bool:
        """True while a save is being persisted."""
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        """Finish the in-flight save and free the arena; never raises (the guard has
        already called ``wait`` on every path that can still report an error)."""
        try:
            self.wait()
        except GuardianError as e:
            log.error("guardian: the last checkpoint failed in the background: %s", e)
        self._arena.release()

    # ------------------------------------------------------------------ internals

    def _stage(self, snap: Snapshot) -> _Staged:
        """The blocking part: copy the file image into the arena."""
        layout = snap.layout()
        pinned = any(t.device.type == "cuda" for t in snap.tensors.values()) and torch.cuda.is_available()
        buf = self._arena.acquire(layout.total_bytes, pinned=pinned)
        image = memoryview(buf.numpy()).cast("B") if layout.total_bytes else memoryview(b"")
        image[: layout.data_start] = layout.header
        base = layout.data_start
        for entry in layout.entries:
            if entry.nbytes:
                src = _byte_view(snap.tensors[entry.key], pinned)
                _copy_into(buf, image, base + entry.begin, base + entry.end, src, pinned)
        if pinned:
            torch.cuda.synchronize()  # one wait for every queued device→host copy
        return _Staged(image=image, state_json=snap.state_json())

    def _persist(self, run_dir: str, staged: _Staged, manifest: Manifest, on_committed: Committed) -> None:
        """Runs in the background thread; stores its outcome for ``_reap``."""
        try:
            prefix = rank_prefix(0, manifest.world_size)
            with CheckpointTxn(run_dir, manifest.name) as txn:
                rel = prefix + TENSORS_FILE
                writer = image_writer(f"{txn.tmp_dir}/{rel}", direct=self._direct)
                txn.add_file(rel, [staged.image], writer=writer)
                txn.add_file(prefix + STATE_FILE, [staged.state_json])
                path = txn.commit(manifest)
            self._done.append((on_committed, path, manifest))
        except BaseException as e:  # stored, re-raised on the training thread
            self._error = e

    def _reap(self) -> None:
        """On the caller's thread: deliver the commit callback or raise the failure."""
        self._thread = None
        done, self._done = self._done, []
        for on_committed, path, manifest in done:
            on_committed(path, manifest)
        error, self._error = self._error, None
        if error is None:
            return
        if isinstance(error, CheckpointWriteError):
            raise error
        raise CheckpointWriteError(
            f"the background save failed: {type(error).__name__}: {error}. Earlier checkpoints are untouched."
        ) from error


def _copy_into(
    buf: torch.Tensor, image: memoryview, begin: int, end: int, src: torch.Tensor, pinned: bool
) -> None:
    """Copy one tensor's bytes into its slot. Device tensors: an async ``copy_`` into
    pinned memory. Host tensors: numpy's memcpy, because torch's ``copy_`` between
    uint8 slices measured ~3 GB/s here against ~9 GB/s for a plain memcpy."""
    if src.device.type != "cpu":
        buf[begin:end].copy_(src, non_blocking=pinned)
        return
    np.copyto(np.frombuffer(image[begin:end], dtype=np.uint8), src.numpy())


def _settle_name(run_dir: str, manifest: Manifest) -> None:
    """Give a second save at the same step its ``-N`` name. The guard picks names by
    looking at the run directory, which cannot yet show a save still in flight; now
    that the previous save is durable, the directory is the truth again."""
    parsed = parse_checkpoint_name(manifest.name)
    if parsed is None:
        return
    step, dup = parsed
    while os.path.lexists(os.path.join(run_dir, manifest.name)):
        dup += 1
        manifest.name = checkpoint_name(step, dup)


def _byte_view(t: torch.Tensor, pinned: bool) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor on its own device (a view when the
    tensor is contiguous, which state-dict tensors almost always are)."""
    t = t.detach()
    if t.device.type not in ("cpu", "cuda") or (t.device.type == "cuda" and not pinned):
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    return t.reshape(-1).view(torch.uint8)
