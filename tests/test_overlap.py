"""Overlap (guardian/overlap.py): the staging copy of parameters and optimizer state runs
while the loop goes on, and a committed checkpoint is always exactly the state at its
step — byte for byte what a synchronous save at that step writes.

The hostile loops drive the real writer with real threads on tiny real models; the
only artificial thing is a seeded, random pause inside the background copy (so that
the loop's actions land before, during and after the copy of each tensor, as they
would on a large model). The test keeps its own clone of every tensor at each save
and compares every committed checkpoint with it.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import tempfile
import threading

import pytest
import torch
from helpers import final_digest, run_trainlib
from test_async_writer import assert_same_files, manifest_for
from torch import nn

import guardian
from guardian import overlap as overlap_mod
from guardian.async_writer import AsyncWriter
from guardian.format import reader
from guardian.state import snapshot as snap_mod
from guardian.writer import SyncWriter


@pytest.fixture(autouse=True)
def no_thread_leaks():
    yield
    leaked = [
        t.name for t in threading.enumerate() if t.name.startswith(("guardian-persist", "guardian-overlap"))
    ]
    assert not leaked, f"threads still running: {leaked}"
    assert "data" not in torch.Tensor.__dict__ and "numpy" not in torch.Tensor.__dict__


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(24, 48)
        self.bn = nn.BatchNorm1d(48)
        self.fc2 = nn.Linear(48, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def states_of(model: nn.Module, opt: torch.optim.Optimizer, ema: nn.Module) -> dict:
    return {
        "model": ("module", model.state_dict()),
        "optimizer": ("optimizer", opt.state_dict()),
        "ema": ("module", ema.state_dict()),
    }


def train_step(model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator) -> None:
    x = torch.randn(16, 24, generator=gen)
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


def submit(writer, run_dir: str, name: str, states: dict, committed: list[str]) -> dict[str, bytes]:
    """Submit a save; return the reference: every tensor's bytes at this moment."""
    snap = snap_mod.capture(states)
    reference = {
        k: t.contiguous().reshape(-1).view(torch.uint8).clone() for k, t in snap.tensors.items() if t.numel()
    }
    writer.submit(run_dir, snap, manifest_for(name, snap), lambda path, _m: committed.append(path))
    return reference


def assert_holds(path: str, reference: dict[str, torch.Tensor]) -> None:
    stored = snap_mod.read_tensors(os.path.join(path, "tensors.safetensors"))
    assert set(k for k, t in stored.items() if t.numel()) == set(reference)
    for key, want in reference.items():
        assert torch.equal(stored[key].contiguous().reshape(-1).view(torch.uint8), want.reshape(-1)), key


# ---------------------------------------------------------------- same bytes as sync


def test_overlapped_save_writes_the_same_bytes_as_a_synchronous_save(tmp_path):
    torch.manual_seed(0)
    model, ema = Net(), Net()
    writer = AsyncWriter(overlap=True)
    try:
        opt = torch.optim.Adam(model.parameters())
        gen = torch.Generator().manual_seed(1)
        train_step(model, opt, gen)  # the pre-hook sees the optimizer: its tensors may be deferred
        sync: list[str] = []
        submit(SyncWriter(), str(tmp_path), "sync", states_of(model, opt, ema), sync)
        done: list[str] = []
        submit(writer, str(tmp_path), "overlapped", states_of(model, opt, ema), done)
        assert writer._copy is not None, "parameters and optimizer state were not deferred"
        train_step(model, opt, gen)  # forward/backward during the copy; the step waits for it
        writer.wait()
    finally:
        writer.close()
    assert len(done) == 1
    assert_same_files(sync[0], done[0])


def test_nothing_is_deferred_before_an_optimizer_stepped_or_on_the_way_out(tmp_path):
    torch.manual_seed(0)
    model, ema = Net(), Net()
    writer = AsyncWriter(overlap=True)
    try:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        done: list[str] = []
        submit(writer, str(tmp_path), "before-any-step", states_of(model, opt, ema), done)
        assert writer._copy is None
        train_step(model, opt, torch.Generator().manual_seed(0))
        snap = snap_mod.capture(states_of(model, opt, ema))
        man = manifest_for("final", snap)
        man.reason = ["final"]
        writer.submit(str(tmp_path), snap, man, lambda p, _m: done.append(p))
        assert writer._copy is None  # the process is about to exit: nothing to overlap with
        writer.wait()
    finally:
        writer.close()
    assert len(done) == 2


# ---------------------------------------------------------------- hostile loops

ACTIONS = [
    "forward",  # BatchNorm statistics change in place (not seen by version counters)
    "backward",
    "step",  # the guarded optimizer: its pre-hook closes the window
    "second_optimizer",  # an optimizer guardian was not given steps shared parameters
    "nograd_param_edit",  # p.mul_() under no_grad: version bump -> refused
    "buffer_edit",
    "load_state_dict",  # copies into every parameter: version bump -> refused
    "ema_update",  # lerp_ of an EMA model (saved, not owned by an optimizer)
    "data_edit",  # p.data.mul_(): no version bump; .data waits for the copy
    "numpy_edit",  # p.detach().numpy() written: .numpy() waits for the copy
]
TEARING = {"nograd_param_edit", "load_state_dict"}


