"""The project's own example, the way a user runs it: resumed from its best checkpoint
alone (the state a kill between two commits of one epoch used to leave), it ends
with exactly the uninterrupted run's weights, optimizer and scheduler.

Round 1's example saved the best checkpoint inside ``report()`` and the epoch
checkpoint after it; resuming from the best one stepped the per-epoch StepLR a
second time. Now both are one checkpoint at the epoch boundary.
"""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import ROOT

from guardian import commit
from guardian.format import reader

SCRIPT = os.path.join(ROOT, "scripts", "examples", "mnist_cnn.py")
ARGS = ["--samples", "128", "--batch-size", "64", "--workers", "2", "--seed", "3"]


def _run(run_dir: str, epochs: int) -> None:
    env = {**os.environ, "GUARDIAN_QUIET": "1"}
    cmd = [sys.executable, SCRIPT, "--dir", run_dir, "--epochs", str(epochs), *ARGS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _training_state(run_dir: str) -> dict[str, str]:
    info = reader.newest_valid(run_dir)
    comps = reader.component_summaries(info.path, info.manifest)
    return {k: comps[k]["digest"] for k in ("model", "optimizer", "scheduler")}


def test_mnist_example_resumed_from_its_best_checkpoint_is_exact(tmp_path):
    reference, run = str(tmp_path / "reference"), str(tmp_path / "run")
    _run(reference, epochs=2)
    _run(run, epochs=1)
    checkpoints = reader.list_checkpoints(run)
    best = [i for i in checkpoints if "best" in i.manifest.reason]
    assert best and set(best[-1].manifest.reason) >= {"best", "epoch"}, [
        i.manifest.reason for i in checkpoints
    ]
    for info in checkpoints:
        if info.name != best[-1].name:
            commit.delete_checkpoint(run, info.name)
    _run(run, epochs=2)
    assert _training_state(run) == _training_state(reference)
