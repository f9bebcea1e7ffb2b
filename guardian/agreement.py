"""How ranks agree on what only one of them may see, without stopping every step.

Three facts are rank-local: a preemption signal (one rank got SIGTERM), a wall-clock
interval (``every_seconds``: clocks and step times differ) and whether this rank's
background save is still running. Acting on them must still be *one* decision taken at
the *same* step on every rank: a checkpoint whose parts come from different steps is
not a checkpoint, and a rank that learns a save's outcome alone raises alone.

A blocking all-reduce per step would agree at once, but it stalls the loop on the
slowest rank's arrival and, with NCCL, costs a device sync. Instead:

* at a *posting* boundary step ``n`` every rank posts its flags: a non-blocking MAX
  all-reduce (``async_op=True``) on a private gloo group (CPU tensors: no device, no
  sync), and goes on training;
* at step ``n + max(period, LAG)`` every rank takes step ``n``'s reduced flags — by
  then long arrived (the training's own gradient all-reduce keeps ranks within a step
  of each other: a rank past step ``n + 1``'s backward knows every peer posted at
  ``n``) — and acts on them. Every rank applies the same flags at the same step. One
  step of lag, not more: with slow steps (``period`` 1) every step of lag is a step's
  worth of a preemption's grace period spent before the checkpoint starts.

Posting costs the training thread a little CPU (a gloo thread wakes up), so ranks post
every ``period`` steps: about ``POST_INTERVAL`` seconds apart, at most ``MAX_PERIOD``
steps. Each post carries every rank's proposed period; the smallest is adopted when
that post is acted on — at the same step everywhere, so every rank keeps posting at
the same steps. A signal is acted on at most ``2 * period`` (or ``LAG + period``)
boundary steps after it arrived. A reduction that has not arrived when due is waited
for (counted in ``blocked_waits``): the lag bounds the delay, it never lets a rank act
alone.

Flags are only valid in the *era* (the saver's sequence number) they were posted in:
a seconds-based save or "no rank is busy" posted before a save that happened since
describe a state that is gone (a second save; a new save in flight), so they are
dropped. A preemption is sticky and always counts. Every rank saves at the same steps,
so every rank drops the same flags.

Why a group of its own: collectives on one group must be issued in the same order on
every rank; the training thread issues these, the background commit (``dist_async``)
issues its own on its own group from another thread, and the training's group is
the user's (DDP, and whatever the loop calls). Creating it is collective (every rank,
at ``protect()`` entry). Where a gloo group cannot be made, every rank falls back to a
blocking agreement on the training group (lag 0).

Rules for the caller (the guard): ``post`` once per boundary step, on every rank;
``now`` only at points every rank reaches together; ``drain`` before tearing the
process group down (the preemption exit); ``close`` when leaving ``protect()``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from .distributed import World, keep_alive

log = logging.getLogger(__name__)

LAG = 1  # fewest boundary steps between posting flags and acting on them (module docstring)
POST_INTERVAL = 0.25  # seconds of training between two posts, when steps are shorter than that
MAX_PERIOD = 256  # most boundary steps between two posts
ABANDON_WAIT = timedelta(seconds=60)  # leaving on an error: how long peers may take to post


@dataclass(frozen=True)
class Decision:
    """What every rank acts on at this step (identical on every rank)."""

    preempt: bool = False  # some rank was asked to stop
    seconds_due: bool = False  # some rank's clock says a seconds-based save is due
    all_idle: bool = False  # no rank's background save is running: all may learn its outcome


@dataclass
class _Posted:
    work: Any
    flags: torch.Tensor
    era: int
    apply_at: int  # the boundary step at which every rank acts on it


class Agreement:
    """Lagged, non-blocking agreement on the per-step flags (module docstring)."""

    def __init__(self, world: World, group: Any = None, lag: int | None = None) -> None:
        self.world = world if group is None else dataclasses.replace(world, backend="gloo", group=group)
        self.lag = (LAG if lag is None else lag) if group is not None else 0
        self._group = group
        self._posted: collections.deque[_Posted] = collections.deque()
        self._step = 0  # boundary steps seen (the same count on every rank)
        self._next_post = 1
        self.period = 1  # boundary steps between posts: agreed, so the same on every rank
        self._last_post: tuple[int, float] | None = None  # (step, monotonic time) of the last post
        self.preempt_due = False  # sticky: a decision to preempt has been taken (act at an exact point)
        self.blocked_waits = 0  # reductions not yet arrived when due (should stay ~0)

    @classmethod
    def open(cls, world: World) -> Agreement:
        """Collective under ``torch.distributed`` (every rank, same point)."""
        if not world.distributed:
            return cls(world)
        group = None
        try:
            group = torch.distributed.new_group(backend="gloo")
        except (RuntimeError, ValueError) as e:
            log.warning("no private gloo group (%s); ranks agree with a blocking all-reduce each step", e)
        if world.all_max([0 if group is not None else 1])[0]:  # every rank takes the same path
            if group is not None:
                torch.distributed.destroy_process_group(group)
            return cls(world)
        return cls(world, group)

    # ------------------------------------------------------------------ per step

    def post(self, era: int, preempt: bool, seconds_due: bool, busy: bool) -> Decision:
        """Called at every boundary step with this rank's flags; returns what every rank
        acts on at this step (flags posted earlier, reduced over every rank). ``era``:
        the saver's sequence number (flags from before a save are stale)."""
        decision = self._reduce(era, preempt, seconds_due, busy)
        self.preempt_due = self.preempt_due or decision.preempt
        return decision

    def _reduce(self, era: int, preempt: bool, seconds_due: bool, busy: bool) -> Decision:
        if not self.world.distributed:
            return Decision(preempt, seconds_due, not busy)
        if self.lag == 0:
            p, s, b = self.world.any_of(preempt, seconds_due, busy)
            return Decision(p, s, not b)
        self._step += 1
        decision = Decision()
        if self._posted and self._posted[0].apply_at == self._step:
            decision = self._decide(self._posted.popleft(), era)
        if self._step == self._next_post:
            self._post(era, [int(preempt), int(seconds_due), int(busy), -self._wanted_period()])
        return decision

    def _post(self, era: int, values: list[int]) -> None:
        flags = torch.tensor(values, dtype=torch.int64)
        work = torch.distributed.all_reduce(
            flags, op=torch.distributed.ReduceOp.MAX, group=self._group, async_op=True
        )
        self._posted.append(_Posted(work, flags, era, self._step + max(self.period, self.lag)))
        self._next_post = self._step + self.period
        self._last_post = (self._step, time.monotonic())

    def _wanted_period(self) -> int:
        """This rank's proposal: posts about ``POST_INTERVAL`` apart, judged by its steps
        since the last post. The ranks take the smallest proposal (the shortest delay)."""
        if self._last_post is None:
            return 1
        step, since = self._last_post
        step_time = (time.monotonic() - since) / max(self._step - step, 1)
        return max(1, min(MAX_PERIOD, math.ceil(POST_INTERVAL / max(step_time, 1e-9))))

    def _decide(self, posted: _Posted, era: int) -> Decision:
        self._wait(posted.work)
        preempt, seconds_due, busy, neg_period = posted.flags.tolist()
        self.period = max(1, min(MAX_PERIOD, -neg_period))  # from the next post on, on every rank
        if posted.era != era:  # a save happened since: only the sticky preemption still holds
            return Decision(preempt=bool(preempt))
        return Decision(bool(preempt), bool(seconds_due), not busy)

    def _wait(self, work: Any, timeout: timedelta | None = None) -> None:
        if not work.is_completed():
            self.blocked_waits += 1
        if timeout is None:
            work.wait()
        else:
            work.wait(timeout)
        keep_alive(work)

    # ------------------------------------------------------------------ at shared points

    def now(self, *flags: bool) -> list[bool]:
        """A blocking agreement, for points every rank reaches together outside the step
        cadence (an epoch's end, a report outside any epoch): true if any rank's is."""
        if not self.world.distributed:
            return list(flags)
        return self.world.any_of(*flags)

    def drain(self, timeout: timedelta | None = None) -> None:
        """Wait for every posted reduction (each rank posted the same ones), so the
        groups can be torn down with nothing in flight."""
        while self._posted:
            self._wait(self._posted[0].work, timeout)
            self._posted.popleft()

    def close(self, *, failed: bool = False) -> None:
        """Finish what is in flight and free the private group. ``failed``: leaving on
        an error, when a peer may never post again — wait a bounded time, then leave
        the group as it is (tearing it down would wait for the peer)."""
        group, self._group = self._group, None
        try:
            self.drain(ABANDON_WAIT if failed else None)
        except RuntimeError as e:  # a peer is gone or late: its own error says why
            log.warning("ranks' last step agreements did not complete: %s", e)
            self._posted.clear()
            return
        if group is None or not torch.distributed.is_initialized():
            return
        try:
            torch.distributed.destroy_process_group(group)
        except (ValueError, RuntimeError) as e:  # destroyed with the default group already
            log.debug("private agreement group already gone: %s", e)
