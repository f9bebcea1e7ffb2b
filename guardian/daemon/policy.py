"""Restart policy: what an exit means, and whether, when and from where to restart.

Pure functions over plain data, so every rule is unit-tested without processes.

Classifications
    done        run.json says finished and the exit code is 0.
    incomplete  exit 0 without the finished marker: reported, never restarted (we do
                not guess whether the user's script meant to stop).
    requeue     exit 75: checkpointed on request. Restart now; no budget used.
    permanent   exit 78, or a deterministic Python error (SyntaxError, ImportError,
                NameError, TypeError, ...) raised before any new checkpoint: the next
                attempt would fail the same way, so restarting only burns GPU hours.
    unrunnable  exit 126/127 or the shim could not start the command (not found, not
                executable): not a crash — the job is held with the reason.
    hang        killed by the daemon after the heartbeat stopped while its processes
                were alive (never decided for an attempt that exited on its own).
    crash       anything else (a signal, the OOM killer, an exception after progress).
    reboot      the host went down under the job: resume; no budget used.

A torchrun job (``nproc`` set) exits 1 whatever its ranks did; ``launch.classify_ranks``
reads the ranks' own exits: all 75 → requeue, any rank killed or failing → crash.
"""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass

from ..errors import EXIT_NEVER_RETRY, EXIT_OK, EXIT_REQUEUE
from . import launch
from .knobs import Knobs

DETERMINISTIC_ERRORS = frozenset(
    {
        "SyntaxError",
        "IndentationError",
        "TabError",
        "ImportError",
        "ModuleNotFoundError",
        "NameError",
        "UnboundLocalError",
        "TypeError",
        "AttributeError",
        "NotImplementedError",
        "StateMismatchError",
        "NothingToProtectError",
        "UnsupportedStateError",
        "RunLockedError",
    }
)
# torchrun's own traceback after a rank fails: the rank's error, logged above it, is the cause.
# The shell's (and the shim's) "could not run it": a restart would fail the same way.
UNRUNNABLE_EXITS = {126: "the command is not executable", 127: "the command was not found"}
LAUNCHER_ERRORS = frozenset({"ChildFailedError"})
# "Traceback ...\n  ...\nsome.module.NameError: message" — the last such line of stderr.
_EXC_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Z]\w*(?:Error|Exception|Exit|Interrupt))(?::|$)")


@dataclass
class ExitFacts:
    """Everything known about how one attempt ended."""

    exit_code: int | None  # None: unknown (the shim died too)
    signal: str | None
    run_state: str | None  # from run.json, if written by this attempt
    error_type: str | None
    made_progress: bool  # a newer valid checkpoint appeared during the attempt
    hung: bool = False
    stop_requested: bool = False
    nproc: int | None = None  # ranks under torchrun (guardian run --nproc-per-node), else None
    rank_exits: dict[int, int] | None = None  # torchrun's failure summary: rank → exit code
    rank_detail: str | None = None  # filled by classify: which rank ended how
    spawn_error: str | None = None  # the shim could not start the command (its OSError)


@dataclass
class Verdict:
    classification: str
    reason: str
    uses_budget: bool = False
    restart: bool = False


def error_type_from_stderr(lines: list[str]) -> str | None:
    """The exception class of the last traceback in ``lines`` (un-indented line).

    torchrun's ``ChildFailedError`` is skipped: the failing rank's traceback precedes it.
    """
    for line in reversed(lines):
        m = _EXC_LINE.match(line.strip()) if line and not line[0].isspace() else None
        if m and m.group(1) not in LAUNCHER_ERRORS:
            return m.group(1)
    return None


