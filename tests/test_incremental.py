"""Incremental checkpoints (guardian/incremental.py): unchanged tensors are hard-linked.

A frozen backbone + a trainable head, trained for real. Each test checks one promise:
the split never changes what a checkpoint holds (digests equal a full save's), writes
the version counter cannot see are still caught, a real SIGKILL resumes bit-exact,
retention / set-aside never break a reference, a corrupt shared file fails every
checkpoint that refers to it and resume falls back past them, a file system without
hard links gets a checked copy, and every power-cut state of a linking save recovers.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from crash_model import CrashModel
from fault_helpers import use_fs
from test_crash_states import Expectations, enumerate_crashes, record, report

import guardian
from guardian import fsops
from guardian.cli import main as cli_main
from guardian.commit import CheckpointTxn
from guardian.errors import CheckpointWriteError
from guardian.faults import FAULT_EXIT_CODE
from guardian.format import reader
from guardian.format.layout import SHARED_FILE, TENSORS_FILE, checkpoint_name
from guardian.format.manifest import Manifest
from guardian.incremental import IncrementalSaves
from guardian.state.snapshot import capture, write_files

JOB = r"""
import json, os, random, signal, sys
import numpy as np
import torch, torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset
import guardian

run, cfg = sys.argv[1], json.loads(sys.argv[2])
random.seed(0)  # a reproducible script seeds every RNG it has
np.random.seed(0)
torch.manual_seed(0)
gen = torch.Generator().manual_seed(1)
x = torch.randn(96, 32, generator=gen)
y = (x[:, 0] > 0).long()
loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Dropout(0.1), nn.Linear(256, 2))
for p in model[:4].parameters():
    p.requires_grad_(False)  # the frozen backbone
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
kill_at = cfg.get("kill_at")
with guardian.protect(model=model, optimizer=opt, loader=loader, dir=run, every_steps=3, every_epochs=None,
                      keep_last=cfg.get("keep_last", 3), incremental=cfg.get("incremental", True),
                      async_save=cfg["async"]) as g:
    for _ in g.epochs(2):
        for xb, yb in g.batches(loader):
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
            opt.zero_grad()
            g.step()
            if kill_at is not None and g.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
"""


# ----------------------------------------------------------------------------- helpers


class LoRALike(torch.nn.Module):
    """Most bytes frozen (the backbone), a small trainable head, a buffer that changes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 256))
        self.head = torch.nn.Linear(256, 4)
        self.register_buffer("seen", torch.zeros(1))
        for p in self.backbone.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += 1
        return self.head(self.backbone(x))


