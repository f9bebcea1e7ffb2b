"""The history survives restarts: a run SIGKILLed twice — once in the middle of a save,
once mid-epoch — and resumed has the uninterrupted run's ``history.csv`` row for row
(wall time aside), and TensorBoard's own reader sees each step exactly once with the
uninterrupted values.

Run as a script, this file is the training job: ``python test_history_resume.py RUN``
with ``KILL_AT_STEP=k`` (SIGKILL right after step k's rows) or ``KILL_IN_SAVE=point@n``
(SIGKILL at the n-th time a save reaches that point of the commit protocol).
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys

import pytest

HERE = os.path.abspath(__file__)


def train(run_dir: str) -> None:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import guardian
    import guardian.commit

    kill_at = int(os.environ.get("KILL_AT_STEP", "0"))
    _kill_inside_saves(guardian.commit, os.environ.get("KILL_IN_SAVE"))
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(48, 6, generator=gen)
    loader = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8, shuffle=True)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    kw = {"async_save": os.environ.get("WRITER", "async") == "async"}
    with guardian.protect(
        model=model, optimizer=opt, scheduler=sched, loader=loader, dir=run_dir,
        every_steps=4, monitor="val_loss", tensorboard=True, **kw,
    ) as g:  # fmt: skip
        for epoch in g.epochs(4):
            g.log(lr=sched.get_last_lr()[0])  # re-run by a mid-epoch resume: recorded once
            for xb, yb in g.batches(loader):
                out = model(xb)
                loss = nn.functional.mse_loss(out, yb)
                loss.backward()
                opt.step()
                opt.zero_grad()
                g.log(batch_loss=loss)  # before g.step(): at the previous step count
                g.step()
                g.log(loss=loss)  # after g.step(): kept by a checkpoint taken at this step
                if epoch >= 1:  # a metric that appears mid-run, with an awkward name
                    g.log(**{'within 1.0, "abs" — ü': (out - yb).abs().lt(1).float().mean()})
                if g.global_step == kill_at:
                    g.saver.wait_in_flight()  # the save at step 16 is committed: resume mid-epoch
                    os.kill(os.getpid(), signal.SIGKILL)
            model.eval()
            with torch.no_grad():
                val = nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
            model.train()
            sched.step()
            g.report(val_loss=val)


def _kill_inside_saves(commit_module: object, spec: str | None) -> None:
    """A real SIGKILL (not an exit) at the n-th time a save reaches ``point``."""
    if not spec:
        return
    point, _, nth = spec.partition("@")
    seen = {"n": 0}
    original = commit_module.fault_point

    def kill_here(name: str) -> None:
        original(name)
        if name == point:
            seen["n"] += 1
            if seen["n"] == int(nth or 1):
                os.kill(os.getpid(), signal.SIGKILL)

    commit_module.fault_point = kill_here


def run_job(run_dir: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, HERE, run_dir],
        env={**os.environ, "GUARDIAN_QUIET": "1", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def history_without_wall_time(run_dir: str) -> list[list[str]]:
    with open(os.path.join(run_dir, "history.csv"), newline="") as f:
        rows = list(csv.reader(f))
    wall = rows[0].index("wall_time")
    return [r[:wall] + r[wall + 1 :] for r in rows]


def tensorboard_scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    pytest.importorskip("tensorboard")
    run = str(tmp_path_factory.mktemp("ref") / "run")
    proc = run_job(run)
    assert proc.returncode == 0, proc.stderr
    return run


@pytest.mark.parametrize("writer", ["async", "sync"])
def test_killed_twice_history_equals_uninterrupted(tmp_path, reference, writer):
    run = str(tmp_path / "run")
    proc = run_job(run, WRITER=writer, KILL_IN_SAVE="save.before_manifest@3")  # the save at step 8
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # mid-epoch 2, after the save at step 16; this run first cuts the tail the first kill left
    proc = run_job(run, WRITER=writer, KILL_AT_STEP="17", GUARDIAN_QUIET="0")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "history: cut" in proc.stderr
    proc = run_job(run, WRITER=writer, GUARDIAN_QUIET="0")
    assert proc.returncode == 0, proc.stderr
    assert "history: cut" in proc.stderr
    assert "step 16, batch 4 of the epoch" in proc.stderr  # a mid-epoch resume: the harder cut
    assert history_without_wall_time(run) == history_without_wall_time(reference)

    got, want = tensorboard_scalars(run), tensorboard_scalars(reference)
    assert (
        sorted(got)
        == sorted(want)
        == sorted(["lr", "batch_loss", "loss", "val_loss", 'within 1.0, "abs" — ü'])
    )
    for tag, events in got.items():
        steps = [s for s, _ in events]
        assert len(steps) == len(set(steps)), f"{tag}: a step appears twice: {steps}"
        assert events == want[tag], tag


if __name__ == "__main__":
    train(sys.argv[1])
