"""restore_best under DDP and FSDP2 (gloo, CPU), on 1 and 2 ranks.

Early stopping with ``restore_best`` must leave *exactly* the best step's weights in
the live model — resharded like a resume. Before: with 2 ranks both logged "restored
the best weights" and the weights were not the best; with 1 rank ``__exit__`` crashed
(``expected torch.Tensor ... received ShardRecord``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from helpers import ROOT
from safetensors.torch import load_file

JOB = os.path.join(ROOT, "tests", "fsdp_job.py")
pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world_size: int, wrap: str, *args: str) -> None:
    port = str(_port())
    env = {**os.environ, "GUARDIAN_QUIET": "1", "OMP_NUM_THREADS": "1", "FORCE_DIST": "1", "WRAP": wrap}
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
    errors = []
    for p in procs:
        _, err = p.communicate(timeout=600)
        if p.returncode != 0:
            errors.append(err[-3000:])
    assert not errors, "\n---\n".join(errors)


def _model(path: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(path).items() if k.startswith("model/")}


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("wrap", ["fsdp", "ddp"])
def test_early_stop_restores_exactly_the_best_weights(tmp_path, wrap, world_size):
    if wrap == "fsdp":
        pytest.importorskip("torch.distributed.fsdp")
    run_ranks(world_size, wrap, "best", str(tmp_path / "run"), str(tmp_path))
    best, last, restored = (_model(str(tmp_path / f"{n}.safetensors")) for n in ("best", "last", "restored"))
    assert any(not torch.equal(best[k], last[k]) for k in best), "training after the best changed nothing"
    assert set(restored) == set(best)
    for k in best:
        assert torch.equal(restored[k], best[k]), k
