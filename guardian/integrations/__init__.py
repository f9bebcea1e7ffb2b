"""guardian inside other people's training loops.

Each module imports its framework on first use only, so ``import guardian`` never
imports Lightning or Transformers; a missing framework is an ``ImportError`` that
names the ``pip install`` that fixes it.

* ``guardian.integrations.lightning.GuardianCallback`` — one object in ``Trainer(callbacks=[…])``.
* ``guardian.integrations.transformers.GuardianCallback`` — one object in HF's
  ``Trainer(callbacks=[…])``.
"""

from __future__ import annotations

from typing import TypedDict

from ..policies import Mode


def missing(framework: str, extra: str, package: str, error: ImportError) -> ImportError:
    """The ImportError an integration raises when its framework is not installed."""
    return ImportError(
        f"guardian's {framework} integration needs {package}, which is not installed here "
        f"({error}). Fix: pip install 'torch-guardian[{extra}]'  (or: pip install {package})"
    )


class ProtectOptions(TypedDict):
    """The ``protect()`` keywords an integration's callback passes, typed as
    ``protect()`` takes them (``guardian.protect(components, dir=..., **options)``)."""

    every_steps: int | None
    every_epochs: int | None
    monitor: str | None
    mode: Mode
    min_delta: float
    keep_last: int | None
    keep_best: int
    async_save: bool
    strict: bool


def protect_options(
    every_steps: int | None,
    *,
    monitor: str | None,
    mode: Mode,
    min_delta: float,
    keep_last: int | None,
    keep_best: int,
    async_save: bool,
    strict: bool,
) -> ProtectOptions:
    """The ``protect()`` options of an integration's callback: the framework's own
    step cadence, and no epoch saves from ``g.epochs()`` — the callbacks take those
    themselves, once the framework's epoch (evaluation included) has run to its end.
    The policy values are passed through as given; ``protect()`` validates them."""
    return ProtectOptions(
        every_steps=every_steps,
        every_epochs=None,
        monitor=monitor,
        mode=mode,
        min_delta=min_delta,
        keep_last=keep_last,
        keep_best=keep_best,
        async_save=async_save,
        strict=strict,
    )
