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
    the thread itself and the delivery of outcomes are ``background.BackgroundSave``.
  * Overlap (guardian/overlap.py, opt-in: ``overlap=True`` or GUARDIAN_OVERLAP=1): parameters and optimizer state are
    copied on a background thread while the next forward/backward runs; ``submit``
    copies only the rest, and the next ``optimizer.step()`` waits for the copy. Saves
    taken on the way out ("preempt", "final"), CUDA states, and every save after a
    change outside ``optimizer.step()`` was detected copy before returning.
  * Abandoned staging: an exception anywhere in ``submit`` once the persist thread
    exists — even one a signal handler raises inside ``Thread.start`` or inside the
    clean-up — fails the image (now, or at the next ``wait``), so the persist thread
    never waits for bytes that will not come and the process can always exit.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from . import knobs
from .background import BackgroundSave
from .commit import CheckpointTxn, check_free_space
from .direct_io import image_writer
from .format.layout import STATE_FILE, TENSORS_FILE, checkpoint_name, parse_checkpoint_name, rank_prefix
from .format.manifest import Manifest
from .overlap import WINDOW, BackgroundCopy, CommitGate, Segment
from .staging import (
    SMALL_COPY,
    StagedImage,
    StagingArena,
    byte_view,
    copy_into_arena,
    copy_small_run,
    needs_pinned,
    wait_for_device_copies,
)
from .state.snapshot import Snapshot
from .threads import lower_thread_priority
from .writer import SPACE_MARGIN, SPACE_SLACK, Committed

log = logging.getLogger(__name__)

COPY_BATCH = 64 * 1024 * 1024  # staged bytes between two wake-ups of the writer
PARALLEL_COPY_MIN = 8 * 1024 * 1024  # smaller batches: one thread (thread hand-off costs more)
COPY_THREADS = min(2, os.cpu_count() or 1)


@dataclass
class _Staged:
    """What the persist thread needs: no reference to a live tensor."""

    image: StagedImage  # the tensors.safetensors file, in the arena (being filled)
    state_json: bytes
    gate: CommitGate  # approved at once, or once an overlapped copy is verified
    overlapped: bool = False  # the copy runs beside the training loop, not in submit


