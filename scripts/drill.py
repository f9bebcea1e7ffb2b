#!/usr/bin/env python3
"""Kill drill: SIGKILL real training runs at random moments and prove nothing is lost.

Each trial starts a training subprocess (tests/trainlib.py: dropout, BatchNorm, a
shuffling loader, AdamW + OneCycle, and a ballast layer that makes every save take
long enough to be hit), kills its whole process group with SIGKILL — half the
trials at a random moment, half the moment the run announces a save — then runs
the same command again to completion and checks:

  (a) a valid checkpoint was available to resume from (once one had been committed),
  (b) every checkpoint the run had reported as committed before the kill still
      verifies (retention is off, so nothing may disappear — except a checkpoint
      superseded by a later one of the same step: guardian keeps one per step),
  (c) the final state is bit-for-bit equal to an uninterrupted run.

    python scripts/drill.py --trials 100 --json
    python scripts/drill.py --trials 40 --faults --json

``--faults`` replaces the timed kills by crashes at named points of the commit
protocol (``GUARDIAN_FAULT=<point>@<n>``, drawn from --seed over every save the
uninterrupted run makes): the same seed kills at the same instruction every time, so a
trial that fails is reproduced from its seed. A trial that is not exact names the
checkpoint it resumed from and the components whose digests differ.

With --json the last line is one JSON object: trials, kills_during_save,
lost_checkpoints, resumed_exact, failures (one entry per failed check).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from guardian.faults import FAULT_EXIT_CODE, POINTS  # noqa: E402
from guardian.format import reader  # noqa: E402
from guardian.format.layout import parse_checkpoint_name  # noqa: E402
from guardian.runfiles import read_heartbeat  # noqa: E402

JOB = os.path.join(ROOT, "tests", "trainlib.py")
SAVED = re.compile(r"saved (step-\d+(?:-\d+)?) ")


def job_config(ballast: int) -> dict[str, Any]:
    return {
        "optimizer": "adamw",
        "scheduler": "onecycle",
        "epochs": 3,
        "samples": 96,
        "batch_size": 8,
        "every_steps": 2,
        "ballast": ballast,
        "num_workers": 0,
        "keep_last": None,
    }  # retention off: every committed checkpoint must still be there


def start(run_dir: str, cfg: dict[str, Any], log_path: str, fault: str = "") -> subprocess.Popen:
    env = {**os.environ, "GUARDIAN_HEARTBEAT_INTERVAL": "0", "GUARDIAN_QUIET": "0", "GUARDIAN_FAULT": fault}
    log = open(log_path, "ab")
    return subprocess.Popen(
        [sys.executable, JOB, run_dir, json.dumps(cfg)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def digests(run_dir: str) -> dict[str, str]:
    """Per-component digests of the newest valid checkpoint ({} if there is none)."""
    info = reader.newest_valid(run_dir)
    if info is None:
        return {}
    return {k: v["digest"] for k, v in reader.component_summaries(info.path, info.manifest).items()}


def digest(run_dir: str) -> str | None:
    info = reader.newest_valid(run_dir)
    if info is None:
        return None
    return reader.checkpoint_digest(reader.component_summaries(info.path, info.manifest))


def reference(cfg: dict[str, Any], work: str) -> tuple[dict[str, str], float, int]:
    """(component digests, seconds, number of saves) of the uninterrupted run."""
    run, log = os.path.join(work, "reference"), os.path.join(work, "reference.log")
    t0 = time.monotonic()
    proc = start(run, cfg, log)
    if proc.wait() != 0:
        sys.exit(f"reference run failed; see {work}/reference.log")
    with open(log, errors="replace") as f:
        saves = len(SAVED.findall(f.read()))
    return digests(run), time.monotonic() - t0, saves


def _saving(run_dir: str) -> bool:
    try:
        return any(n.startswith(".tmp-") for n in os.listdir(run_dir))
    except FileNotFoundError:
        return False


def kill_when(proc: subprocess.Popen, run_dir: str, deadline: float, on_save: bool, min_step: int) -> None:
    """SIGKILL the group at ``deadline`` or, with ``on_save``, the moment a save is in
    progress (its temp directory exists) at or after ``min_step``."""
    while proc.poll() is None:
        now = time.monotonic()
        if on_save:
            if _saving(run_dir):
                hb = read_heartbeat(run_dir)
                if hb and hb.get("step", 0) >= min_step:
                    break
            if now > deadline + 30:
                break
        elif now >= deadline:
            break
        time.sleep(0.0005)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _superseded(name: str, present: dict[str, Any]) -> bool:
    """A checkpoint the guard deleted because a newer one of the same step holds all its
    reasons (guardian keeps one checkpoint per step, retention or not)."""
    step = parse_checkpoint_name(name)
    return (
        name not in present
        and step is not None
        and any(
            c.valid and c.manifest.step == step[0] and c.name != name and parse_checkpoint_name(c.name)
            for c in present.values()
        )
    )


SAVE_POINTS = tuple(p for p in POINTS if p.startswith("save."))
RESUMED = re.compile(r"resumed from (\S+)")


def trial(
    i: int,
    rng: random.Random,
    cfg: dict[str, Any],
    ref: dict[str, str],
    ref_seconds: float,
    work: str,
    **how: Any,
) -> dict[str, Any]:
    run, log = os.path.join(work, f"trial-{i:04d}"), os.path.join(work, f"trial-{i:04d}.log")
    result: dict[str, Any] = {"trial": i, "failures": [], "lost": 0}
    if how.get("faults"):
        fault = f"{rng.choice(SAVE_POINTS)}@{rng.randint(1, how['saves'])}"
        proc = start(run, cfg, log, fault=fault)
        proc.wait()
        killed = proc.returncode == FAULT_EXIT_CODE
        result.update(kill=fault, killed=killed, during_save=killed)
    else:
        on_save = i % 2 == 1
        proc = start(run, cfg, log)
        kill_when(proc, run, time.monotonic() + rng.uniform(0.3, ref_seconds), on_save, rng.randint(1, 30))
        killed = proc.returncode == -signal.SIGKILL
        during_save = killed and _saving(run)
        result.update(kill="on a save" if on_save else "at a moment", killed=killed, during_save=during_save)
    with open(log, errors="replace") as f:
        reported = SAVED.findall(f.read())
    present = {c.name: c for c in reader.list_checkpoints(run, verify=True)} if os.path.isdir(run) else {}
    for name in reported:
        if _superseded(name, present):
            continue  # one checkpoint per step: a later moment of the same step replaced it
        if name not in present or not present[name].valid:
            result["lost"] += 1
            result["failures"].append(
                f"trial {i}: committed checkpoint {name} lost or invalid after the kill"
            )
    if reported and (not os.path.isdir(run) or reader.newest_valid(run) is None):
        result["failures"].append(f"trial {i}: no valid checkpoint to resume from")
    size = os.path.getsize(log)
    proc = start(run, cfg, log)
    if proc.wait() != 0:
        result["failures"].append(f"trial {i}: re-run failed with exit code {proc.returncode} (see {log})")
    final = digests(run)
    result["exact"] = final == ref
    if not result["exact"]:
        with open(log, errors="replace") as f:
            f.seek(size)
            source = RESUMED.findall(f.read())
        differ = sorted(k for k in set(ref) | set(final) if ref.get(k) != final.get(k))
        result["failures"].append(
            f"trial {i} (killed {result['kill']}): final state differs from the uninterrupted run in "
            f"{differ}; the re-run resumed from {source[0] if source else 'nothing'}"
        )
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ballast", type=int, default=1536, help="ballast width (state ≈ 12·w² bytes with AdamW)")
    p.add_argument("--frozen", action="store_true", help="a frozen backbone, saved incrementally")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument(
        "--faults", action="store_true", help="crash at named points of the saves instead of timed kills"
    )
    a = p.parse_args()
    rng = random.Random(a.seed)
    cfg = {**job_config(a.ballast), "frozen": a.frozen}
    work = tempfile.mkdtemp(prefix="guardian-drill-")
    try:
        ref, ref_seconds, saves = reference(cfg, work)
        results = []
        for i in range(a.trials):
            r = trial(i, rng, cfg, ref, ref_seconds, work, faults=a.faults, saves=saves)
            results.append(r)
            if r["exact"] and not r["failures"] and not a.keep:
                # a passed trial's checkpoints are evidence of nothing: 100 trials keep
                # ~19 GB otherwise, and a full disk would fail the trials after them
                shutil.rmtree(os.path.join(work, f"trial-{i:04d}"), ignore_errors=True)
            print(
                f"trial {i + 1}/{a.trials} ({r['kill']}): "
                f"{'killed' if r['killed'] else 'finished before the kill'}"
                f"{' during a save' if r['during_save'] else ''}, lost {r['lost']}, "
                f"{'exact' if r['exact'] else 'NOT EXACT'}",
                file=sys.stderr,
                flush=True,
            )
        summary = {
            "trials": a.trials,
            "killed": sum(r["killed"] for r in results),
            "kills_during_save": sum(r["during_save"] for r in results),
            "lost_checkpoints": sum(r["lost"] for r in results),
            "resumed_exact": sum(r["exact"] for r in results),
            "failures": [f for r in results for f in r["failures"]],
            "state_bytes_approx": 12 * a.ballast * a.ballast,
        }
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    if a.json:
        print(json.dumps(summary))
    else:
        print(json.dumps(summary, indent=1))
    return 0 if not summary["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
