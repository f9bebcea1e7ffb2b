"""protect(): bad input gets a clear error and loses nothing; locks; policies end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import trainlib
from helpers import ROOT, final_digest
from torch import nn

import guardian
from guardian.errors import (
    CheckpointWriteError,
    FormatVersionError,
    MetricError,
    NothingToProtectError,
    RunLockedError,
    StateMismatchError,
    UnsupportedStateError,
)
from guardian.format import reader


def _tiny():
    model = nn.Linear(3, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _train_steps(g, model, opt, n):
    for _ in range(n):
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        opt.zero_grad()
        g.step()


def test_nothing_recognisable_is_refused(tmp_path):
    with pytest.raises(NothingToProtectError, match="found no model, optimizer"):
        guardian.protect({"lr": 0.1, "name": "x"}, dir=str(tmp_path))


def test_unwritable_directory_is_refused_clearly(tmp_path):
    if os.geteuid() == 0:
        target = "/proc/guardian-cannot-exist/run"  # even root cannot create this
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = str(ro / "run")
    model, opt = _tiny()
    with pytest.raises(CheckpointWriteError, match="cannot create checkpoint directory"):
        with guardian.protect(model=model, optimizer=opt, dir=target):
            pass


def test_shape_mismatch_names_the_keys(tmp_path):
    model, opt = _tiny()
    with guardian.protect(model=model, optimizer=opt, dir=str(tmp_path)) as g:
        _train_steps(g, model, opt, 2)
    bigger = nn.Linear(3, 5)
    with pytest.raises(StateMismatchError) as e:
        with guardian.protect(
            model=bigger, optimizer=torch.optim.SGD(bigger.parameters(), lr=0.1), dir=str(tmp_path)
        ):
            pass
    assert "weight: checkpoint (2, 3) vs model (5, 3)" in str(e.value)
    assert "guardian migrate" in str(e.value)
    assert reader.newest_valid(str(tmp_path)) is not None  # nothing lost


def test_renamed_parameters_are_not_silently_misassigned(tmp_path):
    class A(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Linear(3, 3)

    class B(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_1 = nn.Linear(3, 3)

    a = A()
    with guardian.protect(model=a, optimizer=torch.optim.Adam(a.parameters()), dir=str(tmp_path)):
        pass
    b = B()
    with pytest.raises(StateMismatchError, match="missing from the checkpoint"):
        with guardian.protect(model=b, optimizer=torch.optim.Adam(b.parameters()), dir=str(tmp_path)):
            pass


def test_newer_format_version_is_refused_with_upgrade_hint(tmp_path):
    model, opt = _tiny()
    with guardian.protect(model=model, optimizer=opt, dir=str(tmp_path)) as g:
        _train_steps(g, model, opt, 1)
    ckpt = reader.newest_valid(str(tmp_path)).path
    manifest = json.loads(open(os.path.join(ckpt, "manifest.json")).read())
    manifest["version"] = 99
    with open(os.path.join(ckpt, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(FormatVersionError, match="Upgrade guardian"):
        guardian.protect(model=model, optimizer=opt, dir=str(tmp_path), resume=ckpt).__enter__()


def test_metric_that_is_not_a_number(tmp_path):
    model, opt = _tiny()
    with guardian.protect(model=model, optimizer=opt, dir=str(tmp_path), monitor="val") as g:
        with pytest.raises(MetricError, match="must be a number"):
            g.report(val="good")
        with pytest.raises(MetricError, match="3 elements"):
            g.report(val=torch.ones(3))


def test_tensor_metric_keeps_no_graph(tmp_path):
    model, opt = _tiny()
    with guardian.protect(model=model, optimizer=opt, dir=str(tmp_path), monitor="loss") as g:
        loss = model(torch.randn(4, 3)).pow(2).mean()
        g.report(loss=loss)
        assert isinstance(g.metrics["loss"], float)


def test_unstorable_extra_names_its_key_path(tmp_path):
    model, opt = _tiny()
    with pytest.raises(UnsupportedStateError, match=r"at extra\['callback'\] without pickle"):
        with guardian.protect(model=model, optimizer=opt, dir=str(tmp_path), save_on_exit=False) as g:
            g.extra["callback"] = lambda: None
            g.save()


@pytest.mark.parametrize("async_save", [True, False])
def test_sparse_buffer_is_refused_naming_its_key_and_nothing_is_committed(tmp_path, async_save):
    """A sparse tensor has no flat bytes to store: the first save refuses it with a
    guardian error naming the key, instead of a raw torch error from the staging copy
    (an outside user's report)."""
    model, opt = _tiny()
    index = torch.tensor([[0, 1], [1, 0]])
    model.register_buffer(
        "sp", torch.sparse_coo_tensor(index, torch.tensor([1.0, 2.0]), (2, 2), check_invariants=True)
    )
    with pytest.raises(UnsupportedStateError, match=r"sparse_coo tensor at model/sp.*to_dense"):
        with guardian.protect(
            model=model, optimizer=opt, dir=str(tmp_path), async_save=async_save, save_on_exit=False
        ) as g:
            _train_steps(g, model, opt, 2)
            g.save()
    assert reader.list_checkpoints(str(tmp_path)) == []


def test_second_process_on_the_same_directory_is_refused(tmp_path):
    model, opt = _tiny()
    code = (
        "import sys, torch, guardian\n"
        "m = torch.nn.Linear(2, 2)\n"
        "try:\n"
        f"    guardian.protect(model=m, dir={str(tmp_path)!r}).__enter__()\n"
        "except guardian.RunLockedError as e:\n"
        "    print(e); sys.exit(7)\n"
    )
    with guardian.protect(model=model, optimizer=opt, dir=str(tmp_path)):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 7, proc.stderr
    assert f"pid {os.getpid()}" in proc.stdout


def test_lock_is_released_on_exit(tmp_path):
    model, opt = _tiny()
    with guardian.protect(model=model, optimizer=opt, dir=str(tmp_path)):
        with pytest.raises(RunLockedError):
            guardian.protect(model=model, optimizer=opt, dir=str(tmp_path)).__enter__()
    with guardian.protect(model=model, optimizer=opt, dir=str(tmp_path)):
        pass


def test_exception_in_loop_writes_no_checkpoint_and_marks_failed(tmp_path):
    model, opt = _tiny()
    with pytest.raises(ZeroDivisionError):
        with guardian.protect(model=model, optimizer=opt, dir=str(tmp_path), every_steps=2) as g:
            _train_steps(g, model, opt, 3)  # saves at step 2
            model.weight.data.add_(1.0)  # a half-updated state...
            1 / 0  # noqa: B018 — ...must not be saved
    names = [i.name for i in reader.list_checkpoints(str(tmp_path))]
    assert names == ["step-000000002"]
    status = json.load(open(tmp_path / "run.json"))
    assert status["state"] == "failed" and status["error"]["type"] == "ZeroDivisionError"


def test_resume_false_sets_existing_checkpoints_aside(tmp_path):
    model, opt = _tiny()
    with guardian.protect(model=model, optimizer=opt, dir=str(tmp_path)) as g:
        _train_steps(g, model, opt, 1)
    with guardian.protect(model=model, optimizer=opt, dir=str(tmp_path), resume=False) as g:
        assert g.global_step == 0 and g.resumed_from is None
    assert os.listdir(tmp_path / "set-aside")  # moved, never deleted


def test_resume_from_a_named_older_checkpoint(tmp_path):
    model, opt = _tiny()
    with guardian.protect(model=model, optimizer=opt, dir=str(tmp_path), every_steps=1, keep_last=None) as g:
        _train_steps(g, model, opt, 4)
    with guardian.protect(model=model, optimizer=opt, dir=str(tmp_path), resume="step-000000002") as g:
        assert g.global_step == 2
    names = [i.name for i in reader.list_checkpoints(str(tmp_path))]
    assert "step-000000004" not in names  # superseded ones are set aside, not deleted
    assert any(n.startswith("step-000000004") for n in os.listdir(tmp_path / "set-aside"))


def test_corrupt_newest_is_set_aside_and_previous_used(tmp_path):
    model, opt = _tiny()
    with guardian.protect(model=model, optimizer=opt, dir=str(tmp_path), every_steps=1) as g:
        _train_steps(g, model, opt, 3)
    newest = reader.list_checkpoints(str(tmp_path))[-1]
    with open(os.path.join(newest.path, "tensors.safetensors"), "r+b") as f:
        f.seek(-1, 2)
        byte = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    with guardian.protect(model=model, optimizer=opt, dir=str(tmp_path)) as g:
        assert g.global_step == 2
    assert any(n.startswith(newest.name) for n in os.listdir(tmp_path / "set-aside"))


def test_retention_keeps_last_best_and_resume_source(tmp_path):
    model, opt = _tiny()
    values = iter([5.0, 3.0, 4.0, 4.5, 6.0, 7.0])
    with guardian.protect(
        model=model,
        optimizer=opt,
        dir=str(tmp_path),
        every_steps=1,
        every_epochs=None,
        keep_last=2,
        keep_best=1,
        monitor="loss",
        save_best=True,
        save_on_exit=False,
    ) as g:
        for _ in range(6):
            _train_steps(g, model, opt, 1)
            g.report(loss=next(values))
    infos = reader.list_checkpoints(str(tmp_path))
    best = [i for i in infos if "best" in i.manifest.reason]
    assert best[-1].manifest.metrics["loss"] == 3.0
    assert infos[-1].manifest.step == 6
    assert len(infos) <= 4  # last 2 (+ the step-6 duplicate after report) + best


def test_keep_every_keeps_forever(tmp_path):
    model, opt = _tiny()
    with guardian.protect(
        model=model,
        optimizer=opt,
        dir=str(tmp_path),
        every_steps=1,
        every_epochs=None,
        keep_last=1,
        keep_every=3,
    ) as g:
        _train_steps(g, model, opt, 7)
    steps = [i.manifest.step for i in reader.list_checkpoints(str(tmp_path))]
    assert steps == [3, 6, 7]


def test_early_stopping_restores_best_weights(tmp_path):
    model, opt = _tiny()
    losses = [3.0, 2.0, 2.5, 2.6, 2.7, 1.0]
    best_weight = None
    with guardian.protect(model=model, optimizer=opt, dir=str(tmp_path), monitor="val_loss", patience=2) as g:
        for epoch in g.epochs(6):
            _train_steps(g, model, opt, 1)
            if losses[epoch] == 2.0:
                best_weight = model.weight.detach().clone()
            g.report(val_loss=losses[epoch])
    assert g.should_stop and g.epoch == 4  # stopped after 2 bad epochs (patience=2), never saw the 1.0
    assert torch.equal(model.weight, best_weight)
    status = json.load(open(tmp_path / "run.json"))
    assert status["state"] == "finished" and status["early_stopped"] is True


def test_nan_is_never_best(tmp_path):
    model, opt = _tiny()
    with guardian.protect(
        model=model,
        optimizer=opt,
        dir=str(tmp_path),
        monitor="val",
        mode="max",
        every_epochs=None,
        save_on_exit=False,
    ) as g:
        g.report(val=float("nan"))
        g.report(val=0.5)
        g.report(val=float("nan"))
        g.report(val=float("inf"))
    assert g.policy.best == 0.5
    assert [i.manifest.reason for i in reader.list_checkpoints(str(tmp_path))] == [["best"]]


def test_every_seconds(tmp_path):
    import time

    model, opt = _tiny()
    with guardian.protect(
        model=model,
        optimizer=opt,
        dir=str(tmp_path),
        every_seconds=0.05,
        every_epochs=None,
        save_on_exit=False,
        keep_last=None,
    ) as g:
        for _ in range(3):
            time.sleep(0.06)
            _train_steps(g, model, opt, 1)
    assert len(reader.list_checkpoints(str(tmp_path))) == 3


def test_ddp_and_compile_wrappers_are_unwrapped(tmp_path):
    model, opt = _tiny()
    compiled = torch.compile(model)  # not run: only the wrapper's state-dict keys matter
    with guardian.protect(model=compiled, optimizer=opt, dir=str(tmp_path)) as g:
        _train_steps(g, model, opt, 1)
    ckpt = reader.newest_valid(str(tmp_path))
    from guardian.state.snapshot import load

    assert set(load(ckpt.path)["model"][1]) == {"weight", "bias"}


def test_trainer_object_discovery_and_user_stateful(tmp_path):
    class Counter:
        def __init__(self):
            self.n = 0

        def state_dict(self):
            return {"n": self.n}

        def load_state_dict(self, s):
            self.n = s["n"]

    class Trainer:
        def __init__(self):
            self.model, self.opt = _tiny()
            self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(self.opt)
            self.counter = Counter()
            self.gen = torch.Generator().manual_seed(3)
            self.lr = 0.1  # plain config: ignored

    t = Trainer()
    with guardian.protect(t, dir=str(tmp_path)) as g:
        assert set(g.components) == {"model", "opt", "sched", "counter", "gen"}
        t.counter.n = 41
        torch.rand(3, generator=t.gen)
        g.extra["note"] = {"k": [1, 2.5, None]}
    t2 = Trainer()
    with guardian.protect(t2, dir=str(tmp_path)) as g:
        assert t2.counter.n == 41
        assert g.extra["note"] == {"k": [1, 2.5, None]}
        assert torch.equal(t2.gen.get_state(), t.gen.get_state())


def test_finished_run_rerun_does_nothing_more(tmp_path):
    cfg = {"epochs": 2}
    trainlib.train(cfg, str(tmp_path))
    before = final_digest(str(tmp_path))
    trainlib.train(cfg, str(tmp_path))
    assert final_digest(str(tmp_path)) == before
    assert json.load(open(tmp_path / "run.json"))["state"] == "finished"


SIGNAL_JOB = os.path.join(ROOT, "tests", "signal_job.py")


@pytest.mark.parametrize("signame,code", [("SIGTERM", 75), ("SIGUSR1", 75), ("SIGUSR2", 75), ("SIGINT", 130)])
def test_signal_saves_at_next_boundary_and_exits(tmp_path, signame, code):
    proc = subprocess.run(
        [sys.executable, SIGNAL_JOB, str(tmp_path), signame],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "GUARDIAN_QUIET": "1"},
    )
    assert proc.returncode == code, proc.stderr
    newest = reader.newest_valid(str(tmp_path))
    assert newest.manifest.reason == ["preempt"]
    assert newest.manifest.step == 6  # the signal arrived during step 6: saved right after it
    assert json.load(open(tmp_path / "run.json"))["state"] == "preempted"


def test_refused_resume_leaves_the_live_model_untouched(tmp_path):
    """Resume reads weights straight into the live parameters — but only after every
    check passed on shapes alone; a mismatch anywhere must not half-load the model."""
    model, opt = _tiny()
    with guardian.protect(model=model, optimizer=opt, dir=str(tmp_path)) as g:
        _train_steps(g, model, opt, 2)
    fresh = nn.Linear(3, 2)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    other_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)  # different params
    with pytest.raises(StateMismatchError, match="different parameters"):
        with guardian.protect(model=fresh, optimizer=other_opt, dir=str(tmp_path)):
            pass
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_resume_loads_weights_in_place(tmp_path):
    model, opt = _tiny()
    with guardian.protect(model=model, optimizer=opt, dir=str(tmp_path)) as g:
        _train_steps(g, model, opt, 2)
    fresh, fresh_opt = _tiny()
    weight = fresh.weight
    with guardian.protect(model=fresh, optimizer=fresh_opt, dir=str(tmp_path)):
        pass
    assert fresh.weight is weight and torch.equal(fresh.weight, model.weight)