class AsyncWriter(BackgroundSave):
    """Same interface as ``SyncWriter``; see the module docstring for the policies."""

    mode = "async"

    def __init__(self, *, direct_io: bool | None = None, overlap: bool | None = None) -> None:
        super().__init__()
        self._arena = StagingArena()
        self._direct = direct_io
        self._copier: ThreadPoolExecutor | None = None  # second memcpy stream while staging
        self.overlap = knobs.overlap() if overlap is None else overlap
        self._copy: BackgroundCopy | None = None  # the overlapped copy in flight
        if self.overlap:
            WINDOW.attach()

    # ------------------------------------------------------------------ interface

    def submit(self, run_dir: str, snap: Snapshot, manifest: Manifest, on_committed: Committed) -> None:
        """Stage ``snap`` and persist it in the background; returns once the live
        tensors may change again. Returns None: the path is known only at commit.

        The persist thread starts *before* the copy and writes the staged prefix of
        the image while later tensors are still being copied (``StagedImage``)."""
        self.wait()  # back-pressure (block) + report the previous save's outcome
        _settle_name(run_dir, manifest)
        check_free_space(run_dir, int(snap.tensor_bytes * SPACE_MARGIN) + SPACE_SLACK)
        layout = snap.layout()
        pinned = needs_pinned(snap.tensors.values())
        buf = self._arena.acquire(layout.total_bytes, pinned=pinned)
        image = memoryview(buf.numpy()).cast("B") if layout.total_bytes else memoryview(b"")
        staged = StagedImage(image)
        deferred = self._deferrable(snap, manifest, pinned)
        job = _Staged(
            image=staged, state_json=snap.state_json(), gate=CommitGate(), overlapped=bool(deferred)
        )
        try:  # from the thread's start on: an exception anywhere here must fail the image
            self._start(
                self._persist,
                (run_dir, job, manifest, on_committed),
                f"guardian-persist-{manifest.name}",
                staged,
            )
            if deferred:
                self._stage_overlapped(snap, layout, staged, job.gate, deferred)
            else:
                self._stage(snap, layout, buf, staged, pinned)
                job.gate.approve()
        except BaseException as e:
            self._abandon_staging(e)  # the persist thread gives up and aborts its transaction
            raise

    def reserve(self, snap: Snapshot) -> None:
        """Prepare the arena for saves of ``snap``'s size in the background (see
        ``StagingArena.reserve``); the guard calls it at the first step, once the
        optimizer state exists, so the first save's stall is only its copy."""
        if not self.busy:
            self._arena.reserve(snap.layout().total_bytes, pinned=needs_pinned(snap.tensors.values()))

    def check(self) -> None:
        """Cheap; called every step. Reports a finished save (callback or error)."""
        if self._copy is not None and self._copy.copied:
            error = self._settle_overlap()
            if error is not None:  # a bug in the copy: never only a log line
                super().wait()
                raise error
        if self._finished():
            self._reap()

    def wait(self) -> None:
        """Close the overlap window (wait for the copy, verify it), then wait for the
        commit as every asynchronous writer does."""
        error = self._settle_overlap()
        super().wait()
        if error is not None:
            raise error

    def close(self) -> None:
        """Finish the in-flight save and free the arena; never raises."""
        self._wait_quietly()
        if self._copier is not None:
            self._copier.shutdown()
            self._copier = None
        if self.overlap:
            self.overlap = False
            WINDOW.detach()
        self._arena.release()

    # ------------------------------------------------------------------ overlap

    def _deferrable(self, snap: Snapshot, manifest: Manifest, pinned: bool) -> set[str]:
        """Keys whose copy may run after ``submit`` returns (guardian/overlap.py).
        None on the way out (the process is about to exit: nothing to overlap with)
        and none on CUDA: side-stream copies are not implemented, for want of a GPU
        to test them on; the blocking path below is the one that ran on CUDA."""
        if not self.overlap or pinned or {"preempt", "final"} & set(manifest.reason):
            return set()
        owned = WINDOW.owned()
        return {
            key
            for key, t in snap.tensors.items()
            if t.device.type == "cpu"
            and t.layout == torch.strided
            and t.is_contiguous()
            and t.numel()
            and (t.data_ptr(), t.numel() * t.element_size()) in owned
        }

    def _stage_overlapped(
        self, snap: Snapshot, layout, staged: StagedImage, gate: CommitGate, deferred: set[str]
    ) -> None:
        """Copy what is not deferred now; start the background copy of the rest. The
        version of each deferred tensor is recorded here, at the snapshot."""
        image = staged.view
        image[: layout.data_start] = layout.header
        base = layout.data_start
        now: list[tuple[int, int, np.ndarray]] = []
        later: list[Segment] = []
        watched = []
        size = 0
        for entry in layout.entries:
            if not entry.nbytes:
                continue
            t = snap.tensors[entry.key]
            segment = (base + entry.begin, base + entry.end, byte_view(t, False).numpy())
            if entry.key in deferred:
                later.append(segment)
                watched.append((entry.key, t, t._version))
            else:
                now.append(segment)
                size += entry.nbytes
        if now:
            self._copy_batch(image, now, size)
        staged.advance(later[0][0] if later else staged.total)
        self._copy = BackgroundCopy(staged, later, watched, gate)
        self._copy.start()

    def _settle_overlap(self) -> BaseException | None:
        """Training thread: close the window of the copy in flight. A change outside
        ``optimizer.step()`` turns overlap off for the rest of the run (the refused
        checkpoint's warning says why, when its outcome is reaped). Returns a failure
        of the copy itself, to be raised once the persist thread is joined."""
        copy, self._copy = self._copy, None
        if copy is None:
            return None
        copy.close_window()
        if copy.torn and self.overlap:
            self.overlap = False
            WINDOW.detach()
        return copy.error

    def _abandon_staging(self, error: BaseException) -> None:
        if self._copy is not None:  # stop it before anything reuses the arena
            self._copy.cancel(error)
            self._copy = None
        super()._abandon_staging(error)

    # ------------------------------------------------------------------ internals

    def _stage(self, snap: Snapshot, layout, buf: torch.Tensor, staged: StagedImage, pinned: bool) -> None:
        """The blocking part: copy the file image into the arena, front to back,
        telling the persist thread how far it may go."""
        image = staged.view
        image[: layout.data_start] = layout.header
        staged.advance(layout.data_start)
        base = layout.data_start
        if pinned:
            for entry in layout.entries:
                if entry.nbytes:
                    src = byte_view(snap.tensors[entry.key], pinned)
                    _copy_into(buf, image, base + entry.begin, base + entry.end, src, pinned)
            wait_for_device_copies(snap.tensors.values())
            staged.finish()
            return
        batch: list[tuple[int, int, np.ndarray]] = []
        size = 0
        small: list[torch.Tensor] = []  # adjacent small tensors, copied together
        small_begin = small_end = 0
        for entry in layout.entries:
            if not entry.nbytes:
                continue
            t = snap.tensors[entry.key]
            if entry.nbytes <= SMALL_COPY and t.device.type == "cpu":
                if not small:
                    small_begin = base + entry.begin
                small.append(t)
                small_end = base + entry.end
                continue
            if small:
                copy_small_run(buf, small_begin, small_end, small)
                small = []
            batch.append((base + entry.begin, base + entry.end, byte_view(t, pinned).numpy()))
            size += entry.nbytes
            if size >= COPY_BATCH:
                self._copy_batch(image, batch, size)
                staged.advance(batch[-1][1])  # small runs before it were copied already
                batch, size = [], 0
        if small:
            copy_small_run(buf, small_begin, small_end, small)
        if batch:
            self._copy_batch(image, batch, size)
        staged.finish()

    def _copy_batch(self, image: memoryview, batch: list[tuple[int, int, np.ndarray]], size: int) -> None:
        """Copy a batch of host tensors into contiguous arena slots; large batches are
        split in two byte halves, one copied by a helper thread (numpy's memcpy
        releases the GIL; two streams measured ~25 GB/s here against ~20 for one)."""
        if size < PARALLEL_COPY_MIN or COPY_THREADS < 2:
            _copy_segments(image, batch)
            return
        if self._copier is None:
            self._copier = ThreadPoolExecutor(1, thread_name_prefix="guardian-copy")
        first, second = _split_half(batch, size)
        helper = self._copier.submit(_copy_segments, image, second)
        try:
            _copy_segments(image, first)
        finally:
            helper.result()

    def _persist(self, run_dir: str, staged: _Staged, manifest: Manifest, on_committed: Committed) -> None:
        """Runs in the background thread; stores its outcome for ``_reap``."""
        try:
            prefix = rank_prefix(0, manifest.world_size)
            if staged.overlapped:  # nobody waits for this thread; the copy thread paces it
                lower_thread_priority()
            with CheckpointTxn(run_dir, manifest.name) as txn:
                rel = prefix + TENSORS_FILE
                writer = image_writer(f"{txn.tmp_dir}/{rel}", direct=self._direct)
                try:
                    txn.add_file(rel, [staged.image], writer=writer)
                finally:
                    staged.image.wait_for(staged.image.total)  # never outlive the copy
                # Staging is over and the trainer runs again: from here on it gets the
                # CPU first (direct_io lowered its own threads already).
                lower_thread_priority()
                txn.add_file(prefix + STATE_FILE, [staged.state_json])
                staged.gate.wait()  # an overlapped copy is verified on the training thread
                path = txn.commit(manifest)
            self._succeeded(on_committed, path, manifest)
        except BaseException as e:  # stored, re-raised on the training thread
            self._failed(e)


