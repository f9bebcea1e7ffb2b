"""Reconciliation: what became of a job that was running when the daemon last ran.

Decided from durable facts only, in this order (the power-loss path):

1. the shim wrote exit.json              → the attempt ended: classify it as usual.
2. the attempt's boot id ≠ this boot     → the host went down under it: resume,
                                           without using the crash budget.
3. shim or job alive, create time matches → adopt it and keep watching.
4. no pid was recorded                   → look for the shim by its attempt directory
                                           on a command line; adopt it if found, else
                                           it never started: start it (no budget).
5. recorded processes are gone, no exit record → one crash.
6. anything we may not look at            → hold the job and say why.

Rule 2 precedes 3 because after a reboot recorded pids are meaningless (another
process may now own them). No rule ever starts a job whose process may still live.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil

from .procs import ProcId, Unknowable, is_alive
from .registry import Attempt
from .shim import EXIT_FILE


@dataclass
class Decision:
    action: str  # finished | reboot | adopt | hold
    reason: str
    shim: ProcId | None = None


def decide(a: Attempt, boot: str, attempt_dir: str) -> Decision:
    if os.path.exists(os.path.join(attempt_dir, EXIT_FILE)):
        return Decision("finished", f"attempt {a.n} ended while the daemon was away; its exit was recorded")
    if a.boot_id != boot:
        return Decision(
            "reboot",
            f"host rebooted while attempt {a.n} was running "
            f"(boot {a.boot_id[:8]} → {boot[:8]}); resuming without using the crash budget",
        )
    shim, child = ProcId.from_dict(a.shim), ProcId.from_dict(a.child)
    try:
        alive = shim if is_alive(shim) else child if is_alive(child) else None
        if alive is not None:
            who = shim or alive
            return Decision(
                "adopt", f"attempt {a.n} still running (pid {who.pid}, create time matches); adopted", shim
            )
        if shim is None and child is None:
            return _find_unrecorded(a, attempt_dir)
    except Unknowable as e:
        return Decision(
            "hold",
            f"cannot tell whether attempt {a.n} still runs ({e}); held — "
            "check with ps, then `guardian stop` or `guardian run --replace`",
        )
    return Decision("finished", f"attempt {a.n}'s processes are gone and left no exit record: a crash")


def _find_unrecorded(a: Attempt, attempt_dir: str) -> Decision:
    """The daemon died between recording attempt N and learning its pid."""
    for p in psutil.process_iter(["pid", "cmdline", "create_time"]):
        cmd = p.info.get("cmdline") or []
        if "guardian.daemon.shim" in cmd and attempt_dir in cmd:
            return Decision(
                "adopt",
                f"attempt {a.n} found running as pid {p.pid} (its pid had not been recorded); adopted",
                ProcId(p.pid, p.info["create_time"]),
            )
    return Decision(
        "reboot",
        f"attempt {a.n} was being started when the daemon stopped and never ran; "
        "starting it (no crash budget used)",
    )
