"""A tiny real training run for the daemon's integration tests (CPU, a few parameters).

Trains into ``$GUARDIAN_RUN_DIR`` under guardian.protect, so it resumes from the newest
valid checkpoint whenever the daemon restarts it. Knobs (env):
    TINY_EPOCHS        epochs (default 6; 25 steps each)
    TINY_EVERY         checkpoint every N optimizer steps (default 10)
    TINY_SLEEP         seconds per step (default 0.01), so tests can kill it mid-run
    TINY_HANG_AT       hang (sleep forever) at this step, once: a marker file in the run
                       dir remembers that the hang happened
    TINY_FAIL          raise this exception class (by name) at start-up, before training
    TINY_EXIT0_EARLY   exit 0 from inside the loop at this step (no "finished" marker)
    TINY_EXIT_AT       STEP:CODE — exit with CODE at that step, after its checkpoints (e.g. 30:78)
"""

from __future__ import annotations

import builtins
import os
import sys
import time


def env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v else None


def main() -> None:
    run_dir = os.environ["GUARDIAN_RUN_DIR"]
    if os.environ.get("TINY_FAIL"):
        print("starting up ...", flush=True)
        raise getattr(builtins, os.environ["TINY_FAIL"])("deliberate start-up failure")
    import random

    import numpy
    import torch  # after the start-up failure point, so failing attempts stay fast
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import guardian

    random.seed(0)  # every RNG is checkpointed, so every RNG must be seeded for equal digests
    numpy.random.seed(0)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(200, 4, generator=gen)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, num_workers=0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sleep = float(os.environ.get("TINY_SLEEP", "0.01"))
    hang_at, exit0_at = env_int("TINY_HANG_AT"), env_int("TINY_EXIT0_EARLY")
    exit_step, _, exit_code = os.environ.get("TINY_EXIT_AT", "").partition(":")
    marker = os.path.join(run_dir, "hung-once")
    with guardian.protect(
        {"model": model, "optimizer": opt, "loader": loader},
        dir=run_dir,
        every_steps=int(os.environ.get("TINY_EVERY", "10")),
        every_epochs=None,
    ) as g:
        for _ in g.epochs(int(os.environ.get("TINY_EPOCHS", "6"))):
            for xb, yb in g.batches(loader):
                loss = nn.functional.mse_loss(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                g.step()
                time.sleep(sleep)
                if hang_at is not None and g.global_step == hang_at and not os.path.exists(marker):
                    open(marker, "w").close()
                    print(f"hanging at step {g.global_step}", flush=True)
                    while True:
                        time.sleep(3600)
                if exit0_at is not None and g.global_step == exit0_at:
                    os._exit(0)
                if exit_step and g.global_step == int(exit_step):
                    os._exit(int(exit_code))
    print(f"finished at step {g.global_step}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
