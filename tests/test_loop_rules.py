"""Where checkpoints are taken, and that no user code ever runs twice after a resume.

Each test trains a tiny model with a given loop shape, interrupts it (an exception in
user code, or a preemption signal sent at a chosen moment) and resumes in fresh
objects; the result must equal the uninterrupted run bit for bit. The shapes are the
ones that broke in round 1: a per-epoch scheduler stepped before ``report()`` (the
MNIST example), a signal during evaluation, a mid-epoch report, accumulation whose
length does not divide the epoch.
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import guardian
from guardian import commit
from guardian.errors import CorruptCheckpointError
from guardian.format import reader
from guardian.format.layout import SET_ASIDE_DIR, TENSORS_FILE


class Interrupted(Exception):
    """Stands in for a crash at a chosen line of the user's program."""


def _build(seed: int = 0, loader_generator: bool = False):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(7))
    y = (x[:, 0] > 0).long()
    gen = torch.Generator().manual_seed(11) if loader_generator else None
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=gen)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Dropout(0.3), nn.Linear(12, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.02)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    return model, opt, sched, loader


def _evaluate(model, loader, train_mode: bool) -> float:
    """An evaluation that draws random numbers (dropout left on, plus a noise draw)."""
    model.train(train_mode)
    with torch.no_grad():
        loss = sum(nn.functional.cross_entropy(model(xb), yb).item() for xb, yb in loader)
    model.train()
    return loss / len(loader) + 1e-3 * torch.rand(()).item()


def _train(run_dir, *, epochs=4, shape="epoch_end", interrupt=None, accumulate=1, every_steps=None, **kw):
    """Train with the given loop shape. ``interrupt(where, g)`` may raise Interrupted."""
    model, opt, sched, loader = _build(loader_generator=kw.pop("loader_generator", False))
    state = {"model": model, "optimizer": opt, "scheduler": sched}
    hit = interrupt or (lambda where, g: None)
    with guardian.protect(
        state, dir=run_dir, monitor="val", every_steps=every_steps, async_save=False, keep_last=None, **kw
    ) as g:
        for _epoch in g.epochs(epochs):
            for xb, yb in g.batches(loader):
                i = g.batch_in_epoch - 1  # not enumerate(): right after a mid-epoch resume too
                loss = nn.functional.cross_entropy(model(xb), yb) / accumulate
                loss.backward()
                if (g.batch_in_epoch) % accumulate == 0:
                    opt.step()
                    opt.zero_grad()
                if shape == "mid_iteration_report" and i == 2:
                    g.report(val=_evaluate(model, loader, train_mode=True))
                g.step()
                hit("after_step", g)
                if shape == "mid_epoch_report" and i == 2:
                    g.report(val=_evaluate(model, loader, train_mode=True))
                    hit("after_mid_report", g)
            sched.step()  # per-epoch, *before* report: the MNIST example's shape
            hit("before_eval", g)
            val = _evaluate(model, loader, train_mode=True)
            hit("after_eval", g)
            g.report(val=val)
            hit("after_report", g)
            g.extra["seen"] = g.extra.get("seen", 0) + 1
    return model, opt, sched, g


def _same(a, b) -> None:
    (ma, oa, sa, ga), (mb, ob, sb, gb) = a, b
    for (k, va), (_, vb) in zip(ma.state_dict().items(), mb.state_dict().items(), strict=True):
        assert torch.equal(va, vb), f"model tensor {k} differs"
    for pa, pb in zip(ma.parameters(), mb.parameters(), strict=True):
        for key in oa.state[pa]:
            assert torch.equal(torch.as_tensor(oa.state[pa][key]), torch.as_tensor(ob.state[pb][key])), key
    assert sa.state_dict() == sb.state_dict()
    assert (ga.global_step, ga.epoch, ga.extra) == (gb.global_step, gb.epoch, gb.extra)


def _interrupt_at(where: str, epoch: int, nth: int = 1):
    seen = {"n": 0}

    def hit(at, g):
        if at == where and g.epoch == epoch:
            seen["n"] += 1
            if seen["n"] == nth:
                raise Interrupted(f"{where} in epoch {epoch}")

    return hit


