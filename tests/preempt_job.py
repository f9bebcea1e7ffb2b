"""A training job for preemption tests: DataLoader workers that are busy, a loop with
an evaluation, saves every few steps — the shape of a real job that Slurm preempts.

    python tests/preempt_job.py RUN CONFIG_JSON

CONFIG keys: ``workers`` (num_workers), ``persistent`` (persistent_workers),
``start_method`` (the loader's multiprocessing context, None: the default),
``epochs``, ``samples``, ``batch``, ``every_steps``, ``loader_generator`` (shuffle
with the loader's own ``torch.Generator``), ``sampler_generator`` (a RandomSampler
with its own generator), ``accumulate`` (micro-batches per
optimizer step), ``augment`` ("index": per-sample noise seeded by the index,
"worker": noise from the worker process's torch RNG stream), ``eval_workers``
(evaluate through a loader with worker processes that the job iterates itself, not
through ``g.batches()``), ``signal_in_eval`` (in that epoch's evaluation, create
``RUN.in-eval`` and hold until the test has created ``RUN.signalled``; once per run).

Environment: ``EXIT_AFTER_EPOCH_SAVE=k`` makes the job ``os._exit(0)`` once the
checkpoint at the end of epoch ``k`` is committed, before any step of the next epoch
runs (a kill at an epoch boundary, deterministic).

Prints nothing; the test follows the run through its heartbeat and checkpoints.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset

import guardian

DEFAULT = {
    "workers": 2,
    "persistent": False,
    "start_method": None,
    "epochs": 3,
    "samples": 192,
    "batch": 8,
    "every_steps": 7,
    "loader_generator": False,
    "sampler_generator": False,
    "accumulate": 1,
    "augment": "index",
    "eval_workers": 0,
    "signal_in_eval": None,
}


class Features(Dataset):
    """Deterministic features; ``augment`` decides where the noise comes from."""

    def __init__(self, n: int, augment: str) -> None:
        self.n = n
        self.augment = augment
        gen = torch.Generator().manual_seed(99)
        self.x = torch.randn(n, 32, generator=gen)
        self.y = (self.x[:, 0] > 0).long()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        x = self.x[i]
        for _ in range(20):  # keep the workers busy: a signal finds them mid-sample
            x = torch.tanh(x @ torch.eye(32) + 0.01)
        if self.augment == "index":
            x = x + 0.01 * torch.randn(32, generator=torch.Generator().manual_seed(i))
        elif self.augment == "worker":
            x = x + 0.01 * torch.randn(32)
        return x, self.y[i]


def build(cfg: dict):
    random.seed(0)  # a reproducible script seeds every RNG it has (all are checkpointed)
    np.random.seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(5) if cfg["loader_generator"] else None
    data = Features(cfg["samples"], cfg["augment"])
    sampler = None
    if cfg["sampler_generator"]:
        sampler = RandomSampler(data, generator=torch.Generator().manual_seed(6))
    loader = DataLoader(
        data,
        batch_size=cfg["batch"],
        shuffle=sampler is None,
        sampler=sampler,
        generator=gen,
        num_workers=cfg["workers"],
        persistent_workers=cfg["persistent"] and cfg["workers"] > 0,
        multiprocessing_context=cfg["start_method"] if cfg["workers"] else None,
    )
    return model, opt, loader


def evaluate(model: nn.Module, val_x: torch.Tensor, cfg: dict, run: str, epoch: int) -> torch.Tensor:
    if not cfg["eval_workers"]:
        return model(val_x).pow(2).mean()
    loader = DataLoader(TensorDataset(val_x), batch_size=1, num_workers=cfg["eval_workers"])
    total = torch.zeros(())
    for i, (xb,) in enumerate(loader):
        if i == 0 and epoch == cfg["signal_in_eval"] and not os.path.exists(run + ".signalled"):
            open(run + ".in-eval", "w").close()
            while not os.path.exists(run + ".signalled"):  # the test signals the process group
                time.sleep(0.01)
        total = total + model(xb).pow(2).mean()
    return total / len(loader)


def main() -> None:
    run, cfg = sys.argv[1], {**DEFAULT, **json.loads(sys.argv[2])}
    exit_after_epoch = os.environ.get("EXIT_AFTER_EPOCH_SAVE")
    model, opt, loader = build(cfg)
    val_x = torch.randn(64, 32, generator=torch.Generator().manual_seed(3))
    with guardian.protect(
        model=model, optimizer=opt, dir=run, every_steps=cfg["every_steps"], every_epochs=1, keep_last=3
    ) as g:
        for epoch in g.epochs(cfg["epochs"]):
            if exit_after_epoch is not None and epoch == int(exit_after_epoch) + 1:
                g.saver.wait_in_flight()  # the epoch checkpoint is committed; no step of this epoch ran
                os._exit(0)
            model.train()
            for xb, yb in g.batches(loader):
                loss = nn.functional.cross_entropy(model(xb), yb) / cfg["accumulate"]
                loss.backward()
                if g.batch_in_epoch % cfg["accumulate"] == 0:
                    opt.step()
                    opt.zero_grad()
                g.step()
            model.eval()
            with torch.no_grad():
                val = evaluate(model, val_x, cfg, run, epoch)
            g.report(val_loss=val)
    sys.exit(0)


if __name__ == "__main__":
    main()
