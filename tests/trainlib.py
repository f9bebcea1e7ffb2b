"""A tiny, configurable training run for exact-resume tests (in-process and as a subprocess).

Every optimizer and scheduler users actually use can be selected by name; the model
has dropout and BatchNorm, the loader shuffles, and everything random flows from
the seed — so two runs with the same config must end bit-for-bit equal.

As a script: ``python tests/trainlib.py RUN_DIR CONFIG_JSON`` trains under
guardian.protect; ``KILL_AT_STEP=k`` makes it SIGKILL itself right after step k.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import guardian

DEFAULT = {
    "optimizer": "adam",
    "scheduler": "step",
    "epochs": 3,
    "samples": 64,
    "batch_size": 8,
    "num_workers": 0,
    "accumulate": 1,
    "amp": False,
    "every_steps": 3,
    "seed": 0,
    "ballast": 0,  # width of an extra square layer: makes saves slow enough to be hit by kills
    "frozen": False,  # the ballast is a frozen backbone and saves are incremental
}


class TinyNet(nn.Module):
    def __init__(self, ballast: int = 0) -> None:
        super().__init__()
        width = ballast or 16
        self.fc1 = nn.Linear(10, width)
        self.bn = nn.BatchNorm1d(width)
        self.drop = nn.Dropout(0.3)
        self.ballast = nn.Linear(width, width) if ballast else nn.Identity()
        self.fc2 = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.ballast(self.drop(torch.relu(self.bn(self.fc1(x))))))


def make_optimizer(name: str, params: Any) -> torch.optim.Optimizer:
    o = torch.optim
    return {
        "sgd": lambda: o.SGD(params, lr=0.05),
        "momentum": lambda: o.SGD(params, lr=0.05, momentum=0.9),
        "nesterov": lambda: o.SGD(params, lr=0.05, momentum=0.9, nesterov=True),
        "adam": lambda: o.Adam(params, lr=1e-2),
        "adamw": lambda: o.AdamW(params, lr=1e-2, weight_decay=0.01),
        "rmsprop": lambda: o.RMSprop(params, lr=1e-3),
        "adadelta": lambda: o.Adadelta(params, lr=1.0),
    }[name]()


def make_scheduler(name: str, opt: torch.optim.Optimizer, steps: int) -> Any:
    s = torch.optim.lr_scheduler
    return {
        "none": lambda: None,
        "step": lambda: s.StepLR(opt, step_size=2, gamma=0.5),
        "exponential": lambda: s.ExponentialLR(opt, gamma=0.9),
        "cosine": lambda: s.CosineAnnealingLR(opt, T_max=steps, eta_min=1e-4),
        "cyclic": lambda: s.CyclicLR(
            opt,
            base_lr=1e-3,
            max_lr=1e-2,
            step_size_up=4,
            cycle_momentum=isinstance(opt, torch.optim.SGD) and bool(opt.defaults.get("momentum")),
        ),
        "onecycle": lambda: s.OneCycleLR(
            opt,
            max_lr=1e-2,
            total_steps=steps,
            cycle_momentum="betas" in opt.defaults or bool(opt.defaults.get("momentum")),
        ),
        "plateau": lambda: s.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=0),
        "warmup_cosine": lambda: s.SequentialLR(
            opt,
            [s.LinearLR(opt, start_factor=0.1, total_iters=3), s.CosineAnnealingLR(opt, T_max=steps)],
            milestones=[3],
        ),
    }[name]()


PER_BATCH = {"cyclic", "onecycle", "cosine", "warmup_cosine", "step", "exponential"}


def build(cfg: dict[str, Any]) -> dict[str, Any]:
    random.seed(cfg["seed"])  # a reproducible script seeds every RNG it has
    np.random.seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(cfg["samples"], 10, generator=gen)
    y = (x[:, 0] > 0).long()
    loader = DataLoader(
        TensorDataset(x, y),
        batch_size=cfg["batch_size"],
        shuffle=True,
        num_workers=cfg["num_workers"],
        persistent_workers=False,
    )
    model = TinyNet(cfg["ballast"])
    model.ballast.requires_grad_(not cfg["frozen"])
    opt = make_optimizer(cfg["optimizer"], model.parameters())
    steps_per_epoch = len(loader) // cfg["accumulate"] + (1 if len(loader) % cfg["accumulate"] else 0)
    sched = make_scheduler(cfg["scheduler"], opt, steps_per_epoch * cfg["epochs"] + 1)
    state: dict[str, Any] = {"model": model, "optimizer": opt, "loader": loader}
    if sched is not None:
        state["scheduler"] = sched
    if cfg["amp"]:
        state["scaler"] = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=3)
    return state


def train(
    cfg: dict[str, Any],
    run_dir: str,
    kill_at: int | None = None,
    crash_at: int | None = None,
    **protect_kw: Any,
) -> dict[str, Any]:
    """Train to the end (resuming if checkpoints exist). ``crash_at`` raises inside the
    loop (an in-process stand-in for a crash); ``kill_at`` SIGKILLs the process."""
    cfg = {**DEFAULT, **cfg}
    state = build(cfg)
    model, opt, loader = state["model"], state["optimizer"], state["loader"]
    sched, scaler = state.get("scheduler"), state.get("scaler")
    kw = {"every_steps": cfg["every_steps"], "every_epochs": 1, **protect_kw}
    if "keep_last" in cfg:
        kw["keep_last"] = cfg["keep_last"]
    if cfg["frozen"]:
        kw["incremental"] = True
    with guardian.protect(state, dir=run_dir, **kw) as g:
        for _epoch in g.epochs(cfg["epochs"]):
            model.train()
            for xb, yb in g.batches(loader):
                i = g.batch_in_epoch - 1  # the batch's index in the epoch, also after a mid-epoch resume
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg["amp"]):
                    loss = nn.functional.cross_entropy(model(xb), yb) / cfg["accumulate"]
                if scaler is not None:
                    scaler.scale(loss).backward()
                else:
                    loss.backward()
                last = i + 1 == len(loader)
                if (i + 1) % cfg["accumulate"] == 0 or last:
                    if scaler is not None:
                        scaler.step(opt)
                        scaler.update()
                    else:
                        opt.step()
                    opt.zero_grad()
                    if sched is not None and cfg["scheduler"] in PER_BATCH:
                        sched.step()
                g.step()
                if crash_at is not None and g.global_step == crash_at:
                    raise RuntimeError("simulated crash")
                if kill_at is not None and g.global_step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            model.eval()
            with torch.no_grad():
                xs, ys = loader.dataset.tensors
                val = nn.functional.cross_entropy(model(xs), ys)
            if sched is not None and cfg["scheduler"] == "plateau":
                sched.step(val.item())
            g.report(val_loss=val)
    return state


if __name__ == "__main__":
    import logging

    logging.basicConfig(
        level=logging.INFO, format="%(message)s", stream=sys.stdout
    )  # drill reads "saved …" lines
    run, cfg_json = sys.argv[1], sys.argv[2]
    kill = os.environ.get("KILL_AT_STEP")
    train(json.loads(cfg_json), run, kill_at=int(kill) if kill else None)