def hostile_loop(seed: int, run_dir: str) -> dict[str, int]:
    os.makedirs(run_dir)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model, ema = Net(), Net()
    writer = AsyncWriter(overlap=True)
    outcome = {"committed": 0, "refused": 0, "overlapped": 0}
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        second = torch.optim.SGD(model.fc2.parameters(), lr=1e-3)  # not in the checkpoint
        train_step(model, opt, gen)
        for save in range(rng.randint(3, 6)):
            done: list[str] = []
            reference = submit(writer, run_dir, f"s{seed}-{save}", states_of(model, opt, ema), done)
            overlapped = writer._copy is not None
            outcome["overlapped"] += overlapped
            window_open, tore = overlapped, False
            for _ in range(rng.randint(0, 6)):
                action = rng.choice(ACTIONS)
                if window_open and action in ("step", "second_optimizer"):
                    window_open = False
                tore |= window_open and action in TEARING
                act(action, model, opt, second, ema, gen)
            writer.wait()
            if done:
                assert not tore, (
                    f"seed {seed}: save {save} committed although a parameter changed in its window"
                )
                assert_holds(done[0], reference)
                outcome["committed"] += 1
            else:
                assert tore, f"seed {seed}: save {save} refused without a change outside the optimizer"
                assert not writer.overlap, "after a refusal every save must copy blocking"
                outcome["refused"] += 1
    finally:
        writer.close()
    return outcome


def act(action, model, opt, second, ema, gen) -> None:
    x = torch.randn(16, 24, generator=gen)
    if action == "forward":
        model(x)
    elif action == "backward":
        model(x).square().mean().backward()
    elif action == "step":
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    elif action == "second_optimizer":
        model(x).sum().backward()
        second.step()
        second.zero_grad()
    elif action == "nograd_param_edit":
        with torch.no_grad():
            model.fc1.weight.mul_(0.99)
    elif action == "buffer_edit":
        model.bn.running_var.add_(0.5)
    elif action == "load_state_dict":
        model.load_state_dict({k: v + 1 for k, v in model.state_dict().items()})
    elif action == "ema_update":
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 0.1)
    elif action == "data_edit":
        model.fc2.weight.data.mul_(0.5)
    elif action == "numpy_edit":
        model.fc1.bias.detach().numpy()[:] += 1.0


@pytest.fixture
def random_copy_pauses(monkeypatch):
    """Seeded pauses in the background copy, so actions land before, during and after
    the copy of each tensor (a large model's copy takes long; this one's does not)."""
    real = overlap_mod.copy_into_arena
    rng = random.Random(1234)
    lock = threading.Lock()

    def paused(dst, src):
        with lock:
            spins = rng.choice([0, 0, 10, 1000, 20000])
        for _ in range(spins):  # busy work, not a sleep: no timing is asserted
            pass
        real(dst, src)

    monkeypatch.setattr(overlap_mod, "copy_into_arena", paused)


def test_hostile_loops_never_commit_a_checkpoint_that_differs_from_a_synchronous_save(
    tmp_path, random_copy_pauses
):
    root = tempfile.mkdtemp(dir="/dev/shm") if os.path.isdir("/dev/shm") else str(tmp_path)  # cheap fsyncs
    totals = {"committed": 0, "refused": 0, "overlapped": 0}
    try:
        for seed in range(60):
            for k, v in hostile_loop(seed, os.path.join(root, f"run{seed}")).items():
                totals[k] += v
    finally:
        shutil.rmtree(root, ignore_errors=True)
    # the generator really exercised both outcomes and the overlapped path
    assert totals["committed"] > 60 and totals["refused"] > 5 and totals["overlapped"] > 60, totals


def test_a_refused_checkpoint_leaves_the_previous_one_and_says_why(tmp_path, caplog):
    torch.manual_seed(0)
    model, ema = Net(), Net()
    writer = AsyncWriter(overlap=True)
    gen = torch.Generator().manual_seed(0)
    try:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        train_step(model, opt, gen)
        first: list[str] = []
        submit(writer, str(tmp_path), "good", states_of(model, opt, ema), first)
        train_step(model, opt, gen)
        writer.wait()
        torn: list[str] = []
        submit(writer, str(tmp_path), "torn", states_of(model, opt, ema), torn)
        with torch.no_grad():
            model.fc1.weight.add_(1.0)
        with caplog.at_level(logging.WARNING):
            writer.wait()
        assert not torn and not writer.overlap
        assert "fc1.weight" in caplog.text and "not committed" in caplog.text
        after: list[str] = []
        reference = submit(writer, str(tmp_path), "after", states_of(model, opt, ema), after)
        assert writer._copy is None
        with torch.no_grad():
            model.fc1.weight.add_(1.0)  # harmless now: the copy was made before submit returned
        writer.wait()
    finally:
        writer.close()
    assert sorted(os.listdir(tmp_path)) == ["after", "good"]  # nothing of the refused one is left
    assert reader.inspect_checkpoint(first[0], verify=True).manifest.name == "good"
    assert_holds(after[0], reference)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