def train(
    run: str, *, saves: int, incremental=True, async_save=False, edit=None, keep_last=None, resume=True
):
    """Save after every step; ``edit(model, step)`` runs before each step's save."""
    model = LoRALike()
    opt = torch.optim.AdamW(model.head.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(3)
    with guardian.protect(
        model=model,
        optimizer=opt,
        dir=run,
        every_steps=1,
        every_epochs=None,
        keep_last=keep_last,
        incremental=incremental,
        async_save=async_save,
        save_on_exit=False,
        resume=resume,
        handle_signals=False,
    ) as g:
        for _ in g.epochs(1):
            while g.global_step < saves:
                model(torch.randn(8, 64, generator=gen)).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
                if edit is not None:
                    edit(model, g.global_step + 1)
                g.step()
    return model


def digests(ckpt: str) -> dict[str, str]:
    info = reader.inspect_checkpoint(ckpt)
    assert info.valid, info.problems
    return {k: v["digest"] for k, v in reader.component_summaries(ckpt, info.manifest).items()}


def state_digests(run: str, step: int) -> dict[str, str]:
    """Model and optimizer digests (the rest holds times and options)."""
    d = digests(os.path.join(run, checkpoint_name(step)))
    return {k: d[k] for k in ("model", "optimizer")}


def inode(ckpt: str, rel: str = SHARED_FILE) -> int:
    return os.stat(os.path.join(ckpt, rel)).st_ino


def ckpts(run: str) -> list[reader.CheckpointInfo]:
    return reader.list_checkpoints(run, verify=True)


def run_job(run: str, cfg: dict, env: dict | None = None) -> subprocess.CompletedProcess:
    job = os.path.join(os.path.dirname(run), "job.py")
    with open(job, "w") as f:
        f.write(JOB)
    return subprocess.run(
        [sys.executable, job, run, json.dumps(cfg)],
        env={**os.environ, "GUARDIAN_QUIET": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=240,
    )


def final_digest(run: str) -> str:
    info = reader.newest_valid(run)
    assert info is not None
    return reader.checkpoint_digest(reader.component_summaries(info.path, info.manifest))


# ------------------------------------------------------------------------- the split


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_unchanged_tensors_are_linked_and_the_state_is_a_full_saves(tmp_path, async_save):
    inc, full = str(tmp_path / "inc"), str(tmp_path / "full")
    train(inc, saves=5, async_save=async_save)
    train(full, saves=5, incremental=False, async_save=async_save)
    first, second, *later = [os.path.join(inc, checkpoint_name(s)) for s in range(1, 6)]
    assert reader.inspect_checkpoint(first).manifest.version == 1  # nothing known yet: a full save
    assert not os.path.exists(os.path.join(first, SHARED_FILE))
    assert reader.inspect_checkpoint(second).manifest.version == 2
    shown = CliRunner().invoke(cli_main, ["inspect", second, "--json"])
    assert shown.exit_code == 0 and json.loads(shown.output)["format_version"] == 2, shown.output
    for ckpt in later:  # the same inode: not one byte of the backbone written again
        assert inode(ckpt) == inode(second)
        man = reader.inspect_checkpoint(ckpt).manifest
        assert man.files[SHARED_FILE].bytes > 10 * man.files[TENSORS_FILE].bytes
    assert os.stat(os.path.join(second, SHARED_FILE)).st_nlink == 4
    assert all(i.valid for i in ckpts(inc))
    for step in range(1, 6):
        assert state_digests(inc, step) == state_digests(full, step), step


def test_writes_the_version_counter_cannot_see_are_never_missed(tmp_path):
    """``p.data`` edits do not bump ``_version``; a replaced tensor may reuse memory.
    Every checkpoint must still equal a full save's."""

    def edit(model, step):
        w = model.backbone[0].weight
        if step == 3:
            w.data.mul_(0.5)  # invisible to the version counter
        if step == 4:
            with torch.no_grad():
                model.backbone[1].bias.add_(1.0)  # visible to it
        if step == 5:
            model.backbone[1].weight.data = model.backbone[1].weight.data.clone() * 2  # new memory

    inc, full = str(tmp_path / "inc"), str(tmp_path / "full")
    train(inc, saves=7, edit=edit)
    train(full, saves=7, incremental=False, edit=edit)
    for step in range(1, 8):
        assert state_digests(inc, step) == state_digests(full, step), step
    assert all(i.valid for i in ckpts(inc))


# ---------------------------------------------------------------------- real SIGKILL


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_sigkill_then_resume_is_bitwise_exact(tmp_path, async_save):
    ref, run = str(tmp_path / "ref" / "run"), str(tmp_path / "killed" / "run")
    os.makedirs(os.path.dirname(ref))
    os.makedirs(os.path.dirname(run))
    done = run_job(ref, {"async": async_save})
    assert done.returncode == 0, done.stderr
    killed = run_job(run, {"async": async_save, "kill_at": 11})  # after two linking saves
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert any(SHARED_FILE in i.manifest.files for i in ckpts(run) if i.manifest), "nothing was linked"
    resumed = run_job(run, {"async": async_save})
    assert resumed.returncode == 0, resumed.stderr
    assert final_digest(run) == final_digest(ref)
    assert all(i.valid for i in ckpts(run))


def test_killed_right_after_linking_resumes_exactly(tmp_path):
    ref, run = str(tmp_path / "ref" / "run"), str(tmp_path / "killed" / "run")
    os.makedirs(os.path.dirname(ref))
    os.makedirs(os.path.dirname(run))
    assert run_job(ref, {"async": True}).returncode == 0
    killed = run_job(run, {"async": True}, env={"GUARDIAN_FAULT": "incremental.linked@2"})
    assert killed.returncode == FAULT_EXIT_CODE, killed.stderr
    assert all(i.valid for i in ckpts(run))
    assert run_job(run, {"async": True}).returncode == 0
    assert final_digest(run) == final_digest(ref)


# --------------------------------------------------------- references, corruption


def test_retention_deleting_the_first_writer_keeps_later_checkpoints_whole(tmp_path):
    run = str(tmp_path / "run")
    model = train(run, saves=8, keep_last=2)
    left = ckpts(run)
    assert [i.name for i in left] == [checkpoint_name(7), checkpoint_name(8)]
    assert not os.path.exists(os.path.join(run, checkpoint_name(2)))  # wrote the shared file
    assert all(i.valid for i in left) and all(SHARED_FILE in i.manifest.files for i in left)
    view = guardian.open(run)  # the lazy reader, the loader and the weights export all see both files
    fresh = LoRALike()
    torch.nn.init.zeros_(fresh.backbone[0].weight)
    guardian.load(run, model=fresh)
    from safetensors.torch import load_file

    exported = load_file(guardian.export_weights(run, str(tmp_path / "w.safetensors")))
    for key, value in model.state_dict().items():
        assert torch.equal(view[f"model/{key}"], value), key
        assert torch.equal(fresh.state_dict()[key], value), key
        assert torch.equal(exported[key], value), key


def test_set_aside_of_a_corrupt_checkpoint_keeps_the_others_references(tmp_path):
    run = str(tmp_path / "run")
    train(run, saves=5)
    newest = os.path.join(run, checkpoint_name(5))
    with open(os.path.join(newest, TENSORS_FILE), "r+b") as f:  # its own file, not the shared one
        f.seek(-3, os.SEEK_END)
        f.write(b"\xff\xfe\xfd")
    train(run, saves=6)  # resumes: sets step 5 aside, resumes from step 4, saves 5 and 6 again
    assert all(i.valid for i in ckpts(run)) and len(ckpts(run)) == 6
    aside = os.listdir(os.path.join(run, "set-aside"))
    assert len(aside) == 1 and aside[0].startswith(checkpoint_name(5))
    moved = os.path.join(run, "set-aside", aside[0])
    assert inode(moved) == inode(os.path.join(run, checkpoint_name(4)))  # still one file, linked
    assert reader.inspect_checkpoint(moved).problems  # and still the corrupt one it was


def _flip_shared_byte(ckpt: str) -> None:
    path = os.path.join(ckpt, SHARED_FILE)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 5)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x01]))


