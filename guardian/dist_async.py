"""Asynchronous saves under ``torch.distributed``: copy on the training thread, run the
commit protocol (``dist_commit.save_distributed``) on a background thread.

Why a private process group: the commit protocol is collective (ranks agree that
every part is durable before rank 0 writes the manifest). Its collectives cannot
share the training's process group from another thread — collectives on one group
must be issued in the same order on every rank, and the training thread issues its
own (DDP's all-reduces, guardian's step agreements) at times the background thread
cannot predict. So every rank creates one extra **gloo** group at ``protect()`` entry
(a collective call, made at the same point on every rank) and only the background
threads ever use it. gloo, whatever the training backend: the protocol exchanges a
few integers, and a CPU group needs no CUDA stream.

Rules a caller (the guard) must follow:
  * ``submit`` on every rank at the same step (saves are agreed decisions already);
    it first waits for the previous save, so at most one is in flight (bounded memory:
    one staging arena per rank, reused).
  * ``collect`` — deliver a finished save's outcome — only at a point every rank
    reaches together and only when *every* rank's save is finished (the guard agrees
    on that with its per-step all-reduce). The protocol gives every rank the same
    outcome, so all ranks then raise, or continue, at the same step; a rank raising
    alone would leave its peers blocked in the next collective.
  * ``wait`` (next save, exit, preemption) is collective too: every rank joins its own
    background thread, which completes because every rank's thread runs the same save.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from .background import BackgroundSave, Committed
from .distributed import World
from .format.manifest import Manifest
from .staging import StagingArena, byte_view, copy_into_arena, needs_pinned, wait_for_device_copies
from .state.snapshot import Snapshot

log = logging.getLogger(__name__)

TENSOR_ALIGN = 64  # each frozen tensor starts on a 64-byte boundary (any dtype view is legal)


class DistributedAsyncWriter(BackgroundSave):
    mode = "async"

    def __init__(self, world: World) -> None:
        import torch.distributed as dist

        super().__init__()
        group = dist.new_group(backend="gloo")  # collective: every rank, same point
        self.world = dataclasses.replace(world, backend="gloo", group=group)
        self._group = group
        self._arena = StagingArena()

    # ------------------------------------------------------------------ interface

    def submit(
        self,
        run_dir: str,
        manifest: Manifest,
        replicated: Snapshot | None,
        own: Snapshot,
        on_committed: Committed,
    ) -> None:
        """Copy both snapshots into the arena and start the commit protocol in the
        background. Returns once the live tensors may change again."""
        self.wait()
        frozen_rep, frozen_own = _freeze([replicated, own], self._arena)
        self._start(
            self._persist,
            (run_dir, manifest, frozen_rep, frozen_own, on_committed),
            f"guardian-dist-persist-{manifest.name}",
        )

    def reserve(self, replicated: Snapshot | None, own: Snapshot) -> None:
        """Allocate this rank's arena in the background for saves of this size (see
        ``StagingArena.reserve``; pinned memory, when tensors are on CUDA, is slow to
        allocate — this keeps it out of the first save's stall)."""
        if not self.busy:
            total, pinned = _arena_request([replicated, own])
            self._arena.reserve(total, pinned=pinned)

    def check(self) -> None:
        """Per-step hook of the single-process writers. Deliberately nothing here:
        outcomes are delivered by ``collect`` at agreed points (module docstring)."""

    def collect(self) -> None:
        """Deliver a finished save (callback, or ``CheckpointWriteError``). Only when
        every rank agreed that its save is finished."""
        if self._finished():
            self._reap()

    def close(self) -> None:
        """Finish the in-flight save, free the arena and the group; never raises."""
        self._wait_quietly()
        self._arena.release()
        self._destroy_group()

    def _destroy_group(self) -> None:
        """Release the private group's sockets and threads (each ``protect()`` makes
        one). Already gone after a preemption exit, which tears down every group."""
        import torch.distributed as dist

        group, self._group = self._group, None
        if group is None or not dist.is_initialized():
            return
        try:
            dist.destroy_process_group(group)
        except (ValueError, RuntimeError) as e:  # destroyed with the default group already
            log.debug("private checkpoint group already gone: %s", e)

    # ------------------------------------------------------------------ internals

    def _persist(
        self,
        run_dir: str,
        manifest: Manifest,
        replicated: Snapshot | None,
        own: Snapshot,
        on_committed: Committed,
    ) -> None:
        from .dist_commit import save_distributed
        from .threads import lower_thread_priority

        lower_thread_priority()  # the trainer runs again; it gets the CPU first
        try:
            path = save_distributed(self.world, run_dir, manifest, replicated, own)
            if path is not None:
                self._succeeded(on_committed, path, manifest)
        except BaseException as e:  # stored; raised on the training thread at an agreed point
            self._failed(e)

    def _who(self) -> str:
        return f"rank {self.world.rank}: "


def _freeze(snaps: list[Snapshot | None], arena: StagingArena) -> list[Snapshot | None]:
    """Copies of ``snaps`` whose tensors live in ``arena`` (one buffer for all of them).

    Tensors on CUDA are copied with ``non_blocking`` into pinned memory and waited for
    once; everything else is a plain host copy. The copies are contiguous, so the
    files written from them are byte-identical to the synchronous path's."""
    tensors = [t for s in snaps if s is not None for t in s.tensors.values()]
    total, pinned = _arena_request(snaps)
    buf = arena.acquire(total, pinned=pinned)
    out: list[Snapshot | None] = []
    offset = 0
    for snap in snaps:
        if snap is None:
            out.append(None)
            continue
        frozen: dict[str, torch.Tensor] = {}
        for key, t in snap.tensors.items():
            n = t.numel() * t.element_size()
            dst = buf[offset : offset + n].view(t.dtype).view(t.shape)
            if n and _plain_host(t):
                copy_into_arena(buf[offset : offset + n].numpy(), byte_view(t, False).numpy())
            else:
                dst.copy_(t, non_blocking=pinned and t.device.type == "cuda")
            frozen[key] = dst
            offset += _aligned(n)
        out.append(Snapshot(components=snap.components, tensors=frozen))
    if pinned:
        wait_for_device_copies(tensors)
    return out


def _arena_request(snaps: list[Snapshot | None]) -> tuple[int, bool]:
    """(bytes, pinned) of the arena that ``_freeze`` needs for ``snaps``."""
    tensors = [t for s in snaps if s is not None for t in s.tensors.values()]
    total = sum(_aligned(t.numel() * t.element_size()) for t in tensors)
    return total, needs_pinned(tensors)


def _plain_host(t: torch.Tensor) -> bool:
    """A host tensor whose bytes can be copied as they lie (``byte_view`` is then a
    view: no temporary copy)."""
    return t.device.type == "cpu" and t.is_contiguous() and not t.is_conj() and not t.is_neg()


def _aligned(n: int) -> int:
    return -(-n // TENSOR_ALIGN) * TENSOR_ALIGN
