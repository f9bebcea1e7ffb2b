"""guardian.load / guardian.open: reading a run from outside it, never writing to it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

import guardian
from guardian.format import reader

TESTS = os.path.dirname(os.path.abspath(__file__))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class OtherNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(6, 8)
        self.head = nn.Linear(8, 2)


def train(run: str, steps: int = 6, losses: list[float] | None = None) -> tuple[Net, torch.optim.Optimizer]:
    """A short run with a save every 2 steps and a best-metric checkpoint."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 6), torch.randint(0, 2, (32,))
    losses = losses or [0.9, 0.5, 0.7]
    with guardian.protect(
        dir=run, model=model, optimizer=opt, every_steps=2, every_epochs=None, monitor="val", async_save=False
    ) as g:
        for epoch in g.epochs(len(losses)):
            for i in g.batches(range(steps // len(losses))):
                loss = nn.functional.cross_entropy(model(x[i::4]), y[i::4])
                opt.zero_grad()
                loss.backward()
                opt.step()
                g.step()
            g.report(val=losses[epoch])
    return model, opt


def tree_digest(run: str) -> str:
    """Every entry's name and every file's bytes under ``run`` (hidden files too)."""
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(run)):
        dirs.sort()
        for name in sorted(dirs + files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, run).encode() + b"\0")
            if os.path.isfile(full) and not os.path.islink(full):
                with open(full, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("load") / "run")
    model, opt = train(path)
    return path, model, opt


def test_load_fills_the_objects_from_the_newest_checkpoint(run):
    path, trained, trained_opt = run
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    before = tree_digest(path)
    info = guardian.load(path, model=model, optimizer=opt)
    assert tree_digest(path) == before
    newest = reader.list_checkpoints(path)[-1]
    assert info.path == newest.path and info.step == newest.manifest.step == 6
    assert info.epoch == 3 and info.metrics["val"] == 0.7
    for a, b in zip(model.state_dict().values(), trained.state_dict().values()):
        assert torch.equal(a, b)
    saved = trained_opt.state_dict()["state"]
    for idx, s in opt.state_dict()["state"].items():
        assert torch.equal(s["exp_avg"], saved[idx]["exp_avg"])


def test_load_best_and_named(run):
    path, _, _ = run
    best = guardian.load(path, which="best", model=Net())
    assert best.metrics["val"] == 0.5 and "best" in best.reason
    named = guardian.load(path, which=reader.list_checkpoints(path)[0].name, model=Net())
    assert named.step == reader.list_checkpoints(path)[0].manifest.step
    with pytest.raises(guardian.CheckpointNotFoundError, match="no checkpoint named 'step-9'"):
        guardian.load(path, which="step-9", model=Net())


def test_load_by_checkpoint_path_and_without_objects(run):
    path, _, _ = run
    first = reader.list_checkpoints(path)[0]
    info = guardian.load(first.path)
    assert info.path == first.path and info.components == {}


def test_a_model_of_another_class_is_refused_before_anything_changes(run):
    path, _, _ = run
    other = OtherNet()
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(guardian.StateMismatchError) as e:
        guardian.load(path, model=other)
    assert "encoder.weight" in str(e.value) and "fc1.weight" in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_strict_false_loads_what_matches(run):
    path, trained, _ = run

    class Wider(Net):
        def __init__(self) -> None:
            super().__init__()
            self.extra = nn.Linear(2, 2)

    model = Wider()
    guardian.load(path, model=model, strict=False)
    assert torch.equal(model.fc1.weight, trained.fc1.weight)


def test_a_corrupt_newest_checkpoint_is_skipped_and_left_in_place(tmp_path):
    path = str(tmp_path / "run")
    train(path)
    newest = reader.list_checkpoints(path)[-1]
    tensors = os.path.join(newest.path, "tensors.safetensors")
    with open(tensors, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\xff\xff\xff\xff")
    before = tree_digest(path)
    info = guardian.load(path, model=Net())
    assert info.path != newest.path
    assert tree_digest(path) == before  # nothing set aside, nothing written


def test_open_is_lazy_and_dict_like(run):
    path, trained, _ = run
    with guardian.open(path) as ckpt:
        assert "model/fc1.weight" in ckpt
        assert any(k.startswith("optimizer/state/fc1.weight/") for k in ckpt)
        assert torch.equal(ckpt["model/fc2.bias"], trained.fc2.bias.detach())
        assert ckpt.components()["model"] == "module"
        state = ckpt.state("model")
        assert set(state) == set(trained.state_dict())
        assert ckpt.step == 6
    with pytest.raises(KeyError, match="not a tensor"):
        ckpt["model/nope"]


LOADER = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    import guardian
    from test_load import Net
    model = Net()
    info = guardian.load({run!r}, model=model)
    with guardian.open(info.path) as ckpt:
        assert all(torch.equal(v, ckpt["model/" + k]) for k, v in model.state_dict().items())
    print("LOADED", info.step)
    """
)

HOLDER = textwrap.dedent(
    """
    import os, sys, time, torch
    sys.path.insert(0, {tests!r})
    import guardian
    from test_load import Net
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with guardian.protect(dir={run!r}, model=model, optimizer=opt, every_steps=1, async_save=False) as g:
        for epoch in g.epochs(1):
            for i in g.batches(range(3)):
                model(torch.randn(4, 6)).sum().backward(); opt.step(); opt.zero_grad()
                g.step()
            open({ready!r}, "w").close()
            while not os.path.exists({go!r}):
                time.sleep(0.05)
    """
)


def test_load_in_a_second_process_while_training_holds_the_lock(tmp_path):
    run, ready, go = str(tmp_path / "run"), str(tmp_path / "ready"), str(tmp_path / "go")
    env = {**os.environ, "GUARDIAN_QUIET": "1"}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER.format(tests=TESTS, run=run, ready=ready, go=go)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(ready):
            assert holder.poll() is None, holder.stderr.read()
            assert time.monotonic() < deadline, "the training process never reached its pause"
            time.sleep(0.05)
        with pytest.raises(guardian.RunLockedError):  # the lock really is held
            guardian.protect(dir=run, model=Net()).__enter__()
        before = tree_digest(run)
        loader = subprocess.run(
            [sys.executable, "-c", LOADER.format(tests=TESTS, run=run)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert loader.returncode == 0, loader.stderr
        # step 3 ends the epoch: its save joins the epoch save at the boundary, after the pause
        assert "LOADED 2" in loader.stdout, loader.stdout
        assert tree_digest(run) == before
    finally:
        open(go, "w").close()
        holder.wait(timeout=120)
    assert holder.returncode == 0
