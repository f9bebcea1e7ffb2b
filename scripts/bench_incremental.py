#!/usr/bin/env python3
"""Incremental checkpoints on a LoRA-like state: bytes written and stall vs a full save.

    python scripts/bench_incremental.py --backbone-mb 1024 --incremental-reps 5 --json [--incremental-under-load]

The state: a frozen backbone (Linear layers, ``requires_grad=False``), a trainable head
of ``--head-fraction`` of its size and the head's Adam moments — over 90 % of the bytes
never change. Each repetition steps the optimizer (head and moments change in place),
then saves twice through the same asynchronous writer path ``protect()`` uses: once
full, once incremental (guardian/incremental.py: the unchanged tensors are hard-linked
from the previous checkpoint). Both saves wait for the previous one to be durable
first, so each stall is the copy alone. Two uncounted incremental saves come first (the
first is full, the second writes the shared file). Medians, ratios within the run:

  incremental_bytes_ratio    bytes written per incremental save ÷ per full save
  incremental_stall_ratio    the loop's blocking time, incremental ÷ full
  incremental_durable_ratio  time until committed, incremental ÷ full

``--incremental-under-load`` measures the same keys again with ``scripts/cpuhog.py 2`` beside
(``*_under_load``). ``bench_checkpoint.py`` runs this too (``run``, ``TARGETS``;
``--no-incremental`` skips it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

import benchlib
import torch
from torch import nn

from guardian.async_writer import AsyncWriter
from guardian.commit import delete_checkpoint
from guardian.format.layout import SHARED_FILE, checkpoint_name
from guardian.format.manifest import Manifest
from guardian.incremental import IncrementalSaves
from guardian.state import snapshot as snap_mod
from guardian.state.components import OptimizerState

MiB = 1 << 20
WIDTH = 1024  # one Linear(1024, 1024) = 4 MiB of float32 weights
HERE = os.path.dirname(os.path.abspath(__file__))

TARGETS = {
    "incremental_bytes_ratio": ("<=", 0.15),
    "incremental_stall_ratio": ("<=", 0.15),
    "incremental_bytes_ratio_under_load": ("<=", 0.15),
    "incremental_stall_ratio_under_load": ("<=", 0.15),
}


def build_state(backbone_mb: float, head_fraction: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    layers = max(1, round(backbone_mb * MiB / (WIDTH * WIDTH * 4)))
    head_out = max(1, round(layers * WIDTH * head_fraction))
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(layers)], nn.Linear(WIDTH, head_out))
    for p in model[:-1].parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(model[-1].parameters(), lr=1e-4)
    step(opt)
    return model, opt


def step(opt: torch.optim.Optimizer) -> None:
    """One optimizer step: the head and its moments change in place, as in training."""
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.randn_like(p)
    opt.step()


def states(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, tuple[str, Any]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        "model": ("module", model.state_dict()),
        "optimizer": ("optimizer", OptimizerState(opt, names).state_dict()),
    }


class Saves:
    """One run directory, one writer, optionally incremental; keeps the newest two."""

    def __init__(self, run: str, incremental: bool) -> None:
        self.run, self.writer = run, AsyncWriter()
        self.tracker = IncrementalSaves() if incremental else None
        self.seq = 0
        os.makedirs(run)

    def save(self, model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, float]:
        self.writer.wait()  # the previous save is durable: this stall is the copy alone
        self.seq += 1
        name = checkpoint_name(self.seq)
        t0 = time.perf_counter()
        snap = snap_mod.capture(states(model, opt))
        man = Manifest(name=name, step=self.seq, epoch=0, seq=self.seq, files={})
        if self.tracker is not None:
            snap, man.shared = self.tracker.plan(snap, copy_fresh=True)
        self.writer.submit(self.run, snap, man, self._committed)
        stall = time.perf_counter() - t0
        self.writer.wait()
        durable = time.perf_counter() - t0
        linked = man.shared is not None and man.shared.link_from is not None and not man.shared.copy
        written = man.total_bytes - (man.files[SHARED_FILE].bytes if linked else 0)
        if self.seq > 2:
            delete_checkpoint(self.run, checkpoint_name(self.seq - 2))
        return {"stall": stall, "durable": durable, "bytes": written, "total": man.total_bytes}

    def _committed(self, path: str, man: Manifest) -> None:
        if self.tracker is not None:
            self.tracker.committed(path, man)

    def close(self) -> None:
        self.writer.close()


def measure(backbone_mb: float, head_fraction: float, reps: int, d: str, suffix: str = "") -> dict[str, Any]:
    shutil.rmtree(d, ignore_errors=True)
    model, opt = build_state(backbone_mb, head_fraction)
    full, inc = Saves(f"{d}/full", False), Saves(f"{d}/inc", True)
    try:
        warm = [inc.save(model, opt)]  # a full save: nothing is known yet
        step(opt)
        warm.append(inc.save(model, opt))  # the backbone is known unchanged: its shared file is written
        full.save(model, opt)
        res: dict[str, list[float]] = {k: [] for k in ("fs", "fd", "fb", "is", "id", "ib")}
        for r in range(reps):
            step(opt)
            f, i = full.save(model, opt), inc.save(model, opt)
            for k in ("stall", "durable", "bytes"):
                res["f" + k[0]].append(f[k])
                res["i" + k[0]].append(i[k])
            print(f"rep {r}{suffix}: full {f}, incremental {i}", file=sys.stderr)
    finally:
        full.close()
        inc.close()
        shutil.rmtree(d, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    frozen = sum(p.numel() * 4 for p in model[:-1].parameters())
    return {
        f"incremental_bytes_ratio{suffix}": round(med["ib"] / med["fb"], 4),
        f"incremental_stall_ratio{suffix}": round(med["is"] / med["fs"], 4),
        f"incremental_durable_ratio{suffix}": round(med["id"] / med["fd"], 4),
        f"incremental_full_stall_s{suffix}": round(med["fs"], 4),
        f"incremental_stall_s{suffix}": round(med["is"], 4),
        f"incremental_shared_write_stall_s{suffix}": round(warm[1]["stall"], 4),
        f"incremental_frozen_fraction{suffix}": round(frozen / warm[0]["total"], 4),
        f"incremental_loadavg{suffix}": open("/proc/loadavg").read().split()[0],
    }


def under_load(fn: Any) -> Any:
    """Run ``fn()`` with two CPU-bound processes beside it (scripts/cpuhog.py 2)."""
    hog = subprocess.Popen([sys.executable, os.path.join(HERE, "cpuhog.py"), "2"], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)  # not a wait for correctness: lets the hogs reach full speed
        return fn()
    finally:
        hog.terminate()
        hog.wait(timeout=30)


def run(args: argparse.Namespace, d: str) -> dict[str, Any]:
    """Every key, from the options ``add_arguments`` defines (bench_checkpoint.py too)."""
    mb = args.backbone_mb or getattr(args, "size_mb", None) or 1024  # bench_checkpoint: its --size-mb
    out = measure(mb, args.head_fraction, args.incremental_reps, d)
    if args.incremental_under_load:
        out.update(
            under_load(lambda: measure(mb, args.head_fraction, args.incremental_reps, d, "_under_load"))
        )
    return out


def check_targets(summary: dict[str, Any]) -> dict[str, bool]:
    return benchlib.check_targets(summary, TARGETS)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--backbone-mb",
        type=float,
        default=None,
        help="frozen parameter MB (incremental case; default 1024, or --size-mb)",
    )
    ap.add_argument("--head-fraction", type=float, default=0.02, help="trainable head size ÷ backbone")
    ap.add_argument("--incremental-reps", type=int, default=5)
    ap.add_argument(
        "--incremental-under-load", action="store_true", help="also measure with scripts/cpuhog.py 2 beside"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    ap.add_argument("--dir", default="/tmp/guardian-bench-incremental")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    summary = run(args, args.dir)
    summary["targets_met"] = check_targets(summary)
    benchlib.print_summary(summary, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
