"""The staging arena: one reused host buffer that a checkpoint's file image is copied into.

Why one buffer, allocated once: the training loop may only continue once the state
it saved can no longer change under the writer, so the blocking part of an
asynchronous save is a copy. A copy into fresh memory runs at page-fault speed
(``clone()``); into memory that is already mapped and touched it runs at memcpy speed
(``copy_``), several times faster (docs/performance.md, "Why the code is shaped so"). So the arena is allocated on the first save,
pre-faulted (one write per page), and reused by every later save. It grows only
when the state grows, and the old buffer is released *before* the new one is
allocated, so host memory never holds two arenas.

Invariants:
  * the base address is ``ALIGN``-aligned (O_DIRECT needs aligned buffers); anonymous
    ``mmap`` memory is page-aligned by construction, pinned memory is aligned by hand;
  * when any tensor lives on CUDA the arena is pinned host memory, so device→host
    copies can be asynchronous (``non_blocking``) and finish with one synchronize.
"""

from __future__ import annotations

import mmap
import threading

import numpy as np
import torch

from . import knobs

try:  # the optional C extension built by setup.py (see guardian/_streamcopy.c)
    from . import _streamcopy
except ImportError:  # no compiler at install time, or another platform
    _streamcopy = None

ALIGN = 4096  # O_DIRECT alignment that every Linux block device accepts
PAGE = mmap.PAGESIZE
HUGE_PAGE = 2 * 1024 * 1024  # x86-64/arm64 transparent huge page size


STREAM_MIN = 1 << 20  # smaller copies: a plain memcpy (nothing to gain, call overhead)


def copy_into_arena(dst: np.ndarray, src: np.ndarray) -> None:
    """Copy ``src``'s bytes into the arena slot ``dst`` (equal byte length, both
    C-contiguous). Large copies use non-temporal stores when guardian's C extension
    is built: the arena is read next by the disk, not by this CPU, and glibc's
    memcpy switches to streaming stores only above a large threshold
    (``x86_non_temporal_threshold``), so per-tensor copies of a few MiB would go through
    the cache and evict the trainer's working set. Releases the GIL
    either way. ``GUARDIAN_STREAM_COPY=0`` forces the numpy path."""
    if _streamcopy is not None and dst.nbytes >= STREAM_MIN and knobs.stream_copy():
        _streamcopy.copy(dst, src)
    else:
        np.copyto(dst, src)


SMALL_COPY = 32 * 1024  # a tensor this small is copied with its neighbours (copy_small_run)


def copy_small_run(arena: torch.Tensor, begin: int, end: int, tensors: list[torch.Tensor]) -> None:
    """Copy adjacent small host tensors into ``arena[begin:end]`` in one torch call.

    Why: a state has hundreds of biases and norm weights of a few KiB each, and the
    Python around a per-tensor copy (a byte view, a numpy view, a slice) costs several
    times the copy itself — for an incremental save, where nearly everything left to
    copy is small, it was most of the stall. ``torch.cat`` walks the list in C++.
    Each tensor stays under ``SMALL_COPY`` bytes, below torch's parallel grain, so no
    intra-op thread is woken (costly on a loaded machine). Exact bytes, any dtype:
    every tensor is viewed as its raw bytes first (a copy if it is not contiguous).
    Detached, so ``out=`` accepts tensors that require grad; no ``no_grad`` block is
    needed, and without one a run of a single tensor (a bias between two large
    weights, as in every full save) costs no more than the per-tensor path."""
    torch.cat([t.detach().contiguous().view(-1).view(torch.uint8) for t in tensors], out=arena[begin:end])


def copy_implementation() -> str:
    """What ``copy_into_arena`` uses for large copies (reported by the benchmark)."""
    if _streamcopy is None:
        return "numpy (C extension not built)"
    if not knobs.stream_copy():
        return "numpy (GUARDIAN_STREAM_COPY=0)"
    if _streamcopy.KIND == "memcpy":  # built for a CPU we have no streaming path for
        return "memcpy (C extension, no streaming stores on this CPU)"
    return f"non-temporal stores ({_streamcopy.KIND})"


def needs_pinned(tensors) -> bool:
    """Whether a save of ``tensors`` stages into pinned memory: when any lives on CUDA
    (device→host copies can then be asynchronous)."""
    return torch.cuda.is_available() and any(t.device.type == "cuda" for t in tensors)


