"""The training function for tests/test_ray_train.py, run by a `guardian export ray` driver.

Each Ray worker trains its own tiny model under guardian.protect into the one shared
``$GUARDIAN_RUN_DIR`` (Ray initialises torch.distributed, so protect is rank-aware:
one checkpoint, one part per rank). ``RAY_JOB_KILL_AT=STEP``: worker rank 1 SIGKILLs itself at that
step, once (a marker file remembers it), so Ray's FailureConfig restarts the group and
guardian resumes every worker from its newest valid checkpoint.
"""

from __future__ import annotations

import os
import random
import signal


def train(config: dict) -> None:
    import numpy
    import ray.train
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import guardian
    from guardian.export.ray import report

    rank = ray.train.get_context().get_world_rank()
    run_dir = os.environ["GUARDIAN_RUN_DIR"]  # shared: rank-aware protect writes one part per rank
    random.seed(rank)
    numpy.random.seed(rank)
    torch.manual_seed(rank)
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(64, 4, generator=gen)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    kill_at = int(os.environ.get("RAY_JOB_KILL_AT") or 0)
    marker = os.path.join(os.environ["GUARDIAN_RUN_DIR"], "killed-once")
    with guardian.protect(
        {"model": model, "optimizer": opt, "loader": loader}, dir=run_dir, every_steps=4, async_save=False
    ) as g:
        for epoch in g.epochs(3):
            for xb, yb in g.batches(loader):
                loss = nn.functional.mse_loss(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                g.step()
                if kill_at and rank == 1 and g.global_step == kill_at and not os.path.exists(marker):
                    open(marker, "w").close()
                    os.kill(os.getpid(), signal.SIGKILL)
            if rank == 0:
                report({"epoch": epoch, "loss": float(loss)}, run_dir)
            else:
                ray.train.report({"epoch": epoch})
