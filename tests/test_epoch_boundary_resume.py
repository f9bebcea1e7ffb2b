"""Exactness at the epoch boundary (issue 11, items 10(a)-(c)), in real processes.

* 10(a) a DataLoader's or sampler's own ``torch.Generator`` advances every epoch; a
  checkpoint at an epoch boundary must carry it, or the resumed run re-seeds it and
  the next epoch shuffles differently (was: 122 of 872 tensors differ).
* 10(b) with gradient accumulation whose length does not divide the epoch, the
  epoch's end falls inside an accumulation: the epoch save must wait for the next
  optimizer step, never capture a state without the pending gradients.
* 10(c) a different ``num_workers`` on resume may change the result when augmentation
  draws from worker RNG streams: the resumed run says so.

Each run is killed (``os._exit``) right after the epoch-boundary checkpoint is
committed, before any step of the next epoch, then resumed, and compared bit for bit
with an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT, final_digest

from guardian.format import reader

JOB = os.path.join(ROOT, "tests", "preempt_job.py")
pytestmark = pytest.mark.slow


def run_job(run: str, cfg: dict, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "GUARDIAN_QUIET": "0", "OMP_NUM_THREADS": "1", **env}
    proc = subprocess.run(
        [sys.executable, JOB, run, json.dumps(cfg)], env=full_env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def killed_at_epoch_boundary_then_resumed(tmp_path, cfg: dict, epoch: int = 0) -> tuple[str, str]:
    """(reference run, interrupted-and-resumed run) directories."""
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    run_job(ref, cfg)
    run_job(run, cfg, EXIT_AFTER_EPOCH_SAVE=str(epoch))
    newest = reader.newest_valid(run)
    assert newest is not None and newest.manifest.epoch == epoch + 1
    run_job(run, cfg)
    return ref, run


@pytest.mark.parametrize(
    "owner, workers",
    [("loader", 0), ("loader", 2), ("sampler", 0)],
    ids=["loader", "loader-workers", "sampler"],
)
def test_own_generator_resumed_at_an_epoch_boundary_shuffles_the_next_epoch_exactly(tmp_path, owner, workers):
    cfg = {"workers": workers, "epochs": 3, "every_steps": 100, f"{owner}_generator": True}
    ref, run = killed_at_epoch_boundary_then_resumed(tmp_path, cfg)
    newest_before_end = [i for i in reader.list_checkpoints(run) if "epoch" in i.manifest.reason]
    assert newest_before_end, "the run was not checkpointed at an epoch boundary"
    assert final_digest(run) == final_digest(ref)


@pytest.mark.parametrize("epoch", [0, 1])
def test_epoch_save_never_lands_inside_a_gradient_accumulation(tmp_path, epoch):
    # 24 micro-batches per epoch, an optimizer step every 5: each epoch ends with 4 pending
    cfg = {"workers": 0, "epochs": 3, "accumulate": 5, "every_steps": 5}
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    run_job(ref, cfg)
    run_job(run, cfg, EXIT_AFTER_EPOCH_SAVE=str(epoch))
    for info in reader.list_checkpoints(run):
        assert info.manifest.step % 24 != 0 or info.manifest.step == 0, (
            f"{info.name} was taken at an epoch's end with gradients pending ({info.manifest.reason})"
        )
    run_job(run, cfg)
    assert final_digest(run) == final_digest(ref)


def test_a_different_num_workers_on_resume_is_warned_about(tmp_path):
    cfg = {"workers": 0, "epochs": 3, "every_steps": 100, "augment": "worker"}
    run = str(tmp_path / "run")
    run_job(run, cfg, EXIT_AFTER_EPOCH_SAVE="0")
    same = run_job(run, cfg, EXIT_AFTER_EPOCH_SAVE="1")  # resumed with the same loader
    assert "resumed from" in same.stderr and "num_workers=" not in same.stderr
    changed = run_job(run, {**cfg, "workers": 2})
    warning = [line for line in changed.stderr.splitlines() if "num_workers=0" in line]
    assert warning and "has 2 now" in warning[0] and "bit-exact" in warning[0], changed.stderr[-3000:]


@pytest.mark.parametrize("generator", [False, True], ids=["torch-rng", "loader-generator"])
def test_persistent_workers_resumed_at_an_epoch_boundary_shuffle_exactly(tmp_path, generator):
    """A persistent-worker loader draws its workers' base seed only when its iterator is
    created — in the first epoch of a process. A resumed process creates it in a later
    epoch; that extra draw must not shift the shuffle of the epoch."""
    cfg = {"workers": 2, "persistent": True, "epochs": 3, "every_steps": 100, "loader_generator": generator}
    ref, run = killed_at_epoch_boundary_then_resumed(tmp_path, cfg, epoch=1)
    assert final_digest(run) == final_digest(ref)
