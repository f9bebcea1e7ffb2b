#!/usr/bin/env python3
"""The seed example: MNIST's CNN with Adadelta, StepLR, dropout and a shuffling
DataLoader with 2 workers, protected by guardian.

Kill it at any moment (Ctrl-C, SIGTERM, SIGKILL, a power cut) and run the same
command again: it resumes from the last good checkpoint and ends with exactly the
weights an uninterrupted run would have. No dataset can be downloaded here, so the
data are synthetic, MNIST-shaped and fully determined by --seed.

    python scripts/examples/mnist_cnn.py --dir runs/mnist --epochs 3 --samples 2048 --seed 1
"""

from __future__ import annotations

import argparse
import os
import random
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import guardian  # noqa: E402


class Net(nn.Module):
    """The seed article's CNN (~609k parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = torch.flatten(self.dropout1(x), 1)
        x = self.dropout2(F.relu(self.fc1(x)))
        return F.log_softmax(self.fc2(x), dim=1)


def synthetic_mnist(samples: int, seed: int, split: int = 0) -> TensorDataset:
    """MNIST-shaped data: 10 seeded prototype 'digits' plus noise. Learnable, and
    the same bytes for the same seed on every machine. Splits share the prototypes
    (the 'digits') and differ in labels and noise."""
    prototypes = torch.rand(10, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed * 7919 + split + 1)
    labels = torch.randint(0, 10, (samples,), generator=gen)
    images = prototypes[labels] + 0.5 * torch.randn(samples, 1, 28, 28, generator=gen)
    return TensorDataset((images - 0.5) / 0.5, labels)


def evaluate(model: nn.Module, loader: DataLoader) -> tuple[float, float]:
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            out = model(x)
            loss += F.nll_loss(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
    n = len(loader.dataset)
    return loss / n, correct / n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="run directory for checkpoints")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--samples", type=int, default=2048, help="training samples per epoch")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--every-steps", type=int, default=10, help="periodic checkpoint interval")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--lr", type=float, default=1.0)
    args = p.parse_args(argv)

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(
        1
    )  # bit-exactness does not depend on it, but 2 workers + threads oversubscribe 2 cores
    train_set = synthetic_mnist(args.samples, args.seed)
    val_set = synthetic_mnist(max(args.samples // 4, 64), args.seed, split=1)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, num_workers=args.workers)
    val_loader = DataLoader(val_set, batch_size=256)

    model = Net()
    optimizer = torch.optim.Adadelta(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)

    trainer = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    with guardian.protect(
        trainer, dir=args.dir, every_steps=args.every_steps, monitor="val_loss", mode="min", keep_last=3
    ) as g:
        for epoch in g.epochs(args.epochs):
            model.train()
            for x, y in g.batches(train_loader):
                optimizer.zero_grad()
                loss = F.nll_loss(model(x), y)
                loss.backward()
                optimizer.step()
                g.step()
                if g.global_step % 10 == 0:
                    print(f"epoch {epoch} step {g.global_step} loss {loss.item():.4f}", flush=True)
            val_loss, acc = evaluate(model, val_loader)
            print(f"epoch {epoch} val_loss {val_loss:.4f} accuracy {acc:.3f}", flush=True)
            scheduler.step()
            g.report(val_loss=val_loss, accuracy=acc)
    print(f"done: epoch {g.epoch}, step {g.global_step}, last checkpoint {g.last_checkpoint}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
