"""Shared models and helpers for the migrate tests (imported by test_migrate_*.py).

The old/new model pair is the seed case in miniature: the same CNN with
``conv1``/``conv2`` renamed to ``embed_1``/``embed_2`` (28×28 MNIST-shaped input,
so the numbers match the seed, but a narrow fc1 keeps it fast).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from guardian.commit import CheckpointTxn
from guardian.format.manifest import Manifest
from guardian.state.discover import discover
from guardian.state.snapshot import capture, write_files


class OldNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, 1)
        self.conv2 = nn.Conv2d(4, 8, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.fc1 = nn.Linear(8 * 12 * 12, 16)
        self.fc2 = nn.Linear(16, 10)

    def trunk(self, x: torch.Tensor, c1: nn.Module, c2: nn.Module) -> torch.Tensor:
        x = F.max_pool2d(F.relu(c2(F.relu(c1(x)))), 2)
        x = torch.flatten(self.dropout1(x), 1)
        return F.log_softmax(self.fc2(F.relu(self.fc1(x))), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x, self.conv1, self.conv2)


class NewNet(OldNet):
    """conv1/conv2 became embed_1/embed_2 (same registration order)."""

    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.embed_1 = nn.Conv2d(1, 4, 3, 1)
        self.embed_2 = nn.Conv2d(4, 8, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.fc1 = nn.Linear(8 * 12 * 12, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x, self.embed_1, self.embed_2)


class WideNet(OldNet):
    """Same names, different configuration (fc1 twice as wide)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8 * 12 * 12, 32)
        self.fc2 = nn.Linear(32, 10)


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def batch(seed: int = 0, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    model.train()
    for i in range(start, start + steps):
        torch.manual_seed(1000 + i)  # dropout masks depend only on the step
        x, y = batch(i)
        opt.zero_grad()
        F.nll_loss(model(x), y).backward()
        opt.step()


def trained(seed: int = 0, steps: int = 3) -> tuple[OldNet, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = OldNet()
    opt = torch.optim.Adadelta(model.parameters(), lr=1.0)
    train_steps(model, opt, steps)
    return model, opt


def write_ckpt(path: str, objects: dict[str, Any], step: int = 3) -> str:
    """A guardian checkpoint of ``objects`` written with the library's own capture and
    commit path (what protect() does, minus the loop)."""
    adapters, _ = discover(None, objects)
    snap = capture({n: (a.kind, a.state_dict()) for n, a in adapters.items()})
    parent, name = os.path.split(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with CheckpointTxn(parent, name) as txn:
        write_files(txn, snap)
        man = Manifest(
            name=name,
            step=step,
            epoch=0,
            seq=1,
            files={},
            reason=["test"],
            components={n: {"kind": c["kind"]} for n, c in snap.components.items()},
        )
        return txn.commit(man)


def test_helpers_write_a_loadable_checkpoint(tmp_path):
    from guardian.state.snapshot import load

    model, opt = trained(steps=1)
    path = write_ckpt(str(tmp_path / "ck"), {"model": model, "optimizer": opt})
    loaded = load(path)
    assert loaded["model"][0] == "module" and "conv1.weight" in loaded["model"][1]
    assert "conv1.weight" in loaded["optimizer"][1]["state"]


class DoubledOldNet(OldNet):
    """Loads OldNet weights but computes something else: the numeric check must fail."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)
