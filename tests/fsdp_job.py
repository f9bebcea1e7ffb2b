"""FSDP2 (fully_shard) under guardian.protect, at any world size (gloo on CPU).

    python tests/fsdp_job.py train RUN DUMP       train a few steps, save, dump full state
    python tests/fsdp_job.py resume CKPT RUN DUMP resume from CKPT, dump full state, save
    python tests/fsdp_job.py best RUN OUTDIR      early stopping with restore_best: dumps the
                                                  weights at the best report (best), at the
                                                  end of the loop (last), after the guard (restored)

With WORLD_SIZE > 1 (env://) the model is sharded with fully_shard; alone it is a
plain module. ``FORCE_DIST=1`` sets up the process group even for one rank;
``WRAP=ddp`` wraps the model in DistributedDataParallel instead of sharding it. A "dump" is the full (unsharded) model and Adam state, gathered on
rank 0 and written with safetensors (test-side only), so tests can compare runs at
different world sizes bit for bit.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

import guardian


def build() -> tuple[nn.Module, torch.optim.Optimizer, bool]:
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or os.environ.get("FORCE_DIST") == "1"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 5))  # 12 and 5 rows: uneven shards
    if distributed:
        dist.init_process_group("gloo")
        if os.environ.get("WRAP") == "ddp":
            model = nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in (model[0], model[2]):
                fully_shard(layer)
            fully_shard(model)
    return model, torch.optim.Adam(model.parameters(), lr=1e-2), distributed


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def dump(model: nn.Module, opt: torch.optim.Optimizer, path: str) -> None:
    names = {id(p): n for n, p in model.named_parameters()}
    out = {f"model/{k}": full(v).detach().clone() for k, v in model.state_dict().items()}
    for p, st in opt.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"optim/{names[id(p)]}/{k}"] = full(v).detach().clone()
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in out.items()}, path)


def steps(model: nn.Module, opt: torch.optim.Optimizer, g, n: int) -> None:
    gen = torch.Generator().manual_seed(7)
    for _ in range(n):
        x = torch.randn(6, 8, generator=gen)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        g.step()


SCORES = [3.0, 2.0, 1.0, 1.5, 2.5, 3.5, 4.5, 5.5]  # best after epoch 2, then worse: early stop


def best(model: nn.Module, opt: torch.optim.Optimizer, run: str, out: str) -> None:
    """Early stopping with restore_best. The best checkpoint is taken at the end of the
    epoch whose report improved, with no training in between: the weights dumped at
    that report are the ones restore_best must bring back."""
    with guardian.protect(
        model=model,
        optimizer=opt,
        dir=run,
        every_steps=None,
        every_epochs=1,
        monitor="loss",
        mode="min",
        patience=2,
        restore_best=True,
    ) as g:
        for epoch in g.epochs(len(SCORES)):
            steps(model, opt, g, 2)
            g.report(loss=SCORES[epoch])
            if SCORES[epoch] == min(SCORES[: epoch + 1]):
                dump(model, opt, os.path.join(out, "best.safetensors"))
        assert g.should_stop, "early stopping did not fire"
        dump(model, opt, os.path.join(out, "last.safetensors"))
    dump(model, opt, os.path.join(out, "restored.safetensors"))


def main() -> None:
    mode = sys.argv[1]
    model, opt, distributed = build()
    if mode == "best":
        best(model, opt, sys.argv[2], sys.argv[3])
    elif mode == "train":
        run, out = sys.argv[2], sys.argv[3]
        with guardian.protect(model=model, optimizer=opt, dir=run, every_steps=None, every_epochs=None) as g:
            steps(model, opt, g, 3)
        dump(model, opt, out)
    else:
        ckpt, run, out = sys.argv[2], sys.argv[3], sys.argv[4]
        with guardian.protect(model=model, optimizer=opt, dir=run, resume=ckpt, every_epochs=None) as g:
            dump(model, opt, out)
            g.save("resharded")
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
