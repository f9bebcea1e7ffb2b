"""Rank awareness: who writes what, and how ranks agree without pickling anything.

Under ``torch.distributed`` every rank runs the same guard. The rules:

* **Decisions are collective.** Periodic saves by step or epoch are deterministic and
  need no communication; anything that is not — a signal seen by one rank, a
  wall-clock interval, which checkpoint to resume, a best metric — is agreed with a
  small integer/float all-reduce or broadcast *of tensors* (``broadcast_object_list``
  would pickle; we never do), so every rank saves at the same step. The per-step
  flags are agreed without blocking, a few steps late, on a group of their own
  (``agreement``).
* **Replicated state is written once** (by rank 0): a DDP model, its optimizer,
  schedulers, the scaler. **Per-rank state** — RNG, data position, and anything
  sharded (DTensor/FSDP2) — is written by each rank into ``rank-NNNNN/``.
* **Commit after every rank.** Each rank writes and fsyncs its part plus a
  ``part.json`` listing its files' sizes and hashes; after a collective check that
  every rank succeeded, rank 0 writes the manifest (last) and renames the checkpoint
  into place. A checkpoint that lacks any rank's part never verifies.

Supervisor-side only rank 0 writes ``run.json``/``heartbeat.json`` and holds the lock.
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

# Handles of finished collectives, kept alive on purpose. A gloo worker thread holds
# its own reference to each work item and drops it just after the work completes. If
# that drop is the *last* reference, the work's tensors are released on the worker
# thread, which must take the GIL to do so (they have Python objects); when that
# happens while the interpreter is already finalizing (a rank exiting right after its
# last collective, e.g. on preemption), CPython ends the thread mid-destructor and the
# process dies of SIGABRT ("terminate called without an active exception") instead of
# exiting with its code. Keeping the main thread's handle for a while makes the main
# thread the last owner (the core dumps showed ~AsyncAllreduceWork on a gloo runLoop
# thread while the main thread was in Py_FinalizeEx; docs/performance.md has the counts).
_RECENT_WORK: collections.deque[Any] = collections.deque(maxlen=32)


def _run_collective(collective: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    work = collective(*args, async_op=True, **kwargs)
    work.wait()
    keep_alive(work)


def keep_alive(work: Any) -> None:
    """Keep a finished collective's handle for a while (see ``_RECENT_WORK``); every
    ``async_op`` handle guardian waits for goes through here."""
    _RECENT_WORK.append(work)


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    backend: str | None = None
    # The process group the collectives below use (None: the default group). The
    # background commit of asynchronous saves uses a private gloo group (dist_async).
    group: Any = field(default=None, compare=False, repr=False)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @classmethod
    def detect(cls) -> World:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), str(dist.get_backend()))
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            log.warning(
                "WORLD_SIZE=%s but no process group is initialized; this rank checkpoints "
                "on its own. Call torch.distributed.init_process_group() before protect().",
                os.environ["WORLD_SIZE"],
            )
        return cls()

    # ------------------------------------------------------------ tensor collectives

    def _device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_max(self, values: list[int]) -> list[int]:
        """Element-wise maximum over ranks (also a barrier). Single process: identity."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.int64, device=self._device())
        _run_collective(torch.distributed.all_reduce, t, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return [int(v) for v in t.tolist()]

    def broadcast_ints(self, values: list[int], src: int = 0) -> list[int]:
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.int64, device=self._device())
        _run_collective(torch.distributed.broadcast, t, self._global(src), group=self.group)
        return [int(v) for v in t.tolist()]

    def broadcast_float(self, value: float, src: int = 0) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._device())
        _run_collective(torch.distributed.broadcast, t, self._global(src), group=self.group)
        return float(t.item())

    def _global(self, rank: int) -> int:
        """``broadcast`` takes a global rank; ours are group ranks (equal for the default
        group and for the full-size private group)."""
        if self.group is None:
            return rank
        return torch.distributed.get_global_rank(self.group, rank)

    def barrier(self) -> None:
        self.all_max([0])

    def any_of(self, *flags: bool) -> list[bool]:
        """Rank-local facts (a signal, a wall clock) become one decision for all ranks:
        if any rank saw it, every rank acts on it at this same step."""
        return [bool(v) for v in self.all_max([int(f) for f in flags])]

    def leave(self) -> None:
        """Every rank has saved and is about to exit: tear the process group down in step
        on all ranks. A rank that exits while a peer's communication threads still hold
        connections to it makes that peer abort (SIGABRT) instead of exiting cleanly."""
        if not self.distributed:
            return
        self.barrier()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def agree_ok(self, ok: bool) -> bool:
        """True on every rank iff it was True on every rank."""
        return self.all_max([0 if ok else 1])[0] == 0
