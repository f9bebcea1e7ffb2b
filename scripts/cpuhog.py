#!/usr/bin/env python3
"""Keep N cores busy, to run tests the way a loaded server runs them.

    python scripts/cpuhog.py N &   # then run the tests; kill %1 (or let the shell exit)

Starts N CPU-bound processes. They stop when this script gets SIGTERM/SIGINT or when
its parent (the shell or CI step that started it) dies: every hog asks the kernel for
SIGKILL when this script dies (PR_SET_PDEATHSIG), and this script polls its own
parent. Nothing is left behind.
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing as mp
import os
import signal
import sys
import time

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the parent's SIGTERM handler still stops us


def _spin(parent: int) -> None:
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before prctl took effect
        return
    x = 0
    while True:
        x = (x * 1103515245 + 12345) & 0xFFFFFFFF


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int, help="busy processes to start")
    n = ap.parse_args().n
    me, parent = os.getpid(), os.getppid()
    hogs = [mp.Process(target=_spin, args=(me,), daemon=True) for _ in range(n)]
    for h in hogs:
        h.start()

    def stop(*_: object) -> None:
        for h in hogs:
            h.kill()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"cpuhog: {n} busy process(es) {[h.pid for h in hogs]}; stop with kill {me}", flush=True)
    while os.getppid() == parent:
        time.sleep(0.5)
    stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
