#!/usr/bin/env python3
"""Overlap benchmark: the stall of a save in a loop that does real forward/backward work.

    python scripts/bench_overlap.py --size-mb 256 --reps 7 [--one-core-free] [--under-load] --json

A stack of ``Linear(2048, 2048)`` layers (``--size-mb`` of float32 parameters; AdamW
makes the state ~3x that) trains on random batches. Each repetition times a few
steps without a save (the baseline, the median of those just before), then the step
that takes a save and the step after it — the copy of an overlapped save runs during
that next step, whose ``optimizer.step()`` waits for it. The stall of one save is

    (time of the save's step + time of the next step) - 2 x baseline step

so it counts the blocking part of ``submit``, the pre-hook's wait and the slowdown of
the next step by the background copy. Before the next repetition the save is made
durable (the loop waits for it: the persist thread's slowdown of later steps is the
``foreground_slowdown`` of bench_checkpoint.py, not this figure). The ratio is
against ``torch.save`` + fsync of the same state, medians, in the same run; the same
loop with overlap off (the blocking copy) is measured beside it.

``--one-core-free`` repeats it with the loop's torch compute on all cores but one (keys
``*_one_core_free``): what a GPU trainer leaves the host, where forward/backward runs on
the device. On a CPU-only machine the default figure has every core busy with
forward/backward, so the overlapped copy's CPU time comes out of the next step whatever
guardian does; the one-core-free figure shows what overlap does once a core is idle.
``--under-load`` repeats everything with ``scripts/cpuhog.py 2`` running beside (keys
``*_under_load``). Importable: ``bench_checkpoint.py`` calls ``measure``,
``measure_one_core_free`` and ``measure_under_load``.
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
from typing import Any

import torch
from benchlib import manifest_for, timed, torch_save
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from guardian import overlap
from guardian.async_writer import AsyncWriter
from guardian.state import snapshot as snap_mod

HIDDEN = 2048
HERE = os.path.dirname(os.path.abspath(__file__))

TARGETS = {
    "overlap_stall_vs_torch_save": ("<=", 0.03),
    "overlap_stall_vs_torch_save_under_load": ("<=", 0.06),
}


def build(param_mb: float, batch: int) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor]:
    layers = max(1, round(param_mb * (1 << 20) / (HIDDEN * HIDDEN * 4)))
    model = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(HIDDEN, HIDDEN), nn.ReLU())])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    return model, opt, torch.randn(batch, HIDDEN)


def states(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, tuple[str, Any]]:
    return {"model": ("module", model.state_dict()), "optimizer": ("optimizer", opt.state_dict())}


class Loop:
    """A plain training loop; ``step(save=...)`` submits a save at its end, as
    ``g.step()`` does after ``optimizer.step()``."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, d: str) -> None:
        self.model, self.opt, self.x, self.d = model, opt, x, d
        self.saves = 0
        self.hook_wait = 0.0  # the last optimizer step's wait in guardian's pre-hook
        self._entered = 0.0

    def around_guardian_hook(self) -> list[Any]:
        """Two pre-hooks, registered before and after guardian's: the time between
        them is the wait for the copy. Call before the writers exist."""
        assert overlap.WINDOW._hook is None, "guardian's step pre-hook must be registered between ours"
        first = register_optimizer_step_pre_hook(lambda *a: setattr(self, "_entered", time.perf_counter()))
        return [first]

    def after_guardian_hook(self) -> Any:
        return register_optimizer_step_pre_hook(
            lambda *a: setattr(self, "hook_wait", time.perf_counter() - self._entered)
        )

    def step(self, writer: AsyncWriter | None = None) -> tuple[float, float, float]:
        """(whole step, its optimizer.step() alone, its save's submit alone) in seconds."""
        t0 = time.perf_counter()
        self.model(self.x).square().mean().backward()
        t1 = time.perf_counter()
        self.opt.step()
        t2 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if writer is not None:
            self.saves += 1
            snap = snap_mod.capture(states(self.model, self.opt))
            writer.submit(self.d, snap, manifest_for(f"ckpt-{self.saves}", snap, "steps"), lambda *a: None)
        t4 = time.perf_counter()
        return t4 - t0, t2 - t1, t4 - t3


def stalls(loop: Loop, writer: AsyncWriter, base_steps: int) -> tuple[float, float]:
    """(stall by step times, time the loop was blocked: submit + the wait in the pre-hook)."""
    base = [loop.step() for _ in range(base_steps)]
    whole = statistics.median(b[0] for b in base)
    saved = loop.step(writer)
    after = loop.step()
    writer.wait()
    shutil.rmtree(os.path.join(loop.d, f"ckpt-{loop.saves}"), ignore_errors=True)
    return saved[0] + after[0] - 2 * whole, saved[2] + loop.hook_wait


