#!/usr/bin/env python3
"""What the metric history costs a training loop: one ``g.log(loss=…)`` per step.

Measured in one process, against a baseline from the same run:

* ``step_ms``: the median time of a training step of a small MLP (forward, backward,
  optimizer step, ``g.step()``) without ``g.log``;
* ``log_us``: the median cost of one ``g.log(loss=tensor)`` call (the loss a step
  produced: a one-element tensor read with ``.item()``, a CSV row written and
  flushed), timed over batches of calls inside the same guard;
* ``ratio``: ``log_us / step_ms`` — the fraction of a step the history costs;
* ``ab_ratio``: the same from whole loops with and without ``g.log``, alternated;
  noisier on a busy machine, printed as a cross-check.

``--tensorboard`` adds the TensorBoard event files. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import guardian  # noqa: E402


def make() -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, opt, torch.randn(64, 784), torch.randint(0, 10, (64,))


def loop(g: object, model: nn.Module, opt: torch.optim.Optimizer, x, y, steps: int, log: bool) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        g.step()
        if log:
            g.log(loss=loss)
    return (time.perf_counter() - start) / steps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="steps per timed loop")
    p.add_argument("--rounds", type=int, default=7, help="alternated rounds of each variant")
    p.add_argument("--tensorboard", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    model, opt, x, y = make()
    with tempfile.TemporaryDirectory() as run:
        with guardian.protect(
            model=model, optimizer=opt, dir=run, every_steps=None, every_epochs=None,
            save_on_exit=False, tensorboard=a.tensorboard,
        ) as g:  # fmt: skip
            loop(g, model, opt, x, y, 50, True)  # warm-up: allocator, first row, header
            base, logged, calls = [], [], []
            loss = nn.functional.cross_entropy(model(x), y)
            for _ in range(a.rounds):
                base.append(loop(g, model, opt, x, y, a.steps, False))
                logged.append(loop(g, model, opt, x, y, a.steps, True))
                start = time.perf_counter()
                for _ in range(a.steps):
                    g.log(loss=loss)
                calls.append((time.perf_counter() - start) / a.steps)
            rows = sum(1 for _ in open(os.path.join(run, "history.csv"))) - 1
    step, log_cost = statistics.median(base), statistics.median(calls)
    out = {
        "tensorboard": a.tensorboard,
        "steps_per_loop": a.steps,
        "rounds": a.rounds,
        "rows_written": rows,
        "step_ms": round(step * 1e3, 4),
        "log_us": round(log_cost * 1e6, 2),
        "ratio": round(log_cost / step, 5),
        "ab_ratio": round(statistics.median(logged) / step - 1, 5),
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
