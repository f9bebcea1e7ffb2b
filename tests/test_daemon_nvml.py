"""The GPU inventory from NVML, and a device that disappears from it.

No GPU here: NVML is the fake module in daemon_jobs/fake_nvml (said so there), put on
the daemon's PYTHONPATH — the only stand-in. The daemon, its allocation, the jobs and
their signals are real.
"""

from __future__ import annotations

import os
import sys

import pytest
from daemon_jobs.harness import HERE, Daemon, cli, env_with, reap, status, wait_for

GPU_JOB = os.path.join(HERE, "gpu_job.py")
FAKE_NVML = os.path.join(HERE, "fake_nvml")


@pytest.fixture
def home(tmp_path):
    yield str(tmp_path / "home")
    reap(str(tmp_path / "home"))


def test_a_device_that_disappears_from_nvml_holds_its_job_with_the_reason(home, tmp_path):
    devices = tmp_path / "nvml-devices"
    devices.write_text("GPU-aaaa\nGPU-bbbb\n")
    claims = tmp_path / "claims"
    claims.mkdir()
    nvml = {"PYTHONPATH": FAKE_NVML, "FAKE_NVML_DEVICES": str(devices)}
    d = Daemon(home, **nvml).start()
    try:
        job = ["--", sys.executable, GPU_JOB]
        for name in ("one", "two"):
            cli(
                home,
                "run",
                "--name",
                name,
                "--dir",
                str(tmp_path / name),
                "--gpus",
                "1",
                *job,
                env=env_with(CLAIMS=str(claims)),
            )
        wait_for(lambda: all(status(home, n)["pid"] for n in ("one", "two")), 60, "both jobs running")
        held_by_one = status(home, "one")["devices"]
        assert held_by_one in (["GPU-aaaa"], ["GPU-bbbb"]), "the allocation uses NVML's UUIDs"
        survivor = "GPU-bbbb" if held_by_one == ["GPU-aaaa"] else "GPU-aaaa"
        devices.write_text(survivor + "\n")
        one = wait_for(lambda: (s := status(home, "one"))["state"] == "held" and s, 60, "job one held")
        assert f"GPU {held_by_one[0]} disappeared" in one["reason"]
        two = status(home, "two")
        assert two["state"] == "running" and two["devices"] == [survivor]
        r = cli(home, "run", "--name", "big", "--gpus", "2", *job, check=False)
        assert r.returncode != 0 and "(nvml) has 1" in r.stderr
        open(claims / "release-two", "w").close()
        wait_for(lambda: status(home, "two")["state"] == "done", 60, "job two done")
    finally:
        d.stop()


def test_a_freed_device_is_handed_on_only_after_the_dead_jobs_memory_is_released(home, tmp_path):
    devices, procs = tmp_path / "nvml-devices", tmp_path / "nvml-procs"
    devices.write_text("GPU-aaaa\n")
    claims = tmp_path / "claims"
    claims.mkdir()
    env = {"PYTHONPATH": FAKE_NVML, "FAKE_NVML_DEVICES": str(devices), "FAKE_NVML_PROCS": str(procs)}
    d = Daemon(home, GUARDIAN_DAEMON_GPU_RELEASE_TIMEOUT="600", **env).start()
    try:
        job = ["--", sys.executable, GPU_JOB]
        for name in ("first", "second"):
            cli(
                home,
                "run",
                "--name",
                name,
                "--dir",
                str(tmp_path / name),
                "--gpus",
                "1",
                *job,
                env=env_with(CLAIMS=str(claims)),
            )
        pid = wait_for(lambda: status(home, "first")["pid"], 60, "first running")
        procs.write_text(f"GPU-aaaa {pid} 1000000\n")  # NVML: the job's memory on the device
        open(claims / "release-first", "w").close()
        wait_for(lambda: status(home, "first")["state"] == "done", 60, "first done")
        wait_for(
            lambda: "memory of an ended attempt not yet released" in status(home, "second")["reason"],
            60,
            "second to wait for the memory",
        )
        assert status(home, "second")["state"] == "pending"
        procs.write_text("")  # the driver let go
        wait_for(lambda: status(home, "second")["devices"] == ["GPU-aaaa"], 60, "second on the freed device")
        open(claims / "release-second", "w").close()
        wait_for(lambda: status(home, "second")["state"] == "done", 60, "second done")
    finally:
        d.stop()