def byte_view(t: torch.Tensor, pinned: bool) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor on its own device (a view when the
    tensor is contiguous, which state-dict tensors almost always are)."""
    t = t.detach()
    if t.device.type not in ("cpu", "cuda") or (t.device.type == "cuda" and not pinned):
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    return t.reshape(-1).view(torch.uint8)


def wait_for_device_copies(tensors) -> None:
    """Wait for the ``non_blocking`` device→host copies queued from ``tensors``: on
    *every* CUDA device they live on. ``torch.cuda.synchronize()`` alone waits only for
    the current device — a rank that placed its model with ``.to(rank)`` without
    ``set_device`` would persist the arena before its copies landed."""
    for device in {t.device for t in tensors if t.device.type == "cuda"}:
        torch.cuda.synchronize(device)


class StagingArena:
    """A page-aligned, pre-faulted uint8 buffer reused across saves (see module docstring)."""

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None  # aligned uint8 view used by callers
        self._owner: object = None  # what keeps the memory alive (mmap or pinned tensor)
        self.capacity = 0
        self.pinned = False
        self._reserving: threading.Thread | None = None
        self._touching: _PageToucher | None = None

    def acquire(self, nbytes: int, *, pinned: bool = False) -> torch.Tensor:
        """A uint8 tensor of exactly ``nbytes`` over the arena, (re)allocating if needed.

        The caller owns the returned view until it calls ``acquire`` again: the async
        writer never does so while a save is still being persisted.
        """
        self._join_reservation()
        if not self.fits(nbytes, pinned):
            self.release()
            self._allocate(max(nbytes, 1), pinned)
        assert self._buf is not None
        return self._buf[:nbytes]

    def fits(self, nbytes: int, pinned: bool) -> bool:
        return self._buf is not None and nbytes <= self.capacity and pinned == self.pinned

    def reserve(self, nbytes: int, *, pinned: bool = False) -> None:
        """Prepare the arena for ``nbytes`` now, so that the first save does not stall
        for it (3.2 GB took 2-4 s here, nearly all of it the first touch of every page).

        Host memory: the mapping is made here (cheap) and its pages are touched by a
        background thread at the lowest priority — which a trainer that keeps every
        core busy can starve for minutes, so a save that needs the arena before that
        thread is done touches the remaining pages itself (``acquire``), at the
        trainer's own priority: never slower than allocating in the save. Pinned
        memory (CUDA) is allocated whole on a background thread that ``acquire``
        joins. A failure there is not reported: ``acquire`` then allocates on the
        training thread and raises there, where it can be handled."""
        self._join_reservation()
        if self.fits(nbytes, pinned):
            return
        self.release()
        size = _aligned_size(nbytes)
        if pinned:
            self._reserving = threading.Thread(
                target=self._allocate_quietly, args=(size,), name="guardian-arena", daemon=False
            )
            self._reserving.start()
            return
        buf, owner, faulted = _map_host(size)
        self._buf, self._owner, self.capacity, self.pinned = buf, owner, size, False
        if not faulted:
            self._touching = _PageToucher(buf)
            self._reserving = threading.Thread(
                target=self._touching.run_quietly, name="guardian-arena", daemon=False
            )
            self._reserving.start()

    def release(self) -> None:
        """Drop the buffer. The memory returns to the OS once no view of it is alive."""
        self._join_reservation()
        self._buf, self._owner, self.capacity = None, None, 0

    def _join_reservation(self) -> None:
        """Make a reservation complete: help touch the remaining host pages, or wait for
        the pinned allocation."""
        if self._touching is not None:
            self._touching.finish()  # the background thread may still exit later: harmless
            self._touching, self._reserving = None, None
        elif self._reserving is not None:
            self._reserving.join()
            self._reserving = None

    def _allocate_quietly(self, size: int) -> None:
        try:
            self._allocate(size, pinned=True)
        except Exception:  # noqa: BLE001 - retried (and raised) by acquire()
            self._buf, self._owner, self.capacity = None, None, 0

    def _allocate(self, nbytes: int, pinned: bool) -> None:
        size = _aligned_size(nbytes)
        if pinned:
            self._buf, self._owner = _pinned_buffer(size)
        else:
            self._buf, self._owner = _host_buffer(size)
        self.capacity, self.pinned = size, pinned


def _aligned_size(nbytes: int) -> int:
    return -(-max(nbytes, 1) // ALIGN) * ALIGN


def _host_buffer(size: int) -> tuple[torch.Tensor, object]:
    """Private anonymous memory (not MAP_SHARED, which would be shmem), backed by
    transparent huge pages where the kernel allows them, then pre-faulted.

    Why huge pages: an O_DIRECT write pins every page of the buffer it writes, and with
    4 KiB pages that pinning, not the disk, can be the limit; with 2 MiB pages the
    writer also uses less CPU, which lowers the stall it causes while pipelined.
    Pre-faulting 2 MiB pages is faster too. Where THP is off (``never``) or unavailable,
    ``madvise`` is a no-op or refused and the arena is ordinary 4 KiB pages
    (MAP_POPULATE, faster than touching each page from Python). Measurements:
    docs/performance.md."""
    buf, mm, faulted = _map_host(size)
    if not faulted:
        _prefault(buf)
    return buf, mm


def _map_host(size: int) -> tuple[torch.Tensor, object, bool]:
    """The arena's mapping (see ``_host_buffer``) and whether its pages are already
    faulted in (MAP_POPULATE); the caller touches them otherwise."""
    hugepage = getattr(mmap, "MADV_HUGEPAGE", None)
    if hugepage is not None and size >= HUGE_PAGE:
        mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            mm.madvise(hugepage)
        except OSError:
            pass  # THP not configured: 4 KiB pages, same code path
        return torch.frombuffer(mm, dtype=torch.uint8), mm, False
    populate = getattr(mmap, "MAP_POPULATE", 0)
    mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
    return torch.frombuffer(mm, dtype=torch.uint8), mm, bool(populate)


def _pinned_buffer(size: int) -> tuple[torch.Tensor, object]:
    """Page-locked memory for asynchronous device→host copies (CUDA only)."""
    raw = torch.empty(size + ALIGN, dtype=torch.uint8, pin_memory=True)
    offset = (-raw.data_ptr()) % ALIGN
    buf = raw[offset : offset + size]
    _prefault(buf)
    return buf, raw


def _prefault(buf: torch.Tensor) -> None:
    """Touch one byte per page so the first save's copy does not pay the page faults."""
    buf[::PAGE].fill_(0)