@pytest.mark.parametrize("where", ["before_eval", "after_eval", "after_report"])
def test_crash_between_batch_loop_and_epoch_boundary_replays_nothing_twice(tmp_path, where):
    reference = _train(str(tmp_path / "ref"))
    run = str(tmp_path / "run")
    with pytest.raises(Interrupted):
        _train(run, interrupt=_interrupt_at(where, epoch=1))
    _same(_train(run), reference)


def test_best_and_epoch_saves_are_one_checkpoint_at_the_boundary(tmp_path):
    run = str(tmp_path / "run")
    _train(run, epochs=2)
    infos = [i for i in reader.list_checkpoints(run) if i.manifest]
    steps = [i.manifest.step for i in infos]
    assert len(steps) == len(set(steps)), f"two checkpoints at one step: {[i.name for i in infos]}"
    first = infos[0].manifest
    assert first.epoch == 1 and set(first.reason) >= {"best", "epoch"}, first.reason


def test_resume_from_the_best_checkpoint_alone_is_exact(tmp_path):
    """The round-1 failure: the best checkpoint at report() and the epoch checkpoint
    after it; a kill between the two left only the best one, and its resume stepped
    the per-epoch scheduler twice."""
    reference = _train(str(tmp_path / "ref"))
    run = str(tmp_path / "run")
    _train(run, epochs=2)
    for info in reader.list_checkpoints(run):
        if "best" not in info.manifest.reason:
            commit.delete_checkpoint(run, info.name)
    assert reader.list_checkpoints(run), "the best checkpoint is kept"
    _same(_train(run), reference)


def test_mid_epoch_report_after_step_resumes_at_the_next_batch(tmp_path):
    """The best checkpoint of a report() after g.step() is taken at the end of that
    batch's body; a crash inside the body before its end replays the batch instead."""
    reference = _train(str(tmp_path / "ref"), shape="mid_epoch_report")
    run = str(tmp_path / "run")
    with pytest.raises(Interrupted):
        # crash in the next batch's body: the report's batch ended, so its checkpoint is taken
        _train(run, shape="mid_epoch_report", interrupt=_interrupt_at("after_step", epoch=2, nth=4))
    newest = reader.newest_valid(run).manifest
    assert newest.epoch == 2 and newest.batch_in_epoch == 3 and "best" in newest.reason
    _same(_train(run, shape="mid_epoch_report"), reference)


def test_report_before_step_is_saved_at_that_step(tmp_path):
    reference = _train(str(tmp_path / "ref"), shape="mid_iteration_report")
    run = str(tmp_path / "run")
    with pytest.raises(Interrupted):
        _train(run, shape="mid_iteration_report", interrupt=_interrupt_at("after_step", epoch=1, nth=4))
    bests = [i.manifest for i in reader.list_checkpoints(run) if "best" in i.manifest.reason]
    # taken at the g.step() after the report (batch 3), or at an epoch boundary (batch 0)
    assert any(m.batch_in_epoch == 3 for m in bests), [(m.epoch, m.batch_in_epoch) for m in bests]
    assert all(m.batch_in_epoch in (0, 3) for m in bests), [(m.epoch, m.batch_in_epoch) for m in bests]
    _same(_train(run, shape="mid_iteration_report"), reference)


def test_step_save_and_best_at_one_step_make_one_checkpoint(tmp_path):
    run = str(tmp_path / "run")
    _train(run, epochs=2, shape="mid_epoch_report", every_steps=3)  # step 3 = batch 3 of epoch 0
    at_three = [i for i in reader.list_checkpoints(run) if i.manifest.step == 3]
    assert len(at_three) == 1 and set(at_three[0].manifest.reason) >= {"steps", "best"}


def test_every_steps_falls_on_multiples(tmp_path):
    run = str(tmp_path / "run")
    _train(run, epochs=3, every_steps=4, save_best=False, every_epochs=None)
    steps = sorted(i.manifest.step for i in reader.list_checkpoints(run))
    assert [s for s in steps if s != 15] == [4, 8, 12], steps  # 15: the final save


