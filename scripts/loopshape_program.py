"""One generated training program: a tiny real training loop under guardian.protect,
shaped by a JSON-able ``shape`` dict (see loopshape_space.py for what each key means).

The program follows the loop rules users are told (README, "where a run resumes"):
``g.step()`` ends the batch body, code after the batch loop is the epoch body, every
random draw flows from seeds set before ``protect()``. Everything else — where the
scheduler steps, where ``report()`` sits, evaluation with dropout and its own RNG
draws, accumulation, manual saves, ``g.extra`` counters, early stopping — varies.

``kill`` (optional) makes the program stop itself at a precise point of the loop
(SIGKILL, or SIGTERM to itself or to its whole process group) so a kill is
reproducible from its description; kills timed from outside and crashes inside a
save (``GUARDIAN_FAULT``) are arranged by the harness (scripts/loopshapes.py).

After the ``with`` block the program writes a fingerprint of everything a resume
must reproduce (model, optimizer, scheduler, RNGs, ``g.extra``, progress, the
reported metrics) to ``out_path``; the harness compares those of an uninterrupted
twin and of a run that was killed and resumed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, get_worker_info

import guardian

FEATURES = 8
STEP_PHASES = ("fetched", "before_gstep", "after_gstep", "after_report")
EPOCH_PHASES = ("eval", "epoch_end")


class NoisyData(Dataset):
    """A map-style dataset whose optional augmentation draws random numbers: from the
    global torch RNG in the main process, and from the loader's base seed plus the
    sample index in a worker (so which worker fetches a sample does not matter)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, augment: bool) -> None:
        self.x, self.y, self.augment = x, y, augment

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[idx]
        if self.augment:
            info = get_worker_info()
            if info is None:
                x = x + 0.1 * torch.randn(FEATURES)
            else:
                gen = torch.Generator().manual_seed((info.seed - info.id + idx) % 2**63)
                x = x + 0.1 * torch.randn(FEATURES, generator=gen)
        return x, self.y[idx]


class Net(nn.Module):
    def __init__(self, dropout: float, batchnorm: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(FEATURES, 16)
        self.norm = nn.BatchNorm1d(16) if batchnorm else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.norm(self.fc1(x)))))


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


def make_scheduler(name: str, opt: torch.optim.Optimizer, total: int) -> Any:
    """``total``: an upper bound of how often the scheduler will be stepped."""
    s = torch.optim.lr_scheduler
    momentum = "betas" in opt.defaults or bool(opt.defaults.get("momentum"))
    return {
        "none": lambda: None,
        "step": lambda: s.StepLR(opt, step_size=2, gamma=0.5),
        "exponential": lambda: s.ExponentialLR(opt, gamma=0.9),
        "cosine": lambda: s.CosineAnnealingLR(opt, T_max=total, eta_min=1e-4),
        "cyclic": lambda: s.CyclicLR(
            opt,
            base_lr=1e-3,
            max_lr=1e-2,
            step_size_up=3,
            cycle_momentum=isinstance(opt, torch.optim.SGD) and bool(opt.defaults.get("momentum")),
        ),
        "onecycle": lambda: s.OneCycleLR(opt, max_lr=1e-2, total_steps=total, cycle_momentum=momentum),
        "plateau": lambda: s.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=0),
        "warmup": lambda: s.SequentialLR(
            opt,
            [s.LinearLR(opt, start_factor=0.1, total_iters=2), s.ExponentialLR(opt, gamma=0.8)],
            milestones=[2],
        ),
    }[name]()