class _PageToucher:
    """``_prefault`` in chunks that any thread may take: the background reservation
    works through them at low priority, and a save that needs the arena first takes
    the rest itself (``finish``) and waits only for chunks already being touched."""

    CHUNK = 32 * 1024 * 1024  # a multiple of PAGE and HUGE_PAGE

    def __init__(self, buf: torch.Tensor) -> None:
        self._buf = buf
        self._next = 0
        self._busy = 0
        self._cv = threading.Condition()

    def run(self) -> None:
        while True:
            with self._cv:
                start = self._next
                if start >= len(self._buf):
                    return
                self._next, self._busy = start + self.CHUNK, self._busy + 1
            try:
                _prefault(self._buf[start : start + self.CHUNK])
            finally:
                with self._cv:
                    self._busy -= 1
                    self._cv.notify_all()

    def run_quietly(self) -> None:
        """The background thread's body: lowest priority; a failure only means pages
        fault later, during a copy."""
        from .threads import lower_thread_priority

        lower_thread_priority()
        try:
            self.run()
        except Exception:  # noqa: BLE001 - pre-faulting is an optimisation
            pass

    def finish(self) -> None:
        self.run()
        with self._cv:
            self._cv.wait_for(lambda: self._busy == 0)


class StagingAborted(Exception):
    """Staging failed on the training thread; the writer must give up (the training
    thread raises the real error)."""


class StagedImage:
    """A file image in the arena that is still being filled, front to back.

    The training thread copies tensors in file order and calls ``advance``; the
    persist thread calls ``wait_for(end)`` before it hashes or writes ``[.., end)``,
    so the disk starts on the prefix while later tensors are still being copied
    (time-to-durable ~ max(copy, write) instead of copy + write). Bytes below
    ``staged`` never change again until the save is committed.
    """

    NOTIFY_EVERY = 4 * 1024 * 1024  # wake the writer at most once per 4 MiB staged
    STAGER_CHECK = 1.0  # seconds between two looks at whether the stager still exists

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.total = len(view)
        self._staged = 0
        self._told = 0
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._stager = threading.current_thread()  # the thread that fills the image

    @property
    def complete(self) -> bool:
        return self._staged >= self.total

    def advance(self, upto: int) -> None:
        """Bytes ``[0, upto)`` are final (training thread)."""
        self._staged = upto
        if upto - self._told >= self.NOTIFY_EVERY or upto >= self.total:
            self._told = upto
            with self._cond:
                self._cond.notify_all()

    def finish(self) -> None:
        self.advance(self.total)

    def fail(self, error: BaseException) -> None:
        with self._cond:
            self._error = error
            self._cond.notify_all()

    def wait_for(self, end: int) -> None:
        """Block until ``[0, end)`` is staged; raises ``StagingAborted`` if staging failed."""
        if self._staged >= end:
            return
        with self._cond:
            while self._staged < end and self._error is None:
                # Fail-safe: a stager that is gone (the interpreter is exiting, its main
                # thread already stopped) will never finish; waiting would keep the
                # non-daemon writer thread, and so the process, alive forever.
                if not self._cond.wait(timeout=self.STAGER_CHECK) and not self._stager.is_alive():
                    self._error = RuntimeError(f"{self._stager.name} ended while the save was being staged")
            if self._error is not None:
                raise StagingAborted(str(self._error))
