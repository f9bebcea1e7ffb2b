"""A torch-free stand-in job speaking the library's contract through guardian.runfiles.

    fake_job.py MODE [STEPS]
MODE: finish   heartbeat for STEPS steps, mark run.json finished, exit 0
      requeue  first run: mark preempted and exit 75; the next run: finish
      never    exit 78
      sleep    heartbeat forever (for stop/adopt tests)
      workers  start two grandchildren (like DataLoader workers), then heartbeat forever
      progress heartbeat forever, at most STEPS steps, with ``steps_total`` = STEPS (for top)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from guardian import runfiles


def beat(run_dir: str, steps: int) -> None:
    for step in range(steps):
        runfiles.write_heartbeat(run_dir, step, 0, "train")
        time.sleep(0.05)


def progress(run_dir: str, total: int) -> int:
    """Heartbeats that know the loop's length, as ``guardian top`` shows them (step stops at
    a quarter so the test reads a stable 25%)."""
    from guardian.format import strictjson
    from guardian.smallfiles import write_small_file_atomically

    step = 0
    while True:
        step = min(step + 1, total // 4)
        rec = {
            "pid": os.getpid(),
            "step": step,
            "epoch": 0,
            "phase": "train",
            "time": time.time(),
            "step_interval_p99": None,
            "steps_total": total,
        }
        write_small_file_atomically(
            os.path.join(run_dir, "heartbeat.json"), strictjson.dumps(rec), durable=False
        )
        time.sleep(0.05)


def main() -> int:
    mode = sys.argv[1]
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    run_dir = os.environ["GUARDIAN_RUN_DIR"]
    os.makedirs(run_dir, exist_ok=True)
    print(f"fake job {mode} attempt {os.environ.get('GUARDIAN_ATTEMPT')}", flush=True)
    runfiles.write_status(run_dir, "running")
    if mode == "never":
        return 78
    if mode == "requeue" and not os.path.exists(os.path.join(run_dir, "requeued")):
        open(os.path.join(run_dir, "requeued"), "w").close()
        runfiles.write_status(run_dir, "preempted", exit_code=75)
        return 75
    if mode == "progress":
        return progress(run_dir, steps)
    if mode == "workers":
        for _ in range(2):
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    if mode in ("sleep", "workers"):
        beat(run_dir, 10**9)
    beat(run_dir, steps)
    runfiles.write_heartbeat(run_dir, steps, 0, "done")
    runfiles.write_status(run_dir, "finished", exit_code=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
