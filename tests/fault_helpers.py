"""Shared helpers for the fault drills (crash states, power cuts, corruption, hostile input, full disks).

Two ways to make a checkpoint:

* ``save_checkpoint`` goes through the real state path (``capture`` → ``write_files`` →
  ``CheckpointTxn.commit``) and needs torch;
* ``save_raw_checkpoint`` writes the same two files (a strict safetensors file built with
  ``plan_layout`` and a ``state.json``) without importing torch, so subprocesses that do
  nothing but save start in milliseconds instead of seconds.

Both produce checkpoints that ``inspect_checkpoint(verify=True)`` accepts.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from guardian import fsops
from guardian.commit import CheckpointTxn
from guardian.format import safetensors_io, strictjson
from guardian.format.layout import FORMAT_ID, FORMAT_VERSION, STATE_FILE, TENSORS_FILE, checkpoint_name
from guardian.format.manifest import Manifest
from guardian.format.reader import inspect_checkpoint, list_checkpoints, newest_valid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable


def save_checkpoint(run_dir: str, step: int, *, numel: int = 256, seq: int | None = None) -> str:
    """A real checkpoint through capture/write_files (imports torch)."""
    import torch

    from guardian.state.snapshot import capture, write_files

    gen = torch.Generator().manual_seed(step)
    name = checkpoint_name(step)
    with CheckpointTxn(run_dir, name) as txn:
        snap = capture(
            {
                "model": ("module", {"w": torch.randn(numel, generator=gen), "b": torch.zeros(3)}),
                "extra": ("json", {"step": step, "lr": 0.1, "note": "fault drill"}),
            }
        )
        write_files(txn, snap)
        return txn.commit(Manifest(name=name, step=step, epoch=0, seq=step if seq is None else seq, files={}))


def raw_files(step: int, nbytes: int = 4096) -> dict[str, bytes]:
    """The two files of a torch-free checkpoint: a valid safetensors file and state.json."""
    rnd = random.Random(step)
    layout = safetensors_io.plan_layout([("model/w", "U8", (nbytes,))], metadata={"format": FORMAT_ID})
    tensors = layout.header + bytes(rnd.getrandbits(8) for _ in range(nbytes))
    state = strictjson.dumps(
        {
            "format": FORMAT_ID,
            "version": FORMAT_VERSION,
            "components": {"model": {"kind": "module", "state": {"w": {"__tensor__": "model/w"}}}},
        }
    )
    return {TENSORS_FILE: tensors, STATE_FILE: state}


def save_raw_checkpoint(run_dir: str, step: int, *, nbytes: int = 4096, chunk: int = 1 << 20) -> str:
    """A checkpoint through CheckpointTxn without torch (for fast subprocesses)."""
    name = checkpoint_name(step)
    with CheckpointTxn(run_dir, name) as txn:
        for rel, data in raw_files(step, nbytes).items():
            txn.add_file(rel, [data[i : i + chunk] for i in range(0, len(data), chunk)] or [b""])
        return txn.commit(Manifest(name=name, step=step, epoch=0, seq=step, files={}))


@contextmanager
def use_fs(fs: fsops.FS) -> Iterator[fsops.FS]:
    """Install a file-system seam for the duration of a block."""
    old = fsops.set_fs(fs)
    try:
        yield fs
    finally:
        fsops.set_fs(old)


def valid_names(run_dir: str) -> list[str]:
    return [i.name for i in list_checkpoints(run_dir, verify=True) if i.valid]


def recovery_report(run_dir: str) -> dict:
    """What a fresh process resuming from ``run_dir`` would see (torch-free)."""
    listed = list_checkpoints(run_dir, verify=True)
    best = newest_valid(run_dir)
    return {
        "newest": best.name if best else None,
        "listed": {i.name: i.problems for i in listed},
    }


RECOVERY_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from fault_helpers import recovery_report
print(json.dumps(recovery_report(sys.argv[1])))
"""


def recover_in_fresh_process(run_dir: str) -> dict:
    out = subprocess.run(
        [PYTHON, "-c", RECOVERY_SCRIPT.format(tests=os.path.join(REPO, "tests")), run_dir],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(out.stdout)


def problems_of(path: str) -> list[str]:
    return inspect_checkpoint(path, verify=True).problems