def test_a_step_save_due_on_an_epochs_last_batch_joins_the_epoch_save(tmp_path):
    """5 batches an epoch and every_steps=5: the step save falls on each epoch's last
    batch, right before the epoch save at the same step. One checkpoint, both reasons,
    at the boundary; a crash during the next epoch's evaluation resumes from it exactly."""
    reference = _train(str(tmp_path / "ref"), every_steps=5, save_best=False)
    run = str(tmp_path / "run")
    with pytest.raises(Interrupted):
        _train(run, every_steps=5, save_best=False, interrupt=_interrupt_at("after_eval", epoch=1))
    infos = reader.list_checkpoints(run)
    steps = [i.manifest.step for i in infos]
    assert steps == [5], [i.name for i in infos]  # one checkpoint at step 5, not step-5 and step-5-1
    assert set(infos[0].manifest.reason) == {"steps", "epoch"} and infos[0].manifest.batch_in_epoch == 0
    _same(_train(run, every_steps=5, save_best=False), reference)


def test_a_run_ending_with_gradients_pending_takes_no_final_checkpoint(tmp_path, caplog):
    """Accumulation of 2 over 5 batches an epoch: the last epoch ends with a gradient
    pending. A checkpoint holds no gradients, so the final save is skipped (with a
    warning) and a longer run in the same directory ends as if never stopped."""
    caplog.set_level(logging.WARNING, logger="guardian")
    reference = _train(str(tmp_path / "ref"), accumulate=2, epochs=4)
    run = str(tmp_path / "run")
    _train(run, accumulate=2, epochs=3)
    assert "ended with gradients pending" in caplog.text
    assert not [i.name for i in reader.list_checkpoints(run) if "final" in i.manifest.reason]
    extended = _train(run, accumulate=2, epochs=4)
    _same(extended, reference)
    for pa, pb in zip(extended[0].parameters(), reference[0].parameters(), strict=True):
        assert (pa.grad is None) == (pb.grad is None) and (pa.grad is None or torch.equal(pa.grad, pb.grad))


def test_an_optimizer_step_after_the_loop_makes_the_final_checkpoint_whole(tmp_path, caplog):
    """The leftover micro-batches flushed by an optimizer step after the loop (no
    ``g.step()`` after it): nothing is pending, so the final checkpoint is taken."""
    caplog.set_level(logging.WARNING, logger="guardian")
    model, opt, sched, loader = _build()
    with guardian.protect(model=model, optimizer=opt, dir=str(tmp_path / "run"), async_save=False) as g:
        for _epoch in g.epochs(1):
            for xb, yb in g.batches(loader):  # 5 batches, a step every 2: one pending at the end
                nn.functional.cross_entropy(model(xb), yb).backward()
                if g.batch_in_epoch % 2 == 0:
                    opt.step()
                    opt.zero_grad()
                g.step()
        opt.step()  # the flush
        opt.zero_grad()
    assert "gradients pending" not in caplog.text
    newest = reader.newest_valid(str(tmp_path / "run")).manifest
    assert "final" in newest.reason, newest.reason


def test_epoch_save_waits_for_a_pending_accumulation(tmp_path):
    """5 batches an epoch, accumulation of 2: the epoch ends with a gradient pending.
    The epoch save must wait for the optimizer step, never land inside it."""

    def train(run, interrupt=None):
        return _train(run, accumulate=2, epochs=3, interrupt=interrupt)

    reference = train(str(tmp_path / "ref"))
    run = str(tmp_path / "run")
    with pytest.raises(Interrupted):
        train(run, interrupt=_interrupt_at("after_step", epoch=1, nth=3))
    for info in reader.list_checkpoints(run):  # only right after an optimizer step (batch 2 or 4)
        assert info.manifest.batch_in_epoch in (2, 4), (info.name, info.manifest.batch_in_epoch)
    _same(train(run), reference)


def test_loader_generator_is_restored_at_an_epoch_boundary(tmp_path):
    reference = _train(str(tmp_path / "ref"), loader_generator=True)
    run = str(tmp_path / "run")
    with pytest.raises(Interrupted):
        _train(run, loader_generator=True, interrupt=_interrupt_at("after_step", epoch=2, nth=1))
    assert reader.newest_valid(run).manifest.batch_in_epoch == 0  # resumes at the boundary
    _same(_train(run, loader_generator=True), reference)


SIGTERM_IN_EVAL = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import test_loop_rules as t
def hit(where, g):
    if where == "after_eval" and g.epoch == 1 and not os.path.exists({flag!r}):
        open({flag!r}, "w").close()
        os.kill(os.getpid(), signal.SIGTERM)  # the signal arrives during evaluation
