"""Ray Train restarts, guardian resumes: a `guardian export ray` driver run for real.

Two CPU workers, a tiny model per worker under guardian.protect, worker rank 1
SIGKILLed once mid-run; Ray's FailureConfig restarts the group and every worker
resumes from guardian's checkpoint, finishing with the same digest as an
uninterrupted run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from daemon_jobs.harness import GUARDIAN, HERE, digest, env_with

pytest.importorskip("ray.train", reason="ray[train] missing: SETUP_EXTRAS=ray bash scripts/setup.sh")

JOB = os.path.join(HERE, "ray_job.py")


def export_driver(tmp_path, name: str) -> str:
    out = str(tmp_path / f"{name}_ray.py")
    r = subprocess.run(
        [
            GUARDIAN, "export", "ray", "--name", name, "--dir", str(tmp_path / name / "guardian"),
            "--storage-path", str(tmp_path / name / "ray"), "--num-workers", "2",
            "--max-failures", "2", "--output", out, "--", f"{JOB}:train",
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return out


def run_driver(driver: str, tmp_path, **env: str) -> subprocess.CompletedProcess:
    e = env_with(
        RAY_ADDRESS="",
        RAY_DEDUP_LOGS="0",
        RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
        RAY_TRAIN_V2_ENABLED=os.environ.get("RAY_TRAIN_V2_ENABLED", "1"),
        PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]),
        **env,
    )
    e.pop("RAY_ADDRESS")
    r = subprocess.run(
        [sys.executable, driver], capture_output=True, text=True, env=e, timeout=560, cwd=tmp_path
    )
    assert r.returncode == 0, f"driver failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r


@pytest.mark.slow
@pytest.mark.timeout(1200)  # two Ray clusters start and stop: minutes each on a loaded machine
def test_ray_restarts_a_killed_worker_and_guardian_resumes_exactly(tmp_path):
    ref = export_driver(tmp_path, "ref")
    run_driver(ref, tmp_path)
    killed = export_driver(tmp_path, "killed")
    out = run_driver(killed, tmp_path, RAY_JOB_KILL_AT="10")
    assert os.path.exists(tmp_path / "killed" / "guardian" / "killed-once"), out.stderr[-2000:]
    a = digest(str(tmp_path / "ref" / "guardian"))
    b = digest(str(tmp_path / "killed" / "guardian"))
    assert a == b, "the digest after the kill differs from the uninterrupted run"
    # guardian's checkpoints were handed to Ray (Checkpoint.from_directory): a manifest is there
    found = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "killed" / "ray") for f in fs]
    assert any(f.endswith("manifest.json") for f in found), found[:20]
    manifest = next(f for f in found if f.endswith("manifest.json"))
    assert json.load(open(manifest))["format"].startswith("guardian")
