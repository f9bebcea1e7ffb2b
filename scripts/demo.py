#!/usr/bin/env python3
"""guardian's promise, end to end, in about a minute (under two from a fresh clone, set-up included).

1. Train the seed MNIST CNN without interruption (the reference).
2. Train it again and SIGKILL the whole process group partway — no warning, no
   cleanup, like a power cut or the OOM killer.
3. Run the very same command again: it resumes from the last good checkpoint.
4. Compare `guardian inspect --json` digests of both runs: model, optimizer,
   scheduler, RNG and data position must be bit-for-bit equal.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from guardian.runfiles import read_heartbeat  # noqa: E402

STARTED_AT = time.time()
EXAMPLE = os.path.join(ROOT, "scripts", "examples", "mnist_cnn.py")


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def guardian_cli(*args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "guardian.cli", *args], check=True, capture_output=True, text=True, cwd=ROOT
    ).stdout


def train(run_dir: str, args: list[str], kill_at_step: int | None = None) -> None:
    cmd = [sys.executable, EXAMPLE, "--dir", run_dir, *args]
    print("$", " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd[1:]), flush=True)
    proc = subprocess.Popen(
        cmd, start_new_session=True, env={**os.environ, "GUARDIAN_HEARTBEAT_INTERVAL": "0"}
    )
    if kill_at_step is None:
        if proc.wait() != 0:
            sys.exit(f"training failed with exit code {proc.returncode}")
        return
    while proc.poll() is None:
        hb = read_heartbeat(run_dir) if os.path.isdir(run_dir) else None
        if hb and hb.get("step", 0) >= kill_at_step:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            print(f"\n*** SIGKILL sent to the whole process group at step {hb['step']} ***", flush=True)
            return
        time.sleep(0.01)
    sys.exit("training finished before it could be killed; use a larger --kill-at-step window")


def elapsed_since_start() -> str:
    """Wall time since scripts/demo.sh started (set-up included), else since this script."""
    try:
        started = float(os.environ["DEMO_STARTED_AT"])
        origin = "since `bash scripts/demo.sh` started, set-up included"
    except (KeyError, ValueError):
        started, origin = STARTED_AT, "since scripts/demo.py started"
    return f"{time.time() - started:.0f} s {origin}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "demo-runs"))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument(
        "--kill-at-step", type=int, default=21, help="kill once this step is reached (mid-epoch 1)"
    )
    a = p.parse_args()
    shutil.rmtree(a.out, ignore_errors=True)
    args = ["--epochs", str(a.epochs), "--samples", str(a.samples), "--seed", "7"]
    ref, run = os.path.join(a.out, "uninterrupted"), os.path.join(a.out, "killed-and-resumed")

    say("1/4  uninterrupted reference run")
    train(ref, args)
    say(f"2/4  the same run, SIGKILLed at step {a.kill_at_step}")
    train(run, args, kill_at_step=a.kill_at_step)
    print(guardian_cli("ls", run))
    say("3/4  the same command again: guardian resumes")
    train(run, args)
    say("4/4  compare every component, bit for bit")
    d_ref = json.loads(guardian_cli("inspect", ref, "--json"))
    d_run = json.loads(guardian_cli("inspect", run, "--json"))
    for name in sorted(d_ref["components"]):
        a_, b_ = d_ref["components"][name]["digest"], d_run["components"].get(name, {}).get("digest")
        print(f"  {name:<10} {a_}  {'==' if a_ == b_ else '!='}  {b_}")
    ok = d_ref["digest"] == d_run["digest"]
    print(f"\n  checkpoint digest: {d_ref['digest']} vs {d_run['digest']}")
    print(
        "\nPASS: the killed run resumed and ended bit-for-bit equal to the uninterrupted one."
        if ok
        else "\nFAIL: the runs differ."
    )
    print(f"      time to PASS: {elapsed_since_start()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
