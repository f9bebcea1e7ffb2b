"""Supervised multi-process jobs: the torchrun command line and what torchrun's exit means.

``guardian run --nproc-per-node N -- train.py ARGS`` registers::

    PYTHON -m torch.distributed.run --standalone --nproc-per-node N --max-restarts=0 train.py ARGS

``--max-restarts=0`` on purpose: one restart budget (guardian's), not two nested ones
that multiply. ``PYTHON`` is the interpreter guardian runs under, so the ranks use the
same environment; the daemon itself never imports torch (torchrun is a subprocess).

torchrun exits 1 whenever any worker fails — also when every rank exited 75 after
checkpointing on request. Its failure summary on stderr lists each failed rank's exit
code (``exitcode  : 75 (pid: 1234)``), and rank 0's ``run.json`` holds the library's
own word (``preempted``). ``classify_ranks`` combines both: a requeue only if no rank
ended any other way, so a rank killed by SIGKILL is a crash even when the surviving
ranks, sent SIGTERM by torchrun, checkpointed and exited 75.
"""

from __future__ import annotations

import os
import re
import sys

from ..errors import EXIT_REQUEUE

TORCHRUN_MODULE = "torch.distributed.run"
_FAILURE_HEADER = re.compile(r"^\S.* FAILED\s*$")
_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)")
_EXITCODE = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)")
_PYTHON = re.compile(r"^python(\d+(\.\d+)?)?$")


def torchrun_argv(nproc: int, command: list[str], python: str | None = None) -> list[str]:
    """The launcher command for ``command`` on ``nproc`` local ranks.

    ``command`` may be ``train.py ARGS``, ``python train.py ARGS``, ``python -m pkg ARGS``
    or any executable (passed with ``--no-python``), mirroring what torchrun accepts.
    """
    if nproc < 1:
        raise ValueError(f"--nproc-per-node {nproc}: expected at least 1")
    head = [
        python or sys.executable,
        "-m",
        TORCHRUN_MODULE,
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "--max-restarts=0",
    ]
    return head + script_args(list(command))


def script_args(command: list[str]) -> list[str]:
    """torchrun's trailing arguments: the script (or ``-m module`` / ``--no-python cmd``)."""
    if not command:
        raise ValueError("no command given after --")
    if _PYTHON.match(os.path.basename(command[0])):
        command = command[1:]
        if not command:
            raise ValueError("a python interpreter with no script: give train.py or -m MODULE")
        return command  # "train.py ARGS" or "-m module ARGS": torchrun takes both as is
    if command[0] == "-m" or command[0].endswith(".py"):
        return command
    return ["--no-python", *command]


def rank_exits(stderr_lines: list[str]) -> dict[int, int]:
    """Each failed rank's exit code from torchrun's last failure summary (rank → code).

    Negative codes are signals (-9: SIGKILL), as torchrun prints them. The "Root Cause
    (first observed failure)" rank comes first. Empty when no summary is found
    (torchrun itself was killed, or the log was cut).
    """
    start = None
    for i, line in enumerate(stderr_lines):
        if _FAILURE_HEADER.match(line):
            start = i
    if start is None:
        return {}
    root: dict[int, int] = {}
    others: dict[int, int] = {}
    into, rank = others, None
    for line in stderr_lines[start:]:
        if line.startswith("Root Cause"):
            into = root
        m = _RANK.match(line)
        if m:
            rank = int(m.group(1))
            continue
        m = _EXITCODE.match(line)
        if m and rank is not None:
            into[rank] = int(m.group(1))
            rank = None
    return {**root, **{r: c for r, c in others.items() if r not in root}}


def classify_ranks(exits: dict[int, int], run_state: str | None) -> tuple[bool, str]:
    """(requeue?, why) for a torchrun that exited non-zero.

    Requeue when every reported rank exited 75, or when no summary could be read and
    rank 0's run.json says ``preempted``. Any other rank exit makes it a crash.
    """
    others = {r: c for r, c in exits.items() if c != EXIT_REQUEUE}
    if others:
        r, c = next(iter(others.items()))  # the root cause when torchrun named one
        how = f"killed by signal {-c}" if c < 0 else f"exit {c}"
        return False, f"rank {r} {how}" + (
            f" (and {len(others) - 1} more rank(s))" if len(others) > 1 else ""
        )
    if exits:
        return True, f"all {len(exits)} failed rank(s) exited 75: checkpointed on request; restarting now"
    if run_state == "preempted":
        return (
            True,
            "torchrun failed but rank 0's run.json says preempted (the library's word); restarting now",
        )
    return False, "torchrun exited without a readable failure summary"