def classify(f: ExitFacts) -> Verdict:
    if f.stop_requested:
        return Verdict("stopped", "stopped on request (guardian stop)")
    unrunnable = UNRUNNABLE_EXITS.get(f.exit_code) if f.exit_code is not None else None
    if f.spawn_error or unrunnable:
        why = f.spawn_error or unrunnable
        return Verdict(
            "unrunnable",
            f"exit {f.exit_code}: {why}; fix the command, then `guardian run --replace`",
        )
    if f.exit_code == EXIT_OK:
        if f.run_state == "finished":
            return Verdict("done", "exited 0 and run.json says finished")
        return Verdict(
            "incomplete",
            f"exited 0 but run.json says {f.run_state or 'nothing'} "
            "(no 'finished' marker); not restarting — check the script",
        )
    if f.exit_code == EXIT_REQUEUE:
        return Verdict("requeue", "exit 75: checkpointed on request; restarting now", restart=True)
    if f.exit_code == EXIT_NEVER_RETRY:
        return Verdict("permanent", "exit 78: the job asked never to be retried")
    if f.hung:
        return Verdict("hang", "killed after its heartbeat stopped", uses_budget=True, restart=True)
    if f.nproc and f.exit_code not in (None, EXIT_OK):
        requeue, why = launch.classify_ranks(f.rank_exits or {}, f.run_state)
        if requeue:
            return Verdict("requeue", f"torchrun exit {f.exit_code}: {why}", restart=True)
        f = dataclasses.replace(f, signal=None, rank_detail=why)
    if f.error_type in DETERMINISTIC_ERRORS and not f.made_progress:
        return Verdict(
            "permanent",
            f"{f.error_type} before any new checkpoint: deterministic, a restart would fail the same way",
        )
    if f.exit_code is None and f.run_state == "finished":
        return Verdict("done", "exit status unknown (shim gone) but run.json says finished")
    if f.exit_code is None and f.run_state == "preempted":
        return Verdict("requeue", "exit status unknown (shim gone); run.json says preempted", restart=True)
    return Verdict("crash", _crash_reason(f), uses_budget=True, restart=True)


def _crash_reason(f: ExitFacts) -> str:
    if f.rank_detail:
        what = f" ({f.error_type})" if f.error_type else ""
        return f"torchrun exit {f.exit_code}: {f.rank_detail}{what}"
    how = (
        f"killed by {f.signal}"
        if f.signal
        else ("exit status unknown" if f.exit_code is None else f"exit code {f.exit_code}")
    )
    what = f" ({f.error_type})" if f.error_type else ""
    return f"{how}{what}"


def give_up_reason(
    failures: int, failure_times: list[float], attempts: int, now: float, k: Knobs
) -> str | None:
    """Why not to restart after a budget-using failure, or None to go on."""
    if failures >= k.max_failures:
        return f"{failures} failures without a newer valid checkpoint (limit {k.max_failures})"
    recent = [t for t in failure_times if now - t <= k.thrash_window]
    if len(recent) >= k.thrash_count:
        return f"thrashing: {len(recent)} failures within {k.thrash_window:.0f} s"
    if attempts >= k.max_restarts:
        return f"hard cap of {k.max_restarts} attempts reached"
    return None


def requeue_delay(requeues: int, k: Knobs, rng: random.Random | None = None) -> float:
    """Delay before restarting after the ``requeues``-th exit 75 in a row (counts from 1).

    The first requeue restarts at once (a preemption that checkpointed); a job that
    keeps exiting 75 without a newer checkpoint backs off like a crash, so it cannot
    spin through attempts.
    """
    return 0.0 if requeues <= 1 else backoff(requeues - 1, k, rng)


def requeue_limit_reason(requeues: int, k: Knobs) -> str | None:
    if requeues >= k.max_requeues:
        return f"{requeues} requeues (exit 75) in a row without a newer valid checkpoint (limit {k.max_requeues})"
    return None


def hang_limit_reason(hangs: int) -> str | None:
    """Two hangs without a newer checkpoint in between: a third try would hang too.

    Counted per hang decision, not by comparing the heartbeat's step (the library
    throttles heartbeats, so two hangs at one step can report different steps).
    """
    return f"hung {hangs} times without a newer valid checkpoint" if hangs >= 2 else None


def backoff(failures: int, k: Knobs, rng: random.Random | None = None) -> float:
    """``base × 2^(failures-1)``, capped, ± jitter. ``failures`` counts from 1."""
    delay = min(k.backoff_max, k.backoff_base * (2 ** max(0, failures - 1)))
    jitter = (rng or random).uniform(-k.backoff_jitter, k.backoff_jitter)
    return max(0.0, delay * (1.0 + jitter))


def should_step_back(resume_points: list[str | None], progress: list[bool]) -> bool:
    """The last two attempts started from the same checkpoint and both died without progress.

    That checkpoint may hold a poisoned state (NaNs, a batch that always crashes);
    resuming once from the one before it is worth a try.
    """
    if len(resume_points) < 2 or resume_points[-1] is None:
        return False
    return resume_points[-1] == resume_points[-2] and not progress[-1] and not progress[-2]
