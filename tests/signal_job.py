"""Sends itself a signal in the middle of step 6 (between backward and the optimizer
step) — the checkpoint must be taken after step 6 completes, never inside it."""

import os
import signal
import sys

import torch

import guardian

run_dir, signame = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = torch.nn.Linear(3, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
with guardian.protect(model=model, optimizer=opt, dir=run_dir, every_epochs=None) as g:
    for step in range(1, 20):
        model(torch.randn(4, 3)).sum().backward()
        if step == 6:
            os.kill(os.getpid(), getattr(signal, signame))
        opt.step()
        opt.zero_grad()
        g.step()
sys.exit(3)  # never reached: the guard exits at the boundary
