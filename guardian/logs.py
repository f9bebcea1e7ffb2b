"""How guardian's log lines reach a person.

guardian logs through ``logging.getLogger(__name__)`` in every module, under the
``guardian`` package logger, which carries a ``NullHandler`` (a library stays silent
unless asked). At 3 a.m. the log is all a user has, though, so ``protect()`` adds one
stderr handler that prints guardian's INFO lines *only while the application has no
logging configured*: once the application configures the root logger — before or
after ``protect()`` — lines propagate to the application's handlers instead and are
never printed twice. ``GUARDIAN_QUIET=1`` turns the stderr handler off.
"""

from __future__ import annotations

import logging
import sys

from . import knobs


class _StderrUnlessConfigured(logging.StreamHandler):
    """Shows guardian's lines on stderr while the application has no logging set up,
    and steps aside (lines propagate to the application's handlers instead) as soon as
    it configures the root logger — at any time, so no line is ever printed twice."""

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)


def ensure_visible_logging() -> None:
    """At 3 a.m. the log is all the user has: show guardian's INFO lines on stderr
    unless the application configured logging itself (or GUARDIAN_QUIET is set)."""
    package = logging.getLogger("guardian")
    if knobs.quiet() or any(isinstance(h, _StderrUnlessConfigured) for h in package.handlers):
        return
    handler = _StderrUnlessConfigured(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s guardian: %(message)s", "%H:%M:%S"))
    package.addHandler(handler)
    if package.level == logging.NOTSET:
        package.setLevel(logging.INFO)