def _copy_into(
    buf: torch.Tensor, image: memoryview, begin: int, end: int, src: torch.Tensor, pinned: bool
) -> None:
    """Copy one tensor's bytes into its slot. Device tensors: an async ``copy_`` into
    pinned memory. Host tensors: numpy's memcpy, because torch's ``copy_`` between
    uint8 slices measured ~3 GB/s here against ~9 GB/s for a plain memcpy."""
    if src.device.type != "cpu":
        buf[begin:end].copy_(src, non_blocking=pinned)
        return
    copy_into_arena(np.frombuffer(image[begin:end], dtype=np.uint8), src.numpy())


def _copy_segments(image: memoryview, segments: list[tuple[int, int, np.ndarray]]) -> None:
    """Raw bytes, whatever the dtype (bf16, bool, ...): exact by construction."""
    for begin, end, src in segments:
        copy_into_arena(np.frombuffer(image[begin:end], dtype=np.uint8), src)


def _split_half(
    batch: list[tuple[int, int, np.ndarray]], size: int
) -> tuple[list[tuple[int, int, np.ndarray]], list[tuple[int, int, np.ndarray]]]:
    """Split a batch into two lists of about ``size / 2`` bytes each (cutting one
    segment in two at the midpoint if needed)."""
    first: list[tuple[int, int, np.ndarray]] = []
    second: list[tuple[int, int, np.ndarray]] = []
    left = size // 2
    for begin, end, src in batch:
        n = end - begin
        if left >= n:
            first.append((begin, end, src))
            left -= n
        elif left > 0:
            first.append((begin, begin + left, src[:left]))
            second.append((begin + left, end, src[left:]))
            left = 0
        else:
            second.append((begin, end, src))
    return first, second


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