def test_a_corrupt_shared_file_fails_every_sharer_and_resume_falls_back(tmp_path):
    run = str(tmp_path / "run")
    train(run, saves=5)
    _flip_shared_byte(os.path.join(run, checkpoint_name(5)))  # the same bytes as steps 2-4 hold
    by_name = {i.name: i for i in ckpts(run)}
    assert by_name[checkpoint_name(1)].valid  # the full save shares nothing
    for step in range(2, 6):
        info = by_name[checkpoint_name(step)]
        assert not info.valid and any("does not match" in p for p in info.problems), step
    train(run, saves=6)  # resume sets steps 5..2 aside and falls back to step 1
    assert len(os.listdir(os.path.join(run, "set-aside"))) == 4
    left = ckpts(run)
    assert len(left) == 6 and all(i.valid for i in left)
    step2 = reader.inspect_checkpoint(os.path.join(run, checkpoint_name(2))).manifest
    assert step2.extra["resumed_from"].endswith(checkpoint_name(1))


def test_full_every_bounds_what_one_corrupt_file_reaches(tmp_path):
    run = str(tmp_path / "run")
    train(run, saves=7, incremental=3)
    files = {s: inode(os.path.join(run, checkpoint_name(s))) for s in range(2, 8)}
    assert files[2] == files[3] == files[4] != files[5]  # the third save after writing copies
    assert files[5] == files[6] == files[7]
    _flip_shared_byte(os.path.join(run, checkpoint_name(7)))
    valid = {i.name for i in ckpts(run) if i.valid}
    assert valid == {checkpoint_name(s) for s in (1, 2, 3, 4)}


class NoHardLinks(fsops.FS):
    """A file system that refuses hard links, as some FUSE mounts do (none here)."""

    def link(self, src: str, dst: str) -> None:
        raise OSError(errno.EPERM, "Operation not permitted", dst)


