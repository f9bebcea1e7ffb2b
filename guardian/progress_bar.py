"""Progress bars for long command-line work (``verify`` of a large checkpoint,
``migrate apply``, weight export) — on a terminal, and nowhere else.

A caller gets a function to report bytes done; when no bar is shown it does nothing,
so the work's code is the same either way::

    with progress_bar(total_bytes, "verifying", enabled=not as_json) as advance:
        reader.inspect_checkpoint(path, progress=advance)

No bar when the output is piped or redirected (stdout or stderr is not a terminal),
with ``--json`` (``enabled=False``), or when ``tqdm`` is not installed: scripts and
logs see exactly what they saw before. The bar is drawn on stderr and erased at the
end, so the command's own output is unchanged on a terminal too.

Why tqdm and not rich: one small pure-Python package without dependencies of its own,
a byte-rate bar with ETA out of the box, and nothing else guardian would use from
rich (tables, markup) — the CLI prints plain text that reads the same piped.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

Advance = Callable[[int], Any]


def _ignore(_n: int) -> None:
    return None


def on_terminal() -> bool:
    """True when both stdout and stderr are terminals (nothing is piped or redirected)."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def _width() -> dict[str, Any]:
    """Follow the terminal's width; a terminal that reports none (a bare pty) gets 80
    columns — tqdm would otherwise draw an empty bar."""
    try:
        columns = os.get_terminal_size(sys.stderr.fileno()).columns
    except OSError:
        columns = 0
    return {"dynamic_ncols": True} if columns else {"ncols": 80}


@contextmanager
def progress_bar(total: int, description: str, *, enabled: bool = True, unit: str = "B") -> Iterator[Advance]:
    """Yield ``advance(n)``: report ``n`` more units done (bytes by default).
    See the module docstring for when a bar is drawn."""
    if not (enabled and total > 0 and on_terminal()):
        yield _ignore
        return
    try:
        from tqdm import tqdm
    except ImportError:
        yield _ignore
        return
    scaled = unit == "B"
    bar = tqdm(
        total=total,
        desc=description,
        unit=unit,
        unit_scale=scaled,
        unit_divisor=1024 if scaled else 1000,
        file=sys.stderr,
        leave=False,
        **_width(),
        mininterval=0.2,
    )
    try:
        yield bar.update
    finally:
        bar.close()
