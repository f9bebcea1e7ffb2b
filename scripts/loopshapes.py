#!/usr/bin/env python3
"""Loop-shape generator: random training programs, killed at random points, resumed,
and compared bit for bit with their uninterrupted twin.

    python scripts/loopshapes.py --programs 300 --seed 0 --json --jobs 2

Each program (scripts/loopshape_space.py draws it from its seed; the loop itself is
scripts/loopshape_program.py) runs once uninterrupted (the twin), then once more
with one to three kills in a row — SIGKILL at a step or in the epoch body, SIGTERM
to the process or its whole group during evaluation or a step, a crash at a named
point of a save (``GUARDIAN_FAULT``, e.g. between two commits), SIGKILL at a random
moment — and is re-run until it finishes. The finished run must equal the twin in
every model, optimizer and scheduler tensor and number, every RNG, ``g.extra``, the
final epoch/step and early-stopping state, and in the metrics it reported after
its last resume.

The same --seed draws the same programs and kill points; ``--program SEED`` (or a
program's JSON) re-runs one. With --json the last line is one JSON object:
programs, runs, kills, inexact, failures (seed, shape, kills, what differed), ...

Runs are forked from this pre-imported process (``--spawn fork``, the default:
torch is imported once and no torch operation ever runs in the parent, so each
child starts clean) or started as fresh interpreters (``--spawn fresh``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(SCRIPTS)
sys.path.insert(0, ROOT)
sys.path.insert(0, SCRIPTS)

from loopshape_space import describe_kill, draw_program  # noqa: E402

PROGRAM = os.path.join(SCRIPTS, "loopshape_program.py")
FAULT_EXIT = 86  # guardian/faults.py
REQUEUE_EXIT = 75
RUN_TIMEOUT = 300.0  # a run this long is hung (a healthy one takes about a second)
EXTRA_ATTEMPTS = 3  # re-runs after the last kill before "never finished"


@dataclass
class Run:
    """One process to start: the program, optionally a kill for this attempt."""

    program: dict[str, Any]
    run_dir: str
    out: str
    log: str
    kill: dict[str, Any] | None = None
    kill_after: float | None = None  # seconds: SIGKILL the group from outside


@dataclass
class Ended:
    code: int  # exit code, or -signal
    seconds: float
    timed_out: bool = False


@dataclass
class Outcome:
    program: dict[str, Any]
    runs: int = 0
    kills: int = 0
    not_reached: int = 0
    seconds: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    inexact: bool = False
    attempts: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------------- one program


def drive(program: dict[str, Any], work: str) -> Generator[Run, Ended, Outcome]:
    """The runs of one program, as a coroutine: yields what to start, receives how
    it ended, returns the verdict."""
    out = Outcome(program)
    base = os.path.join(work, f"p{program['seed']}")
    os.makedirs(base, exist_ok=True)
    twin = yield Run(program, f"{base}/twin", f"{base}/twin.json", f"{base}/twin.log")
    out.runs += 1
    out.seconds.append(twin.seconds)
    if twin.code != 0:
        out.problems.append(f"the uninterrupted run failed (exit {twin.code}): {_tail(f'{base}/twin.log')}")
        return out
    log = f"{base}/run.log"
    kills = list(program["kills"])
    finished = False
    for n in range(len(kills) + EXTRA_ATTEMPTS):
        kill = kills[n] if n < len(kills) else None
        kill_after = kill["fraction"] * twin.seconds if kill and kill["how"] == "moment" else None
        ended = yield Run(program, f"{base}/run", f"{base}/run.json", log, kill, kill_after)
        out.runs += 1
        out.seconds.append(ended.seconds)
        verdict = _judge_attempt(kill, ended)
        out.attempts.append(
            {"kill": describe_kill(kill) if kill else None, "exit": ended.code, "verdict": verdict}
        )
        if verdict == "killed":
            out.kills += 1
        elif verdict == "not reached":
            out.not_reached += 1
        elif verdict != "finished":
            out.problems.append(f"attempt {n + 1} ({out.attempts[-1]['kill']}): {verdict}: {_tail(log)}")
        if ended.code == 0:
            finished = True
            out.not_reached += sum(1 for k in kills[n + 1 :])
            break
    if not finished:
        out.problems.append(f"never finished after {out.runs - 1} attempts: {_tail(log)}")
        return out
    differences = compare(_load(f"{base}/twin.json"), _load(f"{base}/run.json"))
    if differences:
        out.inexact = True
        out.problems.extend(differences)
    return out


def _judge_attempt(kill: dict[str, Any] | None, ended: Ended) -> str:
    if ended.timed_out:
        return f"hung (no exit after {RUN_TIMEOUT:.0f} s)"
    if ended.code == 0:
        return "not reached" if kill else "finished"
    if kill is None:
        return f"exit {ended.code} without a kill"
    expected = {
        "sigkill": -signal.SIGKILL,
        "moment": -signal.SIGKILL,
        "fault": FAULT_EXIT,
        "sigterm": REQUEUE_EXIT,
    }[kill["how"]]
    if ended.code == expected:
        return "killed"
    return f"exit {ended.code} where {expected} was expected"


def compare(twin: dict[str, Any], final: dict[str, Any]) -> list[str]:
    """What differs between the twin's fingerprint and the resumed run's."""
    a, b = twin["state"], final["state"]
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    diffs = [f"{k}: twin {_short(a.get(k))} resumed {_short(b.get(k))}" for k in keys[:8]]
    if len(keys) > 8:
        groups: dict[str, int] = {}
        for k in keys:
            groups[k.split("/")[0]] = groups.get(k.split("/")[0], 0) + 1
        diffs.append(f"{len(keys)} values differ in all: {groups}")
    epoch = final["start"]["epoch"]
    later_twin = [r for r in twin["reports"] if r["epoch"] > epoch]
    later_final = [r for r in final["reports"] if r["epoch"] > epoch]
    if later_twin != later_final:
        diffs.append(f"metrics reported after epoch {epoch} differ: twin {later_twin} resumed {later_final}")
    same_twin = [r for r in twin["reports"] if r["epoch"] == epoch]
    same_final = [r for r in final["reports"] if r["epoch"] == epoch]
    if same_final and same_twin[len(same_twin) - len(same_final) :] != same_final:
        diffs.append(
            f"metrics reported in epoch {epoch} after the resume are not the twin's: "
            f"twin {same_twin} resumed {same_final}"
        )
    return diffs


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _load(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def _tail(path: str, lines: int = 4) -> str:
    try:
        with open(path, errors="replace") as f:
            text = f.read().strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:])[-600:]


# ---------------------------------------------------------------------- processes


class Child:
    """A started run: its pid (also its process group), a pidfd to wait on."""

    def __init__(self, run: Run, pid: int, popen: subprocess.Popen | None = None) -> None:
        self.run, self.pid, self.popen = run, pid, popen
        self.fd = os.pidfd_open(pid)
        self.started = time.monotonic()
        self.kill_at = self.started + run.kill_after if run.kill_after is not None else None
        self.deadline = self.started + RUN_TIMEOUT
        self.timed_out = False

    def next_event(self) -> float:
        return min(t for t in (self.kill_at, self.deadline) if t is not None)

    def on_time(self, now: float) -> None:
        if self.kill_at is not None and now >= self.kill_at:
            self.kill_at = None
            _killpg(self.pid)
        if now >= self.deadline:
            self.timed_out = True
            self.deadline = float("inf")
            _killpg(self.pid)

    def reap(self) -> Ended:
        if self.popen is not None:
            code = self.popen.wait()
        else:
            _, status = os.waitpid(self.pid, 0)
            code = os.waitstatus_to_exitcode(status)
        os.close(self.fd)
        _killpg(self.pid)  # DataLoader workers the kill left behind
        return Ended(code, time.monotonic() - self.started, self.timed_out)


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _child_env(run: Run) -> dict[str, str]:
    env = {"GUARDIAN_QUIET": "0", "GUARDIAN_FAULT": ""}
    if run.kill and run.kill["how"] == "fault":
        env["GUARDIAN_FAULT"] = f"{run.kill['point']}@{run.kill['nth']}"
    return env


def start_fresh(run: Run) -> Child:
    with open(run.log, "ab") as log:
        popen = subprocess.Popen(
            [
                sys.executable,
                PROGRAM,
                json.dumps(run.program["shape"]),
                json.dumps(run.kill),
                run.run_dir,
                run.out,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **_child_env(run)},
            start_new_session=True,
        )
    return Child(run, popen.pid, popen)


def start_forked(run: Run) -> Child:
    import loopshape_program  # already imported by main() before any child exists

    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return Child(run, pid)
    code = 1
    try:
        os.setsid()
        fd = os.open(run.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.environ.update(_child_env(run))
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        code = loopshape_program.run(run.program["shape"], run.kill, run.run_dir, run.out)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - the child's whole life: report, then exit 1
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def run_all(
    programs: list[dict[str, Any]],
    work: str,
    jobs: int,
    spawn: str,
    progress: bool = True,
    keep: bool = False,
) -> list[Outcome]:
    """Drive every program with at most ``jobs`` runs at a time; single-threaded, so
    forking from this process is safe."""
    start = start_forked if spawn == "fork" else start_fresh
    queue = list(programs)
    outcomes: list[Outcome] = []
    active: dict[int, tuple[Generator[Run, Ended, Outcome], Child]] = {}  # pidfd -> (driver, child)

    def launch(driver: Generator[Run, Ended, Outcome], request: Run) -> None:
        child = start(request)
        active[child.fd] = (driver, child)

    def finish(outcome: Outcome) -> None:
        outcomes.append(outcome)
        if progress:
            state = "INEXACT" if outcome.inexact else ("FAILED" if outcome.problems else "exact")
            print(
                f"[{len(outcomes)}/{len(programs)}] seed {outcome.program['seed']}: {state}, "
                f"{outcome.kills} kill(s), {outcome.runs} runs",
                file=sys.stderr,
                flush=True,
            )
        if not keep:
            shutil.rmtree(os.path.join(work, f"p{outcome.program['seed']}"), ignore_errors=True)

    while queue or active:
        while queue and len(active) < jobs:
            driver = drive(queue.pop(0), work)
            launch(driver, next(driver))
        now = time.monotonic()
        timeout = max(0.0, min(c.next_event() for _, c in active.values()) - now)
        ready, _, _ = select.select(list(active), [], [], timeout)
        now = time.monotonic()
        for _, child in active.values():
            child.on_time(now)
        for fd in ready:
            driver, child = active.pop(fd)
            ended = child.reap()
            try:
                launch(driver, driver.send(ended))
            except StopIteration as stop:
                finish(stop.value)
    return outcomes


# ---------------------------------------------------------------------- command line


def program_seeds(seed: int, count: int) -> list[int]:
    return [random.Random(f"loopshapes:{seed}:{i}").getrandbits(32) for i in range(count)]


def parse_program(arg: str) -> dict[str, Any]:
    """``--program`` takes a program seed, or a program's JSON: seed, shape and kills
    (a failure entry of the summary is one)."""
    if arg.strip().isdigit():
        return draw_program(int(arg))
    program = json.loads(arg)
    return {"seed": program.get("seed", 0), "shape": program["shape"], "kills": program["kills"]}


def summarize(outcomes: list[Outcome], seconds: float, spawn: str) -> dict[str, Any]:
    runs = [s for o in outcomes for s in o.seconds]
    failures = [
        {
            "seed": o.program["seed"],
            "shape": o.program["shape"],
            "kills": o.program["kills"],
            "kills_described": [describe_kill(k) for k in o.program["kills"]],
            "attempts": o.attempts,
            "inexact": o.inexact,
            "what": o.problems,
        }
        for o in outcomes
        if o.problems
    ]
    return {
        "programs": len(outcomes),
        "runs": len(runs),
        "kills": sum(o.kills for o in outcomes),
        "kills_not_reached": sum(o.not_reached for o in outcomes),
        "exact": sum(1 for o in outcomes if not o.problems),
        "inexact": sum(1 for o in outcomes if o.inexact),
        "failures": failures,
        "results": [
            {"seed": o.program["seed"], "kills": o.kills, "runs": o.runs, "exact": not o.problems}
            for o in outcomes
        ],
        "seconds": round(seconds, 1),
        "seconds_per_run": round(sum(runs) / len(runs), 3) if runs else None,
        "spawn": spawn,
    }


def shrink(failure: dict[str, Any], spawn: str) -> dict[str, Any]:
    """The smallest program one feature at a time away from a failing one (see
    loopshape_minimize.py), with what it still gets wrong."""
    from loopshape_minimize import minimize

    program = {"seed": failure["seed"], "shape": failure["shape"], "kills": failure["kills"]}
    work = tempfile.mkdtemp(prefix="loopshapes-min-")
    last: list[Outcome] = []

    def fails(candidate: dict[str, Any]) -> bool:
        outcome = run_all([candidate], work, 2, spawn, progress=False)[0]
        if outcome.problems:
            last[:] = [outcome]
        return bool(outcome.problems)

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    say(f"minimizing seed {failure['seed']}")
    try:
        small = minimize(program, fails, say)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"seed": failure["seed"], "program": small, "what": last[0].problems if last else failure["what"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--programs", type=int, default=20, help="how many programs to draw")
    p.add_argument("--seed", type=int, default=0, help="draws the programs and their kills")
    p.add_argument("--program", action="append", default=[], help="run this program (a seed or JSON) instead")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--spawn", choices=("fork", "fresh"), default="fork")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, run directories)")
    p.add_argument(
        "--minimize",
        action="store_true",
        help="shrink each failing program to a smallest one that still fails",
    )
    a = p.parse_args(argv)
    if a.program:
        programs = [parse_program(x) for x in a.program]
    else:
        programs = [draw_program(s) for s in program_seeds(a.seed, a.programs)]
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")  # before numpy/torch: one thread per run, --jobs runs at a time
    if a.spawn == "fork":
        import loopshape_program  # imported once, before the first fork

        loopshape_program.warm_imports()
    work = tempfile.mkdtemp(prefix="loopshapes-")
    t0 = time.monotonic()
    try:
        outcomes = run_all(programs, work, max(1, a.jobs), a.spawn, keep=a.keep)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    summary = summarize(outcomes, time.monotonic() - t0, a.spawn)
    if a.keep:
        summary["work"] = work
    if a.minimize:
        summary["minimized"] = [shrink(f, a.spawn) for f in summary["failures"]]
    print(json.dumps(summary) if a.json else json.dumps(summary, indent=1))
    return 0 if not summary["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
