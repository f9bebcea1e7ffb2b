#!/usr/bin/env python3
"""The README's promise, checked with the README's own loop: run it to the end once; run
it again in another directory, SIGKILL it mid-run once a checkpoint has committed, run the
same file again; both runs must end with equal `guardian inspect --json` digests.

    python scripts/readme_kill_resume.py [--readme README.md] [--python PYTHON]

PYTHON (default: this interpreter) is the environment under test: the clone's .venv in
tests/test_readme.py, a fresh venv with the wheel installed in scripts/check_wheel.sh.
This script imports nothing from guardian, so it checks whatever PYTHON has installed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_DIR = "runs/quickstart"
DEADLINE_S = 600  # one run of the loop on a loaded 2-core machine stays far below this

# Runs the README's file in-process and SIGKILLs its own process from a watcher thread
# once a committed checkpoint past KILL_AFTER_STEP exists: the kill lands mid-run however
# loaded the machine is (an outside poller could sleep through the rest of the run).
KILLER = r"""
import os, re, runpy, signal, sys, threading, time
run_dir, after = sys.argv[1], int(sys.argv[2])
def committed_steps():
    try:
        names = os.listdir(run_dir)
    except FileNotFoundError:
        return []
    return [int(m.group(1)) for n in names if (m := re.match(r"step-(\d+)", n))
            and os.path.exists(os.path.join(run_dir, n, "manifest.json"))]
def watch():
    while not any(s > after for s in committed_steps()):
        time.sleep(0.001)
    sys.stderr.write("*** SIGKILL ***\n"); sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
threading.Thread(target=watch, daemon=True).start()
sys.argv = ["train.py"]
runpy.run_path("train.py", run_name="__main__")
"""


def readme_loop(readme: str) -> str:
    """The python block the README marks as `train.py`."""
    text = open(readme, encoding="utf-8").read()
    m = re.search(r"<!-- readme: file train\.py -->\s*```python\n(.*?)```", text, re.S)
    if not m:
        sys.exit(f"{readme}: no python block marked '<!-- readme: file train.py -->'")
    return m.group(1)


def run(python: str, cwd: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "GUARDIAN_QUIET": "0"}  # its resume line is checked
    return subprocess.run(
        [python, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=DEADLINE_S
    )


def digests(python: str, cwd: str) -> dict:
    proc = run(python, cwd, "-m", "guardian.cli", "inspect", RUN_DIR, "--json")
    if proc.returncode != 0:
        sys.exit(f"guardian inspect failed in {cwd}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--kill-after-step", type=int, default=20, help="the first checkpoint is past this step")
    a = p.parse_args()
    code = readme_loop(a.readme)
    with tempfile.TemporaryDirectory(prefix="readme-loop-") as tmp:
        ref, killed = os.path.join(tmp, "uninterrupted"), os.path.join(tmp, "killed")
        for d in (ref, killed):
            os.makedirs(d)
            with open(os.path.join(d, "train.py"), "w", encoding="utf-8") as f:
                f.write(code)
        print("== the README's loop, uninterrupted", flush=True)
        done = run(a.python, ref, "train.py")
        if done.returncode != 0:
            sys.exit(f"train.py failed:\n{done.stderr[-3000:]}")
        print(done.stdout.strip())
        print(f"== the same loop, SIGKILLed after a checkpoint past step {a.kill_after_step}", flush=True)
        dead = run(a.python, killed, "-c", KILLER, RUN_DIR, str(a.kill_after_step))
        if dead.returncode != -9:
            sys.exit(f"expected death by SIGKILL, got exit {dead.returncode}:\n{dead.stderr[-3000:]}")
        print("== the same command again: it resumes", flush=True)
        again = run(a.python, killed, "train.py")
        if again.returncode != 0 or "resum" not in again.stderr.lower():
            sys.exit(f"the rerun did not resume (exit {again.returncode}):\n{again.stderr[-3000:]}")
        print(again.stdout.strip())
        d_ref, d_run = digests(a.python, ref), digests(a.python, killed)
        for name in sorted(d_ref["components"]):
            x, y = d_ref["components"][name]["digest"], d_run["components"].get(name, {}).get("digest")
            print(f"  {name:<10} {x}  {'==' if x == y else '!='}  {y}")
        print(
            f"  checkpoint {d_ref['digest']}  {'==' if d_ref['digest'] == d_run['digest'] else '!='}  {d_run['digest']}"
        )
        if d_ref["digest"] != d_run["digest"] or d_ref["step"] != d_run["step"]:
            print("FAIL: the killed and resumed run differs from the uninterrupted one")
            return 1
    print("PASS: killed, resumed, bit-for-bit equal")
    return 0


if __name__ == "__main__":
    sys.exit(main())