t._train({run!r}, interrupt=hit)
"""


def test_sigterm_during_evaluation_saves_at_the_boundary_and_resumes_exactly(tmp_path):
    reference = _train(str(tmp_path / "ref"))
    run, flag = str(tmp_path / "run"), str(tmp_path / "signalled")
    code = SIGTERM_IN_EVAL.format(tests=os.path.join(ROOT, "tests"), flag=flag, run=run)
    env = {**os.environ, "GUARDIAN_QUIET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == guardian.EXIT_REQUEUE, proc.stderr[-2000:]
    newest = reader.newest_valid(run).manifest
    assert newest.epoch == 2 and newest.batch_in_epoch == 0 and "preempt" in newest.reason
    _same(_train(run), reference)


def test_misspelled_option_is_a_type_error_with_a_suggestion(tmp_path):
    model, opt, _, _ = _build()
    with pytest.raises(TypeError, match="every_step.*did you mean every_steps"):
        guardian.protect(model=model, optimizer=opt, dir=str(tmp_path), every_step=5)
    with pytest.raises(TypeError, match="keep_lst.*did you mean keep_last"):
        guardian.protect(model=model, optimizer=opt, dir=str(tmp_path), keep_lst=1)
    guardian.protect(model=model, optimizer=opt, scheduler=None, dir=str(tmp_path))  # None: left out


def test_a_monitor_never_reported_is_a_warning(tmp_path, caplog):
    model, opt, _, loader = _build()
    with caplog.at_level(logging.WARNING, logger="guardian"):
        with guardian.protect(model=model, optimizer=opt, dir=str(tmp_path), monitor="val_loss") as g:
            for _ in g.epochs(2):
                for xb, yb in g.batches(loader):
                    nn.functional.cross_entropy(model(xb), yb).backward()
                    opt.step()
                    opt.zero_grad()
                    g.step()
                g.report(valloss=1.0)
    warnings = [r.getMessage() for r in caplog.records if "was not reported" in r.getMessage()]
    assert len(warnings) == 1 and "did you mean 'valloss'" in warnings[0]


def test_changed_learning_rate_on_rerun_is_named(tmp_path, caplog):
    run = str(tmp_path / "run")
    _train(run, epochs=1)
    model, opt, sched, loader = _build()
    for group in opt.param_groups:
        group["lr"] = 0.5
        group["initial_lr"] = 0.5
    with caplog.at_level(logging.WARNING, logger="guardian"):
        with guardian.protect(model=model, optimizer=opt, scheduler=sched, dir=run, monitor="val"):
            pass
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "optimizer lr: 0.02 in the checkpoint's run, 0.5 in this script" in text
    assert "checkpoint's values were kept" in text


def test_checkpoints_that_all_fail_stop_the_run_instead_of_starting_fresh(tmp_path):
    run = str(tmp_path / "run")
    _train(run, epochs=2)
    names = [i.name for i in reader.list_checkpoints(run)]
    for name in names:
        with open(os.path.join(run, name, TENSORS_FILE), "r+b") as f:
            f.seek(-8, os.SEEK_END)
            f.write(b"\xff" * 8)
    with pytest.raises(CorruptCheckpointError, match="none can be restored"):
        _train(run, epochs=3)
    assert [i.name for i in reader.list_checkpoints(run)] == names  # nothing set aside
    with open(os.path.join(run, "run.json")) as f:
        status = json.load(f)  # the failed start is recorded, not left saying "running"
    assert status["state"] == "failed" and status["error"]["type"] == "CorruptCheckpointError", status
    _train(run, epochs=1, resume=False)  # asked for: a fresh start, the old ones set aside
    assert len(os.listdir(os.path.join(run, SET_ASIDE_DIR))) == len(names)


def test_crash_after_a_mid_epoch_report_before_its_batch_ends_replays_the_batch(tmp_path):
    reference = _train(str(tmp_path / "ref"), shape="mid_epoch_report", every_steps=3)
    run = str(tmp_path / "run")
    with pytest.raises(Interrupted):
        _train(
            run, shape="mid_epoch_report", every_steps=3, interrupt=_interrupt_at("after_mid_report", epoch=2)
        )
    _same(_train(run, shape="mid_epoch_report", every_steps=3), reference)