def test_without_hard_links_the_shared_file_is_copied_and_checked(tmp_path, caplog):
    run = str(tmp_path / "run")
    with use_fs(NoHardLinks()), caplog.at_level(logging.WARNING):
        train(run, saves=4)
    assert any("hard links refused" in r.getMessage() for r in caplog.records)
    assert len({inode(os.path.join(run, checkpoint_name(s))) for s in (2, 3, 4)}) == 3
    assert all(i.valid for i in ckpts(run))

    # A copy from a corrupt source fails that save loudly; the next one writes afresh.
    _flip_shared_byte(os.path.join(run, checkpoint_name(4)))
    tracker = IncrementalSaves()
    states = {"model": ("module", {"w": torch.ones(1 << 16), "h": torch.zeros(4)})}
    snaps = []
    for step in (10, 11):
        snap, plan = tracker.plan(capture(states), copy_fresh=False)
        snaps.append(plan)
        man = Manifest(name=checkpoint_name(step), step=step, epoch=0, seq=step, files={})
        man.shared = plan
        with CheckpointTxn(run, man.name) as txn:
            write_files(txn, snap)
            tracker.committed(txn.commit(man), man)
    assert snaps[0] is None and snaps[1] is not None and snaps[1].link_from is None
    src = os.path.join(run, checkpoint_name(4))
    man = Manifest(name=checkpoint_name(12), step=12, epoch=0, seq=12, files={})
    from guardian.incremental import SharedPlan, _SharedFile

    entry = reader.inspect_checkpoint(src, verify=False).manifest.files[SHARED_FILE]
    man.shared = SharedPlan(keys=(), link_from=_SharedFile(src, (), entry, 0))
    with use_fs(NoHardLinks()), CheckpointTxn(run, man.name) as txn, pytest.raises(CheckpointWriteError):
        txn.commit(man)
    assert not os.path.exists(os.path.join(run, checkpoint_name(12)))


def test_an_async_fresh_shared_file_comes_from_the_verified_previous_checkpoint(tmp_path):
    """A writer that returns before writing gets the new shared file's bytes from the
    previous checkpoint on disk (no copy in the stall); those bytes must verify."""
    run = str(tmp_path / "run")
    os.mkdir(run)
    backbone, head = torch.arange(1 << 14, dtype=torch.float32), torch.zeros(16)

    def save(step: int, tracker: IncrementalSaves) -> Manifest:
        head.fill_(step)
        snap, plan = tracker.plan(capture({"model": ("module", {"b": backbone, "h": head})}), copy_fresh=True)
        man = Manifest(name=checkpoint_name(step), step=step, epoch=0, seq=step, files={})
        man.shared = plan
        with CheckpointTxn(run, man.name) as txn:
            write_files(txn, snap)
            tracker.committed(txn.commit(man), man)
        return man

    tracker = IncrementalSaves()
    save(1, tracker)
    man = save(2, tracker)
    assert man.shared.extract_from is not None and man.shared.extract_from[0].endswith(checkpoint_name(1))
    assert (
        digests(os.path.join(run, checkpoint_name(2)))["model"]
        != digests(os.path.join(run, checkpoint_name(1)))["model"]
    )
    loaded = guardian.open(os.path.join(run, checkpoint_name(2)))
    assert torch.equal(loaded["model/b"], backbone) and torch.equal(loaded["model/h"], head)

    bad = IncrementalSaves()
    save(3, bad)
    path = os.path.join(run, checkpoint_name(3), TENSORS_FILE)
    with open(path, "r+b") as f:  # bit rot in the bytes the next save would copy
        f.seek(-10, os.SEEK_END)
        f.write(b"\x00\x01")
    with pytest.raises(CheckpointWriteError, match="corrupted on disk"):
        save(4, bad)
    assert not os.path.exists(os.path.join(run, checkpoint_name(4)))
    retry = save(5, bad).shared  # after a failure nothing on disk is trusted: copied from memory
    assert retry.extract_from is None and retry.link_from is None and set(retry.fresh) == {"model/b"}
    assert reader.inspect_checkpoint(os.path.join(run, checkpoint_name(5))).valid
    assert torch.equal(guardian.open(os.path.join(run, checkpoint_name(5)))["model/b"], backbone)


# ---------------------------------------------------------------- power-cut states


