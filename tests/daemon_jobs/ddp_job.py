"""A small torch.distributed (gloo) job for ``guardian run --nproc-per-node`` tests.

Started by torchrun: every rank all-reduces a counter each step; rank 0 speaks the
library's contract through guardian.runfiles (heartbeat.json, run.json). Knobs (env):
    DDP_STEPS     steps to run (default 40)
    DDP_SLEEP     seconds per step (default 0.05)
    DDP_MODE      kill     rank 1 SIGKILLs itself at step 10, once (marker file)
                  requeue  every rank exits 75 at step 5, once; rank 0 marks run.json preempted
                  finish   just finish
    DDP_WORKERS   each rank starts one long-lived child (a stand-in DataLoader worker) and
                  records its pid in RUN/workers-a<attempt>-r<rank>.pid
The step reached is resumed from RUN/progress-r<rank>.txt, like a checkpoint would be.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch
import torch.distributed as dist

from guardian import runfiles


def marker(run_dir: str, name: str) -> bool:
    """True the first time ``name`` is asked for (creates the marker file)."""
    path = os.path.join(run_dir, name)
    if os.path.exists(path):
        return False
    open(path, "w").close()
    return True


def start_worker(run_dir: str, rank: int) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    attempt = os.environ.get("GUARDIAN_ATTEMPT", "0")
    with open(os.path.join(run_dir, f"workers-a{attempt}-r{rank}.pid"), "w") as f:
        f.write(str(child.pid))


def read_progress(run_dir: str, rank: int) -> int:
    try:
        with open(os.path.join(run_dir, f"progress-r{rank}.txt")) as f:
            return int(f.read())
    except FileNotFoundError:
        return 0


def main() -> int:
    run_dir = os.environ["GUARDIAN_RUN_DIR"]
    mode = os.environ.get("DDP_MODE", "finish")
    steps, pause = int(os.environ.get("DDP_STEPS", "40")), float(os.environ.get("DDP_SLEEP", "0.05"))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    os.makedirs(run_dir, exist_ok=True)
    if os.environ.get("DDP_WORKERS"):
        start_worker(run_dir, rank)
    if rank == 0:
        runfiles.write_status(run_dir, "running", world_size=world)
    start = read_progress(run_dir, rank)
    for step in range(start, steps):
        if mode == "kill" and rank == 1 and step == 10 and marker(run_dir, "killed-once"):
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "requeue" and step == 5 and marker(run_dir, f"requeued-r{rank}"):
            # like the library: a SIGTERM from torchrun while leaving must not change the 75
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            dist.barrier()
            if rank == 0:
                runfiles.write_status(run_dir, "preempted", exit_code=75, step=step)
            return 75
        total = torch.tensor([1.0])
        dist.all_reduce(total)
        assert int(total.item()) == world
        with open(os.path.join(run_dir, f"progress-r{rank}.txt"), "w") as f:
            f.write(str(step + 1))
        if rank == 0:
            runfiles.write_heartbeat(run_dir, step + 1, 0, "train")
        time.sleep(pause)
    dist.barrier()
    if rank == 0:
        runfiles.write_heartbeat(run_dir, steps, 0, "done")
        runfiles.write_status(run_dir, "finished", exit_code=0, world_size=world)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