class Killer:
    """Stops the program at the point ``spec`` names, once."""

    def __init__(self, spec: dict[str, Any] | None) -> None:
        how = spec and spec.get("how")
        self.spec = spec if how in ("sigkill", "sigterm") else None

    def check(self, where: str, g: Any) -> None:
        spec = self.spec
        if spec is None or spec["where"] != where:
            return
        if where in STEP_PHASES:
            # before g.step() the step in progress is global_step + 1
            current = g.global_step + (1 if where in ("fetched", "before_gstep") else 0)
            if current != spec["step"]:
                return
        elif g.epoch != spec["epoch"]:
            return
        self.spec = None
        sig = signal.SIGKILL if spec["how"] == "sigkill" else signal.SIGTERM
        if spec.get("target") == "group":
            os.killpg(os.getpgid(0), sig)
            if sig == signal.SIGTERM:
                _wait_for_the_group_to_die()
        else:
            os.kill(os.getpid(), sig)


def _wait_for_the_group_to_die(deadline: float = 30.0) -> None:
    """After SIGTERM to the whole group, let the other members (DataLoader workers)
    die before this process goes on, as they would during any real training step:
    the signal reaches every process at once and workers exit in milliseconds. Makes
    the group kill reproducible instead of a race with the next batch fetch."""
    import time

    me, group = os.getpid(), os.getpgid(0)
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        alive = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == group and fields[0] != "Z":
                alive.append(entry)
        if not alive:
            return
        time.sleep(0.005)


def build(shape: dict[str, Any]) -> dict[str, Any]:
    """Everything random is seeded here, before protect() (rule 5)."""
    seed = shape["seed"]
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    data_gen = torch.Generator().manual_seed(seed + 1)
    n = shape["batch_size"] * shape["batches"] + (shape["batch_size"] // 2 if shape["partial"] else 0)
    x = torch.randn(n, FEATURES, generator=data_gen)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    xv = torch.randn(12, FEATURES, generator=data_gen)
    yv = (xv[:, 0] + 0.5 * xv[:, 1] > 0).long()
    data = NoisyData(x, y, shape["augment"])
    loader_kw: dict[str, Any] = {"batch_size": shape["batch_size"], "num_workers": shape["workers"]}
    if shape["loader_gen"] == "sampler":
        sampler_gen = torch.Generator().manual_seed(seed + 2)
        loader_kw["sampler"] = RandomSampler(data, generator=sampler_gen)
    else:
        loader_kw["shuffle"] = True
        if shape["loader_gen"] == "loader":
            loader_kw["generator"] = torch.Generator().manual_seed(seed + 3)
    loader = DataLoader(data, **loader_kw)
    val_loader = DataLoader(
        NoisyData(xv, yv, False),
        batch_size=6,
        num_workers=shape["workers"] if shape["eval_workers"] else 0,
    )
    model = Net(shape["dropout"], shape["batchnorm"])
    opt = make_optimizer(shape["optimizer"], model.parameters())
    total = (len(loader) + 1) * shape["epochs"] + 2
    sched = make_scheduler(shape["scheduler"], opt, total)
    parts: dict[str, Any] = {"model": model, "optimizer": opt, "loader": loader, "val_loader": val_loader}
    if sched is not None:
        parts["scheduler"] = sched
    if "own_gen" in shape["eval_rng"]:
        parts["eval_gen"] = torch.Generator().manual_seed(seed + 4)
    return parts


def protect_kwargs(shape: dict[str, Any]) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "every_steps": shape["every_steps"],
        "every_epochs": shape["every_epochs"],
        "async_save": shape["async_save"],
        "keep_last": shape["keep_last"],
    }
    if shape["monitor"]:
        kw.update(monitor=shape["monitor"], mode="min")
        if shape["patience"] is not None:
            kw.update(patience=shape["patience"], restore_best=shape["restore_best"])
    return kw


