"""Sharded state through protect(): FSDP2 saved by 2 ranks, resumed by 1, and back.

guardian stores each rank's shards (safetensors + JSON; no pickle, unlike DCP's
.metadata) and reshards on load, reading only the regions a rank needs.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from helpers import ROOT
from safetensors.torch import load_file

from guardian.format import reader

JOB = os.path.join(ROOT, "tests", "fsdp_job.py")
pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world_size: int, *args: str) -> None:
    env = {**os.environ, "GUARDIAN_QUIET": "1", "OMP_NUM_THREADS": "1"}
    if world_size == 1:
        env.pop("WORLD_SIZE", None)
        proc = subprocess.run(
            [sys.executable, JOB, *args], env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return
    port = str(_port())
    procs = [
        subprocess.Popen(
            [sys.executable, JOB, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **env,
                "RANK": str(r),
                "WORLD_SIZE": str(world_size),
                "LOCAL_RANK": str(r),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
        )
        for r in range(world_size)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]


def _equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert bool((a[k] == b[k]).all()), k


def test_fsdp2_two_ranks_to_one_and_back(tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    run2, run1, run2b = (str(tmp_path / n) for n in ("ws2", "ws1", "ws2b"))
    saved = str(tmp_path / "saved.safetensors")
    run_ranks(2, "train", run2, saved)
    ckpt2 = reader.newest_valid(run2)
    assert ckpt2.manifest.world_size == 2
    assert "rank-00001/tensors.safetensors" in ckpt2.manifest.files  # the shards live per rank

    at1 = str(tmp_path / "at1.safetensors")
    run_ranks(1, "resume", ckpt2.path, run1, at1)
    _equal(load_file(saved), load_file(at1))  # 2 → 1: resharded into a plain model and Adam

    ckpt1 = reader.newest_valid(run1)
    assert ckpt1.manifest.world_size == 1
    at2 = str(tmp_path / "at2.safetensors")
    run_ranks(2, "resume", ckpt1.path, run2b, at2)
    _equal(load_file(saved), load_file(at2))  # 1 → 2: back into FSDP2 shards
