"""A DDP training job for the scale-out tests (CPU, gloo), run under torchrun or by hand.

Each rank shards the data with a shuffling DistributedSampler, has dropout, and trains
with AdamW + OneCycle under guardian.protect. Env knobs:
    KILL_RANK, KILL_AT_STEP   that rank SIGKILLs itself right after that step
    KILL_MARKER               ...only if this file does not exist yet (it is created first),
                              so a supervised restart is not killed again
    TERM_RANK, TERM_AT_STEP   that rank sends itself SIGTERM in the middle of that step
    FAIL_SAVE_RANK, FAIL_SAVE_AT
                              that rank's part of its FAIL_SAVE_AT-th save fails with ENOSPC
                              (raised where the rank writes its files, in whichever thread
                              runs the commit protocol); FAIL_SAVE_ERROR=bug raises a plain
                              RuntimeError there instead
    ON_SAVE_ERROR             passed to protect(on_save_error=...)
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import guardian


def _first_time(marker: str | None) -> bool:
    if not marker:
        return True
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _fail_a_save(rank: int) -> None:
    if int(os.environ.get("FAIL_SAVE_RANK", "-1")) != rank:
        return
    import errno

    from guardian import dist_commit
    from guardian.errors import CheckpointWriteError

    real, calls = dist_commit._write_part, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == int(os.environ["FAIL_SAVE_AT"]):
            if os.environ.get("FAIL_SAVE_ERROR") == "bug":
                raise RuntimeError("injected: not a write error")
            raise CheckpointWriteError("injected: no space left on device", errno.ENOSPC)
        return real(*args, **kwargs)

    dist_commit._write_part = failing


_ARENA: dict = {}


def _report_arena(g, rank: int, first_save_step: int) -> None:
    """REPORT_ARENA=<dir>: once step 1's batch has ended, the staging arena reserved in the
    background; once the first save's batch has ended, whether that save reused it."""
    out = os.environ.get("REPORT_ARENA")
    if not out or g.global_step not in (1, first_save_step):
        return
    arena = g._writer._arena
    if g.global_step == 1:
        arena._join_reservation()
        _ARENA.update(owner=arena._owner, capacity=arena.capacity)
        return
    with open(os.path.join(out, f"arena-rank{rank}.json"), "w") as f:
        json.dump({"reserved": _ARENA["capacity"], "reused": arena._owner is _ARENA["owner"]}, f)


def main(run_dir: str, cfg: dict) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    _fail_a_save(rank)
    random.seed(rank)
    np.random.seed(rank)
    torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts them)
    gen = torch.Generator().manual_seed(99)
    x = torch.randn(cfg.get("samples", 96), 8, generator=gen)
    y = (x.sum(1) > 0).long()
    sampler = DistributedSampler(TensorDataset(x, y), shuffle=True, seed=3)
    loader = DataLoader(TensorDataset(x, y), batch_size=4, sampler=sampler)
    model = DDP(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    epochs = cfg.get("epochs", 3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=len(loader) * epochs + 1)
    kill_at = (
        int(os.environ.get("KILL_AT_STEP", "0")) if int(os.environ.get("KILL_RANK", "-1")) == rank else 0
    )
    term_at = (
        int(os.environ.get("TERM_AT_STEP", "0")) if int(os.environ.get("TERM_RANK", "-1")) == rank else 0
    )
    with guardian.protect(
        {"model": model, "optimizer": opt, "scheduler": sched},
        dir=run_dir,
        every_steps=cfg.get("every_steps", 4),
        keep_last=None,
        on_save_error=os.environ.get("ON_SAVE_ERROR", "raise"),
    ) as g:
        for epoch in g.epochs(epochs):
            sampler.set_epoch(epoch)
            model.train()
            for xb, yb in g.batches(loader):
                # at the top of the next batch: step N's saves (and the arena reservation)
                # are taken at the end of its batch's body
                _report_arena(g, rank, cfg.get("every_steps", 4))
                loss = nn.functional.cross_entropy(model(xb), yb)
                loss.backward()
                if term_at and g.global_step + 1 == term_at:
                    os.kill(os.getpid(), signal.SIGTERM)
                opt.step()
                opt.zero_grad()
                sched.step()
                g.step()
                if kill_at and g.global_step == kill_at and _first_time(os.environ.get("KILL_MARKER")):
                    os.kill(os.getpid(), signal.SIGKILL)
            g.report(loss=loss)
    dist.barrier()  # nobody tears down while a peer is still talking (gloo aborts the peer)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})
