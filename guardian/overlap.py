"""Overlap: the staging copy of an asynchronous save runs while the next forward and
backward pass do, and the training loop waits only where it must.

Why: the blocking part of an asynchronous save is one copy of the state into the
staging arena (guardian/staging.py). The tensors that make up nearly all of those
bytes — parameters and optimizer state — are changed by ``optimizer.step()`` and by
nothing else in an ordinary loop, so they can be copied in the background until the
next step, which a global optimizer step pre-hook holds back until the copy is done.

What is copied where (``AsyncWriter`` decides, per save):
  * *deferred* (background): CPU tensors that are exactly a parameter of an optimizer
    seen stepping in this process, or a tensor of its per-parameter state;
  * everything else — buffers (BatchNorm statistics change in the forward pass and
    do *not* bump their version counter), frozen parameters, RNG states, tensors in
    ``param_groups`` — is copied before ``submit`` returns, as before.

What can change a deferred tensor before it is copied, and what happens then:
  * ``optimizer.step()`` of *any* optimizer, given to guardian or not: the pre-hook
    waits for the copy first. Nothing is lost.
  * an in-place operation autograd sees (``p.mul_()`` under ``no_grad``,
    ``load_state_dict``, EMA updates, ``torch._foreach_*``): it bumps the tensor's
    version counter. Versions are recorded at the snapshot and compared once the copy
    is done, on the training thread, at a point where no operation of that thread is
    in progress (the pre-hook, or the writer's ``check``/``wait``). Any change means
    the image may hold a value the step never had: the checkpoint is **not committed**
    (the previous one stays), a warning says why, and the writer copies blocking for
    the rest of the run. A change that came after the tensor was copied is refused
    too: version counters cannot tell the two apart.
  * ``.data`` (``p.data.mul_()`` does not bump ``p``'s version) and ``.numpy()``: while
    a copy is in flight, ``torch.Tensor.data`` and ``torch.Tensor.numpy`` are wrapped
    so that reaching for them first waits for the copy (the window closes early, the
    checkpoint stays exact). The wrappers exist only during the window.
  * NOT detected: writes through memory autograd never sees — a numpy array or
    ``untyped_storage()`` taken *before* the save and written during the window,
    ``data_ptr`` handed to C code or ctypes, another process writing shared memory,
    another thread of the program mutating tensors concurrently. Such code must call
    ``g.save`` only where it does not write, or turn overlap off (``overlap=False``,
    ``GUARDIAN_OVERLAP=0``).

The commit waits for the verdict: the persist thread writes the image as it is staged
but commits only once the training thread has verified it (``CommitGate``), so a
checkpoint whose tensors changed before they were copied never becomes visible.
CUDA tensors are not deferred (see ``AsyncWriter``): no GPU was available to test it.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

import numpy as np
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .staging import StagedImage, StagingAborted, copy_into_arena

log = logging.getLogger(__name__)


class OverlapTorn(StagingAborted):
    """A deferred tensor changed outside ``optimizer.step()`` before the window
    closed: the image may not be the state at the save's step."""


class CommitGate:
    """The persist thread's last wait before commit: the training thread's verdict."""

    OWNER_CHECK = 1.0  # seconds between two looks at whether the training thread exists

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._verdict: bool | BaseException | None = None
        self._owner = threading.current_thread()

    def approve(self) -> None:
        self._decide(True)

    def refuse(self, error: BaseException) -> None:
        self._decide(error)

    def _decide(self, verdict: bool | BaseException) -> None:
        with self._cond:
            if self._verdict is None:
                self._verdict = verdict
                self._cond.notify_all()

    def wait(self) -> None:
        """Block until decided; raise the refusal. A training thread that is gone
        (interpreter exit without the guard) never verifies: that is a refusal."""
        with self._cond:
            while self._verdict is None:
                if not self._cond.wait(self.OWNER_CHECK) and not self._owner.is_alive():
                    self._verdict = StagingAborted(f"{self._owner.name} ended before the save was verified")
            verdict = self._verdict
        if verdict is not True:
            assert isinstance(verdict, BaseException)
            raise verdict


Segment = tuple[int, int, np.ndarray]  # [begin, end) in the image, source bytes