# ---------------------------------------------------------------- protect() and exact resume


def test_overlap_is_off_by_default_and_the_option_or_env_turn_it_on(tmp_path, monkeypatch):
    model = nn.Linear(2, 2)
    monkeypatch.delenv("GUARDIAN_OVERLAP", raising=False)
    with guardian.protect({"model": model}, dir=str(tmp_path / "a"), save_on_exit=False) as g:
        assert not g._writer.overlap
    with guardian.protect({"model": model}, dir=str(tmp_path / "b"), overlap=True, save_on_exit=False) as g:
        assert g._writer.overlap
    monkeypatch.setenv("GUARDIAN_OVERLAP", "1")
    with guardian.protect({"model": model}, dir=str(tmp_path / "c"), save_on_exit=False) as g:
        assert g._writer.overlap
    with guardian.protect({"model": model}, dir=str(tmp_path / "d"), overlap=False, save_on_exit=False) as g:
        assert not g._writer.overlap


CFG = {"optimizer": "adamw", "scheduler": "onecycle", "epochs": 3, "every_steps": 2}


@pytest.fixture(scope="module")
def blocking_reference(tmp_path_factory):
    """The final checkpoint of an uninterrupted run that never overlaps."""
    run = str(tmp_path_factory.mktemp("blocking") / "run")
    proc = run_trainlib(run, CFG, env={"GUARDIAN_OVERLAP": "0"})
    assert proc.returncode == 0, proc.stderr
    return final_digest(run)


@pytest.mark.parametrize("kill_at", [5, 12])
def test_sigkill_with_overlap_resumes_bit_exact(tmp_path, blocking_reference, kill_at):
    run = str(tmp_path / "run")
    proc = run_trainlib(run, CFG, env={"KILL_AT_STEP": str(kill_at), "GUARDIAN_OVERLAP": "1"})
    assert proc.returncode == -signal.SIGKILL
    assert any(i.valid for i in reader.list_checkpoints(run, verify=True)), "a checkpoint before the kill"
    proc = run_trainlib(run, CFG, env={"GUARDIAN_OVERLAP": "1"})
    assert proc.returncode == 0, proc.stderr
    assert final_digest(run) == blocking_reference


@pytest.mark.parametrize("edit", ["data_edit", "numpy_edit", "nograd_param_edit"])
def test_an_edit_while_the_copy_is_held_waits_for_it_or_is_refused(tmp_path, monkeypatch, edit):
    """Deterministic: the background copy does not start before the loop reached for
    ``.data``/``.numpy()`` (or, for the no_grad edit, before the edit is done)."""
    torch.manual_seed(0)
    model, ema = Net(), Net()
    writer = AsyncWriter(overlap=True)
    reached = threading.Event()
    real_wait, real_copy = overlap_mod.WINDOW.wait_copied, overlap_mod.copy_into_arena

    def noting_wait() -> None:
        reached.set()
        real_wait()

    def held_copy(dst, src) -> None:
        assert reached.wait(120), "the loop never reached the edit"
        real_copy(dst, src)

    monkeypatch.setattr(overlap_mod.WINDOW, "wait_copied", noting_wait)
    try:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        train_step(model, opt, torch.Generator().manual_seed(0))
        monkeypatch.setattr(overlap_mod, "copy_into_arena", held_copy)
        done: list[str] = []
        reference = submit(writer, str(tmp_path), "held", states_of(model, opt, ema), done)
        assert writer._copy is not None and not writer._copy.copied
        if edit == "nograd_param_edit":
            act(edit, model, opt, None, ema, None)
            reached.set()
        else:
            act(edit, model, opt, None, ema, torch.Generator())
            assert writer._copy.copied  # the access waited for the copy
        writer.wait()
    finally:
        writer.close()
    if edit == "nograd_param_edit":
        assert not done and not writer.overlap
    else:
        assert len(done) == 1
        assert_holds(done[0], reference)


def test_a_failure_of_the_background_copy_is_raised_and_nothing_is_committed(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model, ema = Net(), Net()
    writer = AsyncWriter(overlap=True)
    try:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        train_step(model, opt, torch.Generator().manual_seed(0))

        def broken(dst, src) -> None:
            raise RuntimeError("copy broke")

        monkeypatch.setattr(overlap_mod, "copy_into_arena", broken)
        done: list[str] = []
        submit(writer, str(tmp_path), "broken", states_of(model, opt, ema), done)
        with pytest.raises(RuntimeError, match="copy broke"):
            writer.wait()
    finally:
        writer.close()
    assert not done and os.listdir(tmp_path) == []