def _save(run: str, step: int, tracker: IncrementalSaves) -> str:
    """A real incremental save at ``step``: a constant 'backbone', a changing 'head'."""
    backbone = _save.backbone  # type: ignore[attr-defined]
    head = torch.full((64,), float(step))
    snap, plan = tracker.plan(capture({"model": ("module", {"b": backbone, "h": head})}), copy_fresh=False)
    man = Manifest(name=checkpoint_name(step), step=step, epoch=0, seq=step, files={})
    man.shared = plan
    with CheckpointTxn(run, man.name) as txn:
        write_files(txn, snap)
        path = txn.commit(man)
    tracker.committed(path, man)
    return path


_save.backbone = torch.arange(2048, dtype=torch.float32)  # type: ignore[attr-defined]


def test_every_crash_state_of_a_linking_save_recovers(tmp_path):
    run = str(tmp_path / "run")
    os.mkdir(run)
    tracker = IncrementalSaves()
    _save(run, 1, tracker)  # full
    _save(run, 2, tracker)  # writes the shared file
    shutil.rmtree(os.path.join(run, checkpoint_name(1)))
    model = CrashModel(run)
    step3 = checkpoint_name(3)

    def action(rec) -> None:
        _save(rec.root, 3, tracker)
        rec.mark(f"committed:{step3}")

    ops = record(run, action)
    assert any(op[0] == "link" for op in ops), "the save did not link"
    assert inode(os.path.join(run, step3)) == inode(os.path.join(run, checkpoint_name(2)))
    stats = enumerate_crashes(model, ops, Expectations({checkpoint_name(2)}, {step3}), str(tmp_path / "s"))
    report("incremental save linking the previous checkpoint's shared file", stats)
    assert not stats.failures, "\n".join(stats.failures)
    assert stats.states >= 100 and stats.distinct >= 30, stats


def test_the_benchmark_prints_its_keys(tmp_path):
    """The figures are measured by running it for real, never asserted here."""
    script = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "bench_incremental.py"
    )
    args = ["--backbone-mb", "8", "--incremental-reps", "1", "--dir", str(tmp_path / "b"), "--json"]
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("incremental_bytes_ratio", "incremental_stall_ratio", "incremental_frozen_fraction"):
        assert isinstance(summary[key], float), key
    assert summary["incremental_frozen_fraction"] >= 0.9


@pytest.mark.parametrize("bad", [0, -2, "yes", 1.5])
def test_the_option_is_checked(tmp_path, bad):
    with pytest.raises(ValueError, match="incremental must be"):
        guardian.protect(model=torch.nn.Linear(2, 2), dir=str(tmp_path / "run"), incremental=bad)


def test_a_shared_file_follows_the_unchanged_set(tmp_path):
    """Linked while the set stays; rewritten when a shared tensor changes or when
    much more became unchanged (a layer frozen later in training)."""
    run = str(tmp_path / "run")
    os.mkdir(run)
    a, b = torch.ones(1 << 14), torch.zeros(1 << 13)
    tracker = IncrementalSaves()

    def save(step: int) -> tuple[str, ...]:
        snap, plan = tracker.plan(capture({"m": ("module", {"a": a, "b": b})}), copy_fresh=False)
        man = Manifest(name=checkpoint_name(step), step=step, epoch=0, seq=step, files={})
        man.shared = plan
        with CheckpointTxn(run, man.name) as txn:
            write_files(txn, snap)
            tracker.committed(txn.commit(man), man)
        assert reader.inspect_checkpoint(os.path.join(run, man.name)).valid
        return plan.keys if plan else ()

    b.add_(1)
    assert save(1) == ()
    b.add_(1)
    assert save(2) == ("m/a",)
    b.add_(1)
    assert save(3) == ("m/a",) and inode(os.path.join(run, checkpoint_name(3))) == inode(
        os.path.join(run, checkpoint_name(2))
    )
    assert save(4) == ("m/a", "m/b")  # b stopped changing: half as large again as a
    assert inode(os.path.join(run, checkpoint_name(4))) != inode(os.path.join(run, checkpoint_name(3)))
    a.mul_(2)
    assert save(5) == ("m/b",)  # a changed: never linked again
    view = guardian.open(os.path.join(run, checkpoint_name(5)))
    assert torch.equal(view["m/a"], a) and torch.equal(view["m/b"], b)
