"""Real processes, real SIGKILL: the run is killed and re-run, and must end bit-exact.

Kills come three ways: the training process SIGKILLs itself right after a chosen
step (deterministic), a fault point makes it ``os._exit`` in the middle of a save
(every step of the commit protocol), and the test SIGKILLs the whole process group
(DataLoader workers included) at a random moment from outside.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT, final_digest, run_trainlib

from guardian.faults import FAULT_EXIT_CODE, POINTS
from guardian.format import reader
from guardian.runfiles import read_heartbeat

CFG = {"optimizer": "adamw", "scheduler": "onecycle", "epochs": 3, "every_steps": 3}


def uninterrupted_digest(tmp_path_factory, cfg: dict) -> str:
    run = str(tmp_path_factory.mktemp("ref") / "run")
    proc = run_trainlib(run, cfg)
    assert proc.returncode == 0, proc.stderr
    return final_digest(run)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return uninterrupted_digest(tmp_path_factory, CFG)


@pytest.mark.parametrize("seed", range(4))
def test_sigkill_at_random_step_resumes_exactly(tmp_path, reference, seed):
    run = str(tmp_path / "run")
    kill_at = random.Random(seed).randint(1, 23)
    proc = run_trainlib(run, CFG, env={"KILL_AT_STEP": str(kill_at)})
    assert proc.returncode == -signal.SIGKILL
    proc = run_trainlib(run, CFG)
    assert proc.returncode == 0, proc.stderr
    assert final_digest(run) == reference


SAVE_POINTS = [p for p in POINTS if p.startswith(("save.", "retention."))]  # every step of a commit


@pytest.mark.parametrize("point", SAVE_POINTS)
def test_killed_inside_a_save_resumes_exactly(tmp_path, reference, point):
    run = str(tmp_path / "run")
    nth = 4 if point.startswith("save.") else 2  # a save (or deletion) well into the run
    proc = run_trainlib(run, CFG, env={"GUARDIAN_FAULT": f"{point}@{nth}"})
    assert proc.returncode == FAULT_EXIT_CODE, proc.stderr
    assert f"injected fault at {point}" in proc.stderr
    committed_before = [i.name for i in reader.list_checkpoints(run) if i.valid]
    assert committed_before, "earlier checkpoints must have survived"
    proc = run_trainlib(run, CFG)
    assert proc.returncode == 0, proc.stderr
    assert final_digest(run) == reference
    assert not [n for n in os.listdir(run) if n.startswith((".tmp-", ".trash-"))]


@pytest.mark.parametrize("nth", [1, 4])
def test_killed_right_after_a_step_save_was_submitted_resumes_exactly(tmp_path, reference, nth):
    """``step.after_save``: the process dies the instant ``g.step()`` handed a save to
    the (asynchronous) writer — that save may or may not be committed; either way no
    partial checkpoint is used and the run ends exact."""
    run = str(tmp_path / "run")
    proc = run_trainlib(run, CFG, env={"GUARDIAN_FAULT": f"step.after_save@{nth}"})
    assert proc.returncode == FAULT_EXIT_CODE, proc.stderr
    assert "injected fault at step.after_save" in proc.stderr
    infos = reader.list_checkpoints(run, verify=True)
    assert all(i.valid for i in infos) and max((i.manifest.step for i in infos), default=0) <= 3 * nth
    proc = run_trainlib(run, CFG)
    assert proc.returncode == 0, proc.stderr
    assert final_digest(run) == reference


WORKERS_CFG = {**CFG, "num_workers": 2, "epochs": 2, "samples": 480}


@pytest.fixture(scope="module")
def workers_reference(tmp_path_factory):
    return uninterrupted_digest(tmp_path_factory, WORKERS_CFG)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_external_sigkill_of_process_group_with_workers(tmp_path, workers_reference, seed):
    """SIGKILL from outside at a random moment, DataLoader workers and all."""
    cfg = WORKERS_CFG
    run = str(tmp_path / "run")
    env = {**os.environ, "GUARDIAN_QUIET": "1", "GUARDIAN_HEARTBEAT_INTERVAL": "0"}
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tests", "trainlib.py"), run, json.dumps(cfg)],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _kill_group_at_step(proc, run, random.Random(seed).randint(2, 100))
    assert run_trainlib(run, cfg).returncode == 0
    assert final_digest(run) == workers_reference


def _kill_group_at_step(proc: subprocess.Popen, run: str, step: int) -> None:
    """SIGKILL the whole process group once the heartbeat shows ``step``."""
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        hb = read_heartbeat(run) if os.path.isdir(run) else None
        if hb and hb.get("step", 0) >= step:
            break
        time.sleep(0.002)
    assert proc.poll() is None, f"the run ended (code {proc.returncode}) before step {step}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _inspect_digest(run: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "guardian.cli", "inspect", run, "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)["digest"]


@pytest.mark.slow
def test_mnist_example_killed_and_resumed_matches_uninterrupted(tmp_path):
    """The issue's acceptance check, through the CLI: equal `guardian inspect` digests."""
    script = os.path.join(ROOT, "scripts", "examples", "mnist_cnn.py")
    args = ["--epochs", "2", "--samples", "384", "--seed", "3", "--every-steps", "4"]
    env = {**os.environ, "GUARDIAN_QUIET": "1", "GUARDIAN_HEARTBEAT_INTERVAL": "0"}
    ref = str(tmp_path / "ref")
    subprocess.run([sys.executable, script, "--dir", ref, *args], env=env, check=True, capture_output=True)
    run = str(tmp_path / "run")
    proc = subprocess.Popen(
        [sys.executable, script, "--dir", run, *args],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _kill_group_at_step(proc, run, 9)  # mid-epoch 1 of 2 (6 steps per epoch)
    subprocess.run([sys.executable, script, "--dir", run, *args], env=env, check=True, capture_output=True)
    assert _inspect_digest(run) == _inspect_digest(ref)
