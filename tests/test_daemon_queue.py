"""The GPU queue end to end: real daemons and jobs, whole-device allocation.

There is no GPU on this machine. The inventory comes from the daemon's configured
device list (``GUARDIAN_DAEMON_DEVICES``, the same setting as ``guardian watch
--devices``): the one stand-in allowed here. Everything else — the queue, the
allocation, CUDA_VISIBLE_DEVICES, the jobs' exclusive claims — is real. Where a GPU
exists the same allocator reads NVML's device UUIDs instead (test_daemon_nvml.py).
"""

from __future__ import annotations

import os
import sys

import pytest
from daemon_jobs.harness import HERE, Daemon, cli, env_with, events, reap, status, wait_for

GPU_JOB = os.path.join(HERE, "gpu_job.py")


@pytest.fixture
def home(tmp_path):
    yield str(tmp_path / "home")
    reap(str(tmp_path / "home"))


def states(home: str) -> dict[str, dict]:
    return {j["name"]: j for j in status(home)["jobs"]}


def register(home: str, name: str, run_dir: str, claims: str, *flags: str) -> None:
    cli(
        home,
        "run",
        "--name",
        name,
        "--dir",
        run_dir,
        *flags,
        "--",
        sys.executable,
        GPU_JOB,
        env=env_with(CLAIMS=claims),
    )


def running(home: str) -> dict[str, list[str]]:
    return {n: j["devices"] for n, j in states(home).items() if j["state"] == "running" and j["pid"]}


def running_when(home: str, ok) -> dict[str, list[str]] | None:
    r = running(home)
    return r if ok(r) else None


def release(claims: str, name: str) -> None:
    open(os.path.join(claims, f"release-{name}"), "w").close()


def test_four_one_gpu_jobs_share_two_devices_one_job_per_device(home, tmp_path):
    claims = str(tmp_path / "claims")
    os.makedirs(claims)
    d = Daemon(home, GUARDIAN_DAEMON_DEVICES="fake0,fake1").start()
    try:
        for name in "abcd":
            register(home, name, str(tmp_path / name), claims, "--gpus", "1")
        first = wait_for(lambda: running_when(home, lambda r: len(r) == 2), 60, "two jobs running")
        assert set(first) == {"a", "b"}, "FIFO: the first two registered run first"
        assert sorted(sum(first.values(), [])) == ["fake0", "fake1"]
        js = states(home)
        for name in "cd":
            assert js[name]["state"] == "pending", js[name]
            assert "needs 1 GPU(s), 0 free of 2 (held by a, b)" in js[name]["reason"]
        freed = first["a"][0]
        release(claims, "a")
        after_a = wait_for(lambda: running_when(home, lambda r: "c" in r), 60, "c to start when a ends")
        assert after_a["c"] == [freed] and "d" not in after_a
        release(claims, "b")
        wait_for(lambda: "d" in running(home), 60, "d to start when b ends")
        for name in "cd":
            release(claims, name)
        wait_for(lambda: all(j["state"] == "done" for j in states(home).values()), 60, "all four done")
        assert not os.path.exists(os.path.join(claims, "COLLISION")), open(
            os.path.join(claims, "COLLISION")
        ).read()
        starts = {n: [e for e in events(home, n) if e["event"] == "start"] for n in "abcd"}
        assert all(len(s) == 1 and len(s[0]["devices"]) == 1 for s in starts.values()), starts
        for name in "abcd":  # the job saw exactly its allocation
            log = open(os.path.join(home, "jobs", name, "latest", "stdout.log")).read()
            assert f"{name} runs on {starts[name][0]['devices'][0]}" in log
    finally:
        d.stop()


def test_gpus_beyond_the_inventory_are_refused_at_run(home, tmp_path):
    d = Daemon(home, GUARDIAN_DAEMON_DEVICES="fake0,fake1").start()
    try:
        wait_for(lambda: os.path.exists(os.path.join(home, "inventory.json")), 30, "the inventory")
        r = cli(home, "run", "--name", "big", "--gpus", "3", "--", sys.executable, GPU_JOB, check=False)
        assert r.returncode != 0
        assert "--gpus 3" in r.stderr and "has 2 (fake0, fake1)" in r.stderr
        assert "big" not in states(home), "nothing was queued"
    finally:
        d.stop()


def test_gpus_refused_without_any_inventory(home, tmp_path):
    r = cli(home, "run", "--name", "big", "--gpus", "1", "--", sys.executable, GPU_JOB, check=False)
    assert r.returncode != 0 and "has none" in r.stderr


def test_priority_jumps_the_queue_and_cpu_only_hides_gpus(home, tmp_path):
    claims = str(tmp_path / "claims")
    os.makedirs(claims)
    d = Daemon(home, GUARDIAN_DAEMON_DEVICES="fake0").start()
    try:
        register(home, "first", str(tmp_path / "first"), claims, "--gpus", "1")
        wait_for(lambda: "first" in running(home), 60, "first running")
        register(home, "low", str(tmp_path / "low"), claims, "--gpus", "1")
        register(home, "high", str(tmp_path / "high"), claims, "--gpus", "1", "--priority", "5")
        register(home, "cpu", str(tmp_path / "cpu"), claims, "--cpu-only")
        wait_for(lambda: "cpu" in running(home), 60, "the CPU-only job to pass the GPU queue")
        release(claims, "first")
        r = wait_for(lambda: running_when(home, lambda r: "high" in r), 60, "high to start")
        assert "low" not in r
        for name in ("high", "low", "cpu"):
            release(claims, name)
        wait_for(lambda: all(j["state"] == "done" for j in states(home).values()), 60, "all done")
        log = open(os.path.join(home, "jobs", "cpu", "latest", "stdout.log")).read()
        assert "cpu runs on no GPU" in log
    finally:
        d.stop()


def test_a_restarted_daemon_keeps_the_allocation(home, tmp_path):
    claims = str(tmp_path / "claims")
    os.makedirs(claims)
    d = Daemon(home, GUARDIAN_DAEMON_DEVICES="only").start()
    try:
        register(home, "a", str(tmp_path / "a"), claims, "--gpus", "1")
        wait_for(lambda: "a" in running(home), 60, "a running")
        register(home, "b", str(tmp_path / "b"), claims, "--gpus", "1")
        wait_for(lambda: "queued" in states(home)["b"]["reason"], 60, "b queued")
        d.stop()
        d = Daemon(home, GUARDIAN_DAEMON_DEVICES="only").start()
        wait_for(lambda: any(e["event"] == "reconcile-adopt" for e in events(home, "a")), 60, "a adopted")
        js = states(home)
        assert js["a"]["devices"] == ["only"] and js["b"]["state"] == "pending", js
        release(claims, "a")
        wait_for(lambda: running(home).get("b") == ["only"], 60, "b on the device a held")
        release(claims, "b")
        wait_for(lambda: states(home)["b"]["state"] == "done", 60, "b done")
        assert not os.path.exists(os.path.join(claims, "COLLISION"))
    finally:
        d.stop()
