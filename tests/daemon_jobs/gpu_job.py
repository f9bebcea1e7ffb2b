"""A torch-free job that claims the GPUs the daemon gave it, to prove no device is shared.

For each device in ``CUDA_VISIBLE_DEVICES`` it creates ``$CLAIMS/<device>`` with O_EXCL;
a device already claimed by another job is written to ``$CLAIMS/COLLISION``. It then
heartbeats until the test creates ``$CLAIMS/release-<job>``, drops its claims, marks
run.json finished and exits 0. The test decides when each job ends: no sleeps.
"""

from __future__ import annotations

import os
import sys
import time

from guardian import runfiles


def main() -> int:
    run_dir, claims, job = os.environ["GUARDIAN_RUN_DIR"], os.environ["CLAIMS"], os.environ["GUARDIAN_JOB"]
    os.makedirs(run_dir, exist_ok=True)
    runfiles.write_status(run_dir, "running")
    devices = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    mine = []
    for d in devices:
        try:
            os.close(os.open(os.path.join(claims, d), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            mine.append(d)
        except FileExistsError:
            with open(os.path.join(claims, "COLLISION"), "a") as f:
                f.write(f"{job} got {d}, already claimed\n")
    print(f"{job} runs on {','.join(devices) or 'no GPU'}", flush=True)
    step = 0
    while not os.path.exists(os.path.join(claims, f"release-{job}")):
        runfiles.write_heartbeat(run_dir, step, 0, "train")
        step += 1
        time.sleep(0.05)
    for d in mine:
        os.unlink(os.path.join(claims, d))
    runfiles.write_status(run_dir, "finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