class BackgroundCopy:
    """Copies the deferred tensors into their slots, front to back, on its own thread,
    telling ``staged`` how far the image is final; ``close_window`` (training thread)
    joins it and decides the commit."""

    def __init__(
        self,
        staged: StagedImage,
        segments: list[Segment],
        watched: list[tuple[str, torch.Tensor, int]],
        gate: CommitGate,
    ) -> None:
        self.staged = staged
        self._segments = segments
        self._watched = watched  # key, tensor (shares the live version counter), version at snapshot
        self.gate = gate
        self.error: BaseException | None = None
        self.torn: list[str] = []  # keys that changed before the window closed
        self._cancelled = False
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="guardian-overlap-copy", daemon=False)

    def start(self) -> None:
        WINDOW.open(self)
        self._thread.start()

    @property
    def copied(self) -> bool:
        return not self._thread.is_alive()

    def wait_copied(self) -> None:
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()

    def cancel(self, error: BaseException) -> None:
        """Staging is abandoned: stop copying (the arena is about to be reused)."""
        self._cancelled = True
        self.wait_copied()
        self.staged.fail(error)
        self.gate.refuse(StagingAborted(str(error)))
        self._close()

    def close_window(self) -> None:
        """Training thread, between two of its operations: wait for the copy, then
        commit or refuse by the version counters (module docstring)."""
        self.wait_copied()
        with self._lock:
            if self._closed:
                return
            if self.error is not None:
                self.gate.refuse(StagingAborted(f"the background copy failed: {self.error!r}"))
            else:
                self.torn = [key for key, t, version in self._watched if t._version != version]
                if self.torn:
                    self.gate.refuse(OverlapTorn(_torn_message(self.torn)))
                else:
                    self.gate.approve()
        self._close()

    def _close(self) -> None:
        with self._lock:
            self._closed = True
            self._watched = []  # no reference to a live tensor outlives the window
            self._segments = []
        WINDOW.close(self)

    def _run(self) -> None:
        try:
            for i, (begin, end, src) in enumerate(self._segments):
                if self._cancelled:
                    return
                copy_into_arena(np.frombuffer(self.staged.view[begin:end], dtype=np.uint8), src)
                following = self._segments[i + 1][0] if i + 1 < len(self._segments) else self.staged.total
                self.staged.advance(following)
            self.staged.finish()
        except BaseException as e:  # reported by the writer on the training thread
            self.error = e
            self.staged.fail(e)


def _torn_message(keys: list[str]) -> str:
    shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    return (
        f"{shown} changed in place outside optimizer.step() while the checkpoint was being copied "
        "in the background, so it may not hold the state of its step; it is not committed "
        "(the previous checkpoint stays) and later saves copy the state before training continues"
    )


class _Window:
    """The process's one overlap window: the global optimizer step pre-hook, the
    optimizers seen stepping, and the ``.data``/``.numpy()`` wrappers while open."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: list[BackgroundCopy] = []  # one per writer with a copy in flight
        self._hook: Any = None
        self._users = 0
        self._optimizers: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()

    def attach(self) -> None:
        """A writer that may overlap exists: hook every optimizer's step."""
        with self._lock:
            self._users += 1
            if self._hook is None:
                self._hook = register_optimizer_step_pre_hook(self._before_step)

    def detach(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users <= 0 and self._hook is not None:
                self._hook.remove()
                self._hook, self._users = None, 0
                self._optimizers = weakref.WeakSet()

    def owned(self) -> set[tuple[int, int]]:
        """(data_ptr, nbytes) of every tensor only ``optimizer.step()`` is expected to
        change: the parameters and per-parameter state of optimizers seen stepping."""
        out: set[tuple[int, int]] = set()
        for opt in list(self._optimizers):
            for group in opt.param_groups:
                for p in group["params"]:
                    out.add(_identity(p))
            for state in opt.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor):
                        out.add(_identity(value))
        return out

    def open(self, copy: BackgroundCopy) -> None:
        with self._lock:
            self._open.append(copy)
            _wrap_escape_hatches()

    def close(self, copy: BackgroundCopy) -> None:
        with self._lock:
            if copy in self._open:
                self._open.remove(copy)
                if not self._open:
                    _unwrap_escape_hatches()

    def wait_copied(self) -> None:
        for copy in list(self._open):
            copy.wait_copied()

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._optimizers.add(optimizer)
        for copy in list(self._open):
            copy.close_window()


def _identity(t: torch.Tensor) -> tuple[int, int]:
    return (t.data_ptr(), t.numel() * t.element_size())


WINDOW = _Window()

_BASE_DATA: Any = torch._C.TensorBase.data  # a getset descriptor: typed as what it returns
_BASE_NUMPY = torch._C.TensorBase.numpy


def _data_get(self: torch.Tensor) -> torch.Tensor:
    WINDOW.wait_copied()
    return _BASE_DATA.__get__(self)


def _data_set(self: torch.Tensor, value: torch.Tensor) -> None:
    WINDOW.wait_copied()
    _BASE_DATA.__set__(self, value)


def _numpy(self: torch.Tensor, *args: Any, **kwargs: Any) -> np.ndarray:
    WINDOW.wait_copied()
    return _BASE_NUMPY(self, *args, **kwargs)


def _wrap_escape_hatches() -> None:
    """``.data`` and ``.numpy()`` alias a tensor's memory without its version
    counter: while the window is open, reaching for them waits for the copy."""
    torch.Tensor.data = property(_data_get, _data_set)  # type: ignore[assignment]
    torch.Tensor.numpy = _numpy  # type: ignore[method-assign,assignment]


def _unwrap_escape_hatches() -> None:
    for name in ("data", "numpy"):
        if name in torch.Tensor.__dict__:
            delattr(torch.Tensor, name)
