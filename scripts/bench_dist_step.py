#!/usr/bin/env python3
"""What ``protect()`` costs a distributed training step when no save is due.

Two ranks on gloo (CPU) train a small DDP model with real forward/backward passes.
Rounds alternate between the bare loop and the same loop inside ``protect()`` (a save
never due, so only the per-step work is measured: the heartbeat, the step bookkeeping
and the ranks' agreement on flags). The figure is the median step time with
``protect`` divided by the median without, both measured in the same run on rank 0.

    python scripts/bench_dist_step.py [--json] [--under-load]

``--under-load`` measures the same keys again with ``scripts/cpuhog.py 2`` running
beside (``*_under_load``). ``blocking_agreement_step_overhead`` is informative: the
same loop with the ranks agreeing by a blocking all-reduce every step (lag 0).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import benchlib
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS = {"dist_step_overhead": ("<=", 1.02), "dist_step_overhead_under_load": ("<=", 1.02)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )


def _steps(model: nn.Module, opt: torch.optim.Optimizer, batches: list, n: int, g: Any = None) -> list[float]:
    """``n`` timed training steps; ``g``: the guard whose ``step()`` each one ends with."""
    times = []
    for i in range(n):
        x, y = batches[i % len(batches)]
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if g is not None:
            g.step()
        times.append(time.perf_counter() - t0)
    return times


def _rank_main(rank: int, port: int, cfg: dict, out: str) -> None:
    import guardian
    import guardian.agreement

    os.environ.update(GUARDIAN_QUIET="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks, two cores
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = DDP(_model(cfg["width"]))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    gen = torch.Generator().manual_seed(rank)
    batches = [
        (
            torch.randn(cfg["batch"], cfg["width"], generator=gen),
            torch.randint(0, 10, (cfg["batch"],), generator=gen),
        )
        for _ in range(8)
    ]
    times: dict[str, list[float]] = {"bare": [], "protect": [], "blocking": []}
    _steps(model, opt, batches, cfg["steps"])  # warm-up: allocator, DDP buckets
    with tempfile.TemporaryDirectory(prefix="bench-dist-step-") as tmp:
        for r in range(cfg["rounds"]):
            order = ["bare", "protect", "blocking"] if r % 2 == 0 else ["blocking", "protect", "bare"]
            for kind in order:
                if kind == "bare":
                    times[kind] += _steps(model, opt, batches, cfg["steps"])
                    continue
                guardian.agreement.LAG = 0 if kind == "blocking" else cfg["lag"]
                run_dir = os.path.join(tmp, f"{kind}-{r}")  # same path on both ranks: one machine
                with guardian.protect(
                    {"model": model, "optimizer": opt}, dir=run_dir, every_steps=10**9, save_on_exit=False
                ) as g:
                    _steps(model, opt, batches, 2, g)  # first steps: the arena reservation
                    times[kind] += _steps(model, opt, batches, cfg["steps"], g)
                dist.barrier()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(times, f)
    dist.barrier()
    dist.destroy_process_group()


def measure(width: int = 512, batch: int = 64, steps: int = 100, rounds: int = 6) -> dict[str, Any]:
    """One two-rank run; medians of rank 0's per-step times."""
    import guardian.agreement

    cfg = {"width": width, "batch": batch, "steps": steps, "rounds": rounds, "lag": guardian.agreement.LAG}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        mp.spawn(_rank_main, args=(_free_port(), cfg, out), nprocs=2, join=True)
        with open(out) as f:
            times = json.load(f)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "dist_step_overhead": round(med["protect"] / med["bare"], 4),
        "blocking_agreement_step_overhead": round(med["blocking"] / med["bare"], 4),
        "dist_step_bare_s": round(med["bare"], 6),
        "dist_step_protect_extra_s": round(med["protect"] - med["bare"], 6),
        "dist_step_config": {k: v for k, v in cfg.items()},
    }


def measure_under_load(**kwargs: Any) -> dict[str, Any]:
    """``measure`` with ``scripts/cpuhog.py 2`` running beside; keys get ``_under_load``."""
    hog = subprocess.Popen([sys.executable, os.path.join(HERE, "cpuhog.py"), "2"], stdout=subprocess.DEVNULL)
    try:
        figures = measure(**kwargs)
        figures["loadavg"] = open("/proc/loadavg").read().split()[0]
    finally:
        hog.terminate()
        hog.wait()
    return {f"{k}_under_load": v for k, v in figures.items() if k != "dist_step_config"}


def run(under_load: bool = True, **kwargs: Any) -> dict[str, Any]:
    """The figures ``bench_checkpoint.py`` merges into its summary (``kwargs``: ``measure``'s)."""
    summary = measure(**kwargs)
    summary["dist_step_loadavg"] = open("/proc/loadavg").read().split()[0]
    if under_load:
        summary.update(measure_under_load(**kwargs))
    return summary


def check_targets(summary: dict[str, Any]) -> dict[str, bool]:
    return benchlib.check_targets(summary, TARGETS)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--under-load", action="store_true", help="also measure beside scripts/cpuhog.py 2")
    ap.add_argument("--rounds", type=int, default=6, help="alternations of bare and protected steps")
    args = ap.parse_args()
    summary = run(under_load=args.under_load, rounds=args.rounds)
    summary["targets_met"] = check_targets(summary)
    benchlib.print_summary(summary, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