class Program:
    """The loop itself; ``run`` is the whole user program."""

    def __init__(self, shape: dict[str, Any], kill: dict[str, Any] | None, run_dir: str) -> None:
        self.shape = shape
        self.run_dir = run_dir
        self.killer = Killer(kill)
        self.parts = build(shape)
        self.model, self.opt = self.parts["model"], self.parts["optimizer"]
        self.sched = self.parts.get("scheduler")
        self.reports: list[dict[str, Any]] = []
        self.g: Any = None
        self.start: dict[str, Any] = {}

    def run(self) -> dict[str, Any]:
        trainer = {k: v for k, v in self.parts.items() if k != "val_loader"}
        with guardian.protect(trainer, **protect_kwargs(self.shape), dir=self.run_dir) as g:
            self.g = g
            self.start = {"epoch": g.epoch, "step": g.global_step, "batch": g.batch_in_epoch}
            if self.shape["extra"]:
                for key in ("micro", "evals", "epoch_ends"):
                    g.extra.setdefault(key, 0)
            for _epoch in g.epochs(self.shape["epochs"]):
                self.train_epoch()
                stop = self.epoch_body()
                if stop:
                    break
        return fingerprint(self)

    # ------------------------------------------------------------------ batches

    def train_epoch(self) -> None:
        g, s = self.g, self.shape
        loader = self.parts["loader"]
        self.model.train()
        for xb, yb in g.batches(loader):
            self.killer.check("fetched", g)
            last = g.batch_in_epoch == len(loader)
            loss = nn.functional.cross_entropy(self.model(xb), yb) / s["accumulate"]
            if s.get("unseeded_noise"):  # a rule-5 violation the harness must catch (its own test)
                loss = loss * (1 + 1e-3 * random.Random(os.urandom(8)).random())
            loss.backward()
            train_loss = loss.detach() * s["accumulate"]
            if s["extra"]:
                g.extra["micro"] += 1
            micro = g.global_step + 1 if s["carry_accumulation"] else g.batch_in_epoch
            boundary = micro % s["accumulate"] == 0 or (last and not s["carry_accumulation"])
            if s["report_before_step"] and (g.global_step + 1) % s["report_before_step"] == 0:
                self.report(train_loss=train_loss)  # rule 3: a save it asks for is taken at g.step()
            if boundary:
                self.opt.step()
                self.opt.zero_grad()
                if self.sched is not None and s["sched_at"] == "batch":
                    self.sched.step()
            self.killer.check("before_gstep", g)
            if s["explicit_boundary"]:
                g.step(boundary=boundary)
            else:
                g.step()
            self.killer.check("after_gstep", g)
            if s["report_mid"] and g.global_step % s["report_mid"] == 0:
                self.report(train_loss=train_loss)
                self.killer.check("after_report", g)
            if s["manual_save"] == "mid" and g.global_step % 4 == 0:
                g.save()

    # ------------------------------------------------------------------ epoch body

    def epoch_body(self) -> bool:
        """The code between the batch loop and the end of the epoch, in the drawn order."""
        g, s = self.g, self.shape
        val: float | None = None
        for op in s["epoch_ops"]:
            if op == "eval":
                val = self.evaluate()
            elif op == "sched" and self.sched is not None:
                self.sched.step()
            elif op == "plateau" and self.sched is not None:
                self.sched.step(val)
            elif op == "report":
                self.report(val_loss=val)
            elif op == "extra" and s["extra"]:
                g.extra["epoch_ends"] += 1
                g.extra["last_val"] = float(val).hex() if val is not None else None
            elif op == "save":
                g.save()
            elif op == "stop" and g.should_stop:
                return True
        self.killer.check("epoch_end", g)
        return False

    def evaluate(self) -> float:
        g, s = self.g, self.shape
        self.model.train(s["eval_mode"] == "train")  # dropout (and BatchNorm statistics) in train mode
        total, count = 0.0, 0
        with torch.no_grad():
            for i, (xb, yb) in enumerate(self.parts["val_loader"]):
                if i == 1:
                    self.killer.check("eval", g)
                total += nn.functional.cross_entropy(self.model(xb), yb, reduction="sum").item()
                count += len(yb)
        val = total / count
        if "numpy" in s["eval_rng"]:
            val += 1e-3 * float(np.random.rand())
        if "python" in s["eval_rng"]:
            val += 1e-3 * random.random()
        if "torch" in s["eval_rng"]:
            val += 1e-3 * torch.rand(1).item()
        if "own_gen" in s["eval_rng"]:
            val += 1e-3 * torch.rand(1, generator=self.parts["eval_gen"]).item()
        if s["extra"]:
            g.extra["evals"] += 1
        self.model.train()
        return val

    def report(self, **metrics: Any) -> None:
        g = self.g
        values = {k: float(v).hex() for k, v in metrics.items()}
        self.reports.append(
            {"epoch": g.epoch, "step": g.global_step, "batch": g.batch_in_epoch, "values": values}
        )
        g.report(**metrics)


