#!/usr/bin/env python3
"""Resume in a fresh process: guardian's restore against torch.load, warm page cache.

    python scripts/bench_resume.py --size-mb 1024 --reps 3

What bench_checkpoint.py's restore figures do not show. There the state is restored
into a trainer whose tensors all exist (restore-best, rollback). At a restart they do
not: the model's parameters exist, the optimizer's state does not, so guardian reads
the parameters into the live tensors and the optimizer state into new tensors — paying
the page faults of fresh memory, as torch.load does for everything. Each measurement
runs in its own fresh process (only the load is timed); both files are read once first
so the page cache is warm. Prints medians; ``--json`` adds one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_checkpoint as bench  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from guardian.async_writer import AsyncWriter  # noqa: E402
from guardian.state import snapshot as snap_mod  # noqa: E402


def fresh_trainer(size_mb: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """As a restarted script builds it: parameters initialised, optimizer not stepped."""
    n = max(1, round(size_mb * bench.MiB / (bench.HIDDEN * bench.HIDDEN * 4)))
    model = nn.Sequential(*[nn.Linear(bench.HIDDEN, bench.HIDDEN) for _ in range(n)])
    return model, torch.optim.Adam(model.parameters(), lr=1e-4)


def prepare(d: str, size_mb: float) -> None:
    model, opt = bench.build_state(size_mb)  # Adam stepped: its moments exist
    writer = AsyncWriter()
    bench.guardian_save(writer, d, "ckpt", lambda: bench.guardian_states(model, opt), None, 0.0)
    writer.close()
    bench.torch_save(f"{d}/model.pt", model, opt)


def warm(path: str) -> None:
    for root, _, files in os.walk(path) if os.path.isdir(path) else [("", [], [path])]:
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                while f.read(64 * bench.MiB):
                    pass


def load_once(d: str, method: str, size_mb: float) -> float:
    model, opt = fresh_trainer(size_mb)
    t = time.perf_counter()
    if method == "guardian":
        live = snap_mod.capture(bench.guardian_states(model, opt)).tensors
        snap_mod.load(f"{d}/ckpt", into=live)
    else:
        torch.load(f"{d}/model.pt", weights_only=True)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=float, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/guardian-bench-resume")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", choices=["guardian", "torch"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps({"seconds": load_once(args.dir, args.child, args.size_mb)}))
        return 0
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    prepare(args.dir, args.size_mb)
    times: dict[str, list[float]] = {"guardian": [], "torch": []}
    for _ in range(args.reps):
        for method in times:
            warm(f"{args.dir}/ckpt" if method == "guardian" else f"{args.dir}/model.pt")
            cmd = [
                sys.executable,
                __file__,
                "--child",
                method,
                "--dir",
                args.dir,
                "--size-mb",
                str(args.size_mb),
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            times[method].append(json.loads(out.strip().splitlines()[-1])["seconds"])
    shutil.rmtree(args.dir, ignore_errors=True)
    g, t = statistics.median(times["guardian"]), statistics.median(times["torch"])
    summary = {
        "guardian_resume_warm_s": round(g, 4),
        "torch_load_fresh_process_warm_s": round(t, 4),
        "resume_warm_speedup_vs_torch_load": round(t / g, 3),
        "reps": args.reps,
        "per_rep": times,
    }
    for k, v in summary.items():
        print(f"{k:38s} {v}")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
