"""Exact resume across the optimizers and schedulers users actually use.

Each case trains to the end once (the reference), then trains again in a fresh run
directory, "crashes" at a seeded random step (an exception out of the loop — the
in-memory objects are then thrown away), scrambles every RNG, rebuilds everything
from scratch and resumes. The final checkpoint must be bit-for-bit equal to the
reference in every component: model, optimizer, scheduler, scaler, RNG, progress.
(Real SIGKILLs in subprocesses are in test_kill_resume.py.)
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import trainlib
from helpers import final_digest

OPTIMIZERS = ["sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "adadelta"]
SCHEDULERS = ["step", "exponential", "cosine", "cyclic", "onecycle", "plateau", "warmup_cosine"]


def _scramble_rng() -> None:
    random.seed(12345)
    np.random.seed(12345)
    torch.manual_seed(12345)


def _check_exact(tmp_path, cfg: dict, crash_at: int, **protect_kw) -> None:
    trainlib.train(cfg, str(tmp_path / "ref"), **protect_kw)
    run = str(tmp_path / "run")
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainlib.train(cfg, run, crash_at=crash_at, **protect_kw)
    _scramble_rng()
    trainlib.train(cfg, run, **protect_kw)
    ref_digest, ref_parts = final_digest(str(tmp_path / "ref"))
    got_digest, got_parts = final_digest(run)
    assert got_parts == ref_parts
    assert got_digest == ref_digest


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_optimizer_scheduler_matrix(tmp_path, optimizer, scheduler):
    crash_at = random.Random(f"{optimizer}-{scheduler}").randint(
        3, 23
    )  # from the first save on; before it a restart is a fresh start
    _check_exact(tmp_path, {"optimizer": optimizer, "scheduler": scheduler}, crash_at)


@pytest.mark.parametrize("crash_at", [3, 5, 7])
def test_gradient_accumulation(tmp_path, crash_at):
    # 8 batches per epoch, an optimizer step every 3: the last step of an epoch is short.
    _check_exact(tmp_path, {"optimizer": "adamw", "scheduler": "onecycle", "accumulate": 3}, crash_at)


def test_amp_with_grad_scaler(tmp_path):
    _check_exact(tmp_path, {"optimizer": "adam", "scheduler": "cosine", "amp": True}, crash_at=10)


@pytest.mark.slow
def test_dataloader_workers_shuffle_mid_epoch(tmp_path):
    cfg = {"optimizer": "momentum", "scheduler": "cyclic", "num_workers": 2, "epochs": 2}
    _check_exact(tmp_path, cfg, crash_at=5)  # step 5 of 8: mid-epoch


def test_resume_at_every_step_of_a_short_run(tmp_path):
    """No step is special: crash after each one in turn."""
    cfg = {"optimizer": "nesterov", "scheduler": "warmup_cosine", "epochs": 2, "every_steps": 1}
    trainlib.train(cfg, str(tmp_path / "ref"))
    ref = final_digest(str(tmp_path / "ref"))[0]
    for k in range(1, 16):  # every_steps=1: a checkpoint exists after each step
        run = str(tmp_path / f"run{k}")
        with pytest.raises(RuntimeError):
            trainlib.train(cfg, run, crash_at=k)
        _scramble_rng()
        trainlib.train(cfg, run)
        assert final_digest(run)[0] == ref, f"crash after step {k}"


def test_weights_equal_an_uninterrupted_run_tensor_for_tensor(tmp_path):
    """The digest claim, checked directly on the live tensors too."""
    cfg = {"optimizer": "adam", "scheduler": "step"}
    ref = trainlib.train(cfg, str(tmp_path / "ref"))
    with pytest.raises(RuntimeError):
        trainlib.train(cfg, str(tmp_path / "run"), crash_at=11)
    _scramble_rng()
    got = trainlib.train(cfg, str(tmp_path / "run"))
    for (name, a), (_, b) in zip(ref["model"].state_dict().items(), got["model"].state_dict().items()):
        assert torch.equal(a, b), name
    sa, sb = ref["optimizer"].state_dict()["state"], got["optimizer"].state_dict()["state"]
    for idx in sa:
        for key in sa[idx]:
            assert torch.equal(sa[idx][key], sb[idx][key]), (idx, key)