# ---------------------------------------------------------------------- fingerprint


def _digest(t: torch.Tensor) -> str:
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    t = t.detach().cpu().contiguous().reshape(-1)
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _flatten(value: Any, key: str, out: dict[str, str]) -> None:
    if isinstance(value, torch.Tensor):
        out[key] = _digest(value)
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            _flatten(value[k], f"{key}/{k}", out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _flatten(v, f"{key}/{i}", out)
    elif isinstance(value, float):
        out[key] = value.hex()
    elif isinstance(value, np.ndarray):
        out[key] = hashlib.sha256(value.tobytes()).hexdigest()[:16]
    else:
        out[key] = repr(value)


def fingerprint(p: Program) -> dict[str, Any]:
    """Everything an exact resume must reproduce, as strings (floats in hex)."""
    g = p.g
    state: dict[str, str] = {}
    _flatten(p.model.state_dict(), "model", state)
    _flatten(p.opt.state_dict(), "optimizer", state)
    if p.sched is not None:
        _flatten(p.sched.state_dict(), "scheduler", state)
    _flatten({"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1]}, "rng", state)
    state["rng/python"] = hashlib.sha256(repr(random.getstate()).encode()).hexdigest()[:16]
    for name in ("eval_gen",):
        if name in p.parts:
            state[f"rng/{name}"] = _digest(p.parts[name].get_state())
    loader = p.parts["loader"]
    for i, gen in enumerate(guardian_loader_generators(loader)):
        state[f"rng/loader{i}"] = _digest(gen.get_state())
    state["extra"] = json.dumps(g.extra, sort_keys=True)
    state["progress"] = json.dumps({"epoch": g.epoch, "step": g.global_step})
    state["policy"] = json.dumps(g.policy.state_dict(), sort_keys=True)
    return {"state": state, "reports": p.reports, "start": p.start, "resumed_from": g.resumed_from}


def guardian_loader_generators(loader: Any) -> list[torch.Generator]:
    gens = []
    for owner in (loader, getattr(loader, "sampler", None)):
        gen = getattr(owner, "generator", None)
        if isinstance(gen, torch.Generator) and all(gen is not x for x in gens):
            gens.append(gen)
    return gens


def warm_imports() -> None:
    """Import what a run imports lazily (torch._dynamo alone costs seconds at the first
    optimizer), without running any torch operation: a process that only imported
    may fork children safely (no thread pool, no locks held), and each child starts
    warm. Used by the harness's fork mode."""
    import importlib

    for name in (
        "torch._dynamo",
        "torch.distributed.tensor",
        "torch.optim.lr_scheduler",
        "multiprocessing.popen_fork",
        "multiprocessing.queues",
        "multiprocessing.synchronize",
        "guardian.async_writer",
        "guardian.writer",
        "guardian.commit",
        "guardian.direct_io",
        "guardian.staging",
        "guardian.format.reader",
        "guardian.state.snapshot",
        "guardian.state.sharded",
    ):
        importlib.import_module(name)


def run(shape: dict[str, Any], kill: dict[str, Any] | None, run_dir: str, out_path: str) -> int:
    """Run the program to the end (resuming from ``run_dir``) and write its fingerprint."""
    result = Program(shape, kill, run_dir).run()
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, out_path)
    return 0


if __name__ == "__main__":  # a fresh interpreter per run: loopshape_program.py SHAPE KILL RUN_DIR OUT
    import sys

    kill_arg = json.loads(sys.argv[2])
    sys.exit(run(json.loads(sys.argv[1]), kill_arg, sys.argv[3], sys.argv[4]))