def measure(
    param_mb: float = 256,
    reps: int = 7,
    batch: int = 64,
    d: str = "/tmp/guardian-bench-overlap",
    compute_threads: int | None = None,
) -> dict:
    """One run: overlap on, overlap off, torch.save; medians and ratios.
    ``compute_threads``: torch's intra-op threads for the loop (default: all cores)."""
    if compute_threads is not None:
        before = torch.get_num_threads()
        torch.set_num_threads(compute_threads)
        try:
            return measure(param_mb, reps, batch, d)
        finally:
            torch.set_num_threads(before)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    torch.manual_seed(0)
    model, opt, x = build(param_mb, batch)
    loop = Loop(model, opt, x, d)
    hooks = loop.around_guardian_hook()
    overlapped, blocking = AsyncWriter(overlap=True), AsyncWriter(overlap=False)
    hooks.append(loop.after_guardian_hook())
    try:
        for _ in range(2):  # optimizer state exists, the pre-hook has seen the optimizer, pages warm
            loop.step()
        for w in (overlapped, blocking):
            w.reserve(snap_mod.capture(states(model, opt)))
            stalls(loop, w, 2)  # warm-up save: the arena's first use
        on, off, saves = [], [], []
        for _ in range(reps):  # interleaved, so both see the same machine
            on.append(stalls(loop, overlapped, 3))
            off.append(stalls(loop, blocking, 3))
            saves.append(timed(lambda: torch_save(os.path.join(d, "model.pt"), model, opt)))
            os.unlink(os.path.join(d, "model.pt"))
        step = statistics.median(loop.step()[0] for _ in range(3))
    finally:
        overlapped.close()
        blocking.close()
        for hook in hooks:
            hook.remove()
        shutil.rmtree(d, ignore_errors=True)
    m_save = statistics.median(saves)
    m_on, m_off = (statistics.median(s[0] for s in on), statistics.median(s[0] for s in off))
    b_on, b_off = (statistics.median(s[1] for s in on), statistics.median(s[1] for s in off))
    state_bytes = snap_mod.capture(states(model, opt)).tensor_bytes
    return {
        "overlap_stall_vs_torch_save": round(max(m_on, 0.0) / m_save, 4),
        "overlap_blocked_vs_torch_save": round(b_on / m_save, 4),
        "overlap_blocking_stall_vs_torch_save": round(max(m_off, 0.0) / m_save, 4),
        "overlap_stall_s": round(m_on, 4),
        "overlap_blocked_s": round(b_on, 4),
        "overlap_blocking_stall_s": round(m_off, 4),
        "overlap_blocking_blocked_s": round(b_off, 4),
        "overlap_torch_save_s": round(m_save, 4),
        "overlap_step_s": round(step, 4),
        "overlap_state_bytes": state_bytes,
        "overlap_stalls_s": [round(s[0], 4) for s in on],
    }


def measure_one_core_free(**kw: Any) -> dict:
    """``measure`` with the loop's compute on all cores but one, as a GPU trainer leaves
    host cores free (its forward/backward runs on the device); keys get ``_one_core_free``.
    What overlap can do where a core is idle, which the default figure (every core busy
    with forward/backward on a CPU-only machine) cannot show."""
    threads = max(1, (os.cpu_count() or 2) - 1)
    return {f"{k}_one_core_free": v for k, v in measure(**kw, compute_threads=threads).items()}


def measure_under_load(**kw: Any) -> dict:
    """``measure`` with two CPU-bound processes beside it; keys get ``_under_load``."""
    hog = subprocess.Popen([sys.executable, os.path.join(HERE, "cpuhog.py"), "2"])
    try:
        result = measure(**kw)
    finally:
        hog.terminate()
        hog.wait()
    return {f"{k}_under_load": v for k, v in result.items()}


def check(summary: dict) -> dict[str, bool]:
    met = {}
    for key, (op, bound) in TARGETS.items():
        if key in summary:
            met[key] = summary[key] <= bound if op == "<=" else summary[key] >= bound
    return met


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=float, default=256, help="parameter MB (the state is ~3x with AdamW)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dir", default="/tmp/guardian-bench-overlap")
    ap.add_argument("--under-load", action="store_true", help="also measure with scripts/cpuhog.py 2 beside")
    ap.add_argument(
        "--one-core-free",
        action="store_true",
        help="also measure with the loop's compute on all cores but one",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    kw = {"param_mb": args.size_mb, "reps": args.reps, "batch": args.batch, "d": args.dir}
    summary = measure(**kw)
    if args.one_core_free:
        summary.update(measure_one_core_free(**kw))
    if args.under_load:
        summary.update(measure_under_load(**kw))
    summary["loadavg"] = open("/proc/loadavg").read().split()[:3]
    summary["targets_met"] = check(summary)
    for k, v in summary.items():
        print(f"{k:44s} {v}")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
