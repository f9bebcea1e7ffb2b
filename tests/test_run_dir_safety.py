"""The run directory's own files and the file system under it, treated as untrusted:
the O_DIRECT probe, durable creation of run directories, the lock file, set-aside,
stale temp entries and the reader's size checks."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

from guardian import commit, direct_io, fsops, locking
from guardian.async_writer import AsyncWriter
from guardian.errors import (
    CheckpointWriteError,
    CorruptCheckpointError,
    RunLockedError,
    UnsafeCheckpointError,
)
from guardian.format import reader, safetensors_io
from guardian.format.layout import STATE_FILE, checkpoint_name
from guardian.format.manifest import Manifest
from guardian.state.snapshot import capture

# ---------------------------------------------------------------------------- O_DIRECT probe


def _save(run: str, step: int) -> str:
    states = {"model": ("module", {"w": torch.arange(3 << 20, dtype=torch.float32)})}
    writer = AsyncWriter()
    try:
        name = checkpoint_name(step)
        writer.submit(
            run, capture(states), Manifest(name=name, step=step, epoch=0, seq=step, files={}), lambda *a: None
        )
        writer.wait()
    finally:
        writer.close()
    return os.path.join(run, name)


def test_probe_proves_o_direct_on_this_disk_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(direct_io, "_proven", {})
    assert direct_io.direct_io_proven(str(tmp_path)) is True
    assert os.listdir(tmp_path) == []
    assert list(direct_io._proven.values()) == [True]


def test_lying_o_direct_falls_back_to_buffered_once(tmp_path, monkeypatch, caplog):
    """A file system that corrupts O_DIRECT writes (seen on a FUSE file system; none is
    mountable in this test) is simulated by corrupting what the probe reads back."""
    monkeypatch.setattr(direct_io, "_proven", {})
    probes = []

    def corrupted(path: str) -> bytes:
        probes.append(path)
        data = bytearray(open(path, "rb").read())
        data[len(data) // 2] ^= 0xFF
        return bytes(data)

    monkeypatch.setattr(direct_io, "_read_back", corrupted)
    direct_writes = []
    real_open_direct = direct_io._open_direct
    monkeypatch.setattr(direct_io, "_open_direct", lambda p: direct_writes.append(p) or real_open_direct(p))
    run = str(tmp_path / "run")
    os.mkdir(run)
    with caplog.at_level(logging.WARNING, logger="guardian.direct_io"):
        first, second = _save(run, 1), _save(run, 2)
    assert len(probes) == 1, "the probe runs once per file system, not once per save"
    assert direct_writes == [], "no O_DIRECT write after the probe failed"
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "not trustworthy" in caplog.records[0].message and "buffered" in caplog.records[0].message
    for path in (first, second):
        info = reader.inspect_checkpoint(path, verify=True)
        assert info.valid, info.problems


def test_refused_o_direct_is_remembered(tmp_path, monkeypatch):
    """EINVAL at open (tmpfs on older kernels, some network file systems)."""
    monkeypatch.setattr(direct_io, "_proven", {})

    def refuse(path, pattern, flag):
        return "O_DIRECT refused at open: Invalid argument"

    monkeypatch.setattr(direct_io, "_write_direct_probe", refuse)
    assert direct_io.direct_io_proven(str(tmp_path)) is False
    assert direct_io.direct_io_proven(str(tmp_path)) is False
    assert list(direct_io._proven.values()) == [False]


# ---------------------------------------------------------------------------- durable mkdir


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_make_dirs_durably_fsyncs_each_new_directorys_parent(tmp_path):
    target = tmp_path / "a" / "b" / "run"
    code = f"from guardian.fsops import make_dirs_durably; print(make_dirs_durably({str(target)!r}))"
    trace = tmp_path / "trace"
    subprocess.run(
        [
            "strace",
            "-f",
            "-y",
            "-o",
            str(trace),
            "-e",
            "trace=mkdir,mkdirat,fsync",
            sys.executable,
            "-c",
            code,
        ],
        check=True,
        capture_output=True,
    )
    lines = [ln for ln in trace.read_text().splitlines() if str(tmp_path) in ln]
    for d in (target.parent.parent, target.parent, target):
        made = next(i for i, ln in enumerate(lines) if "mkdir" in ln and f'"{d}"' in ln)
        synced = [
            i for i, ln in enumerate(lines) if ln.split("(", 1)[0].endswith("fsync") and f"<{d.parent}>" in ln
        ]
        assert any(i > made for i in synced), f"no fsync of {d.parent} after creating {d}:\n" + "\n".join(
            lines
        )
    assert target.is_dir()
    assert fsops.make_dirs_durably(str(target)) == []


def test_make_dirs_durably_refuses_a_file_in_the_way(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError):
        fsops.make_dirs_durably(str(tmp_path / "f" / "run"))


# ---------------------------------------------------------------------------- the lock


def test_lock_symlink_is_never_written_through(tmp_path):
    outside = tmp_path / "precious"
    outside.write_text("keep me")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").symlink_to(outside)
    with pytest.raises(CheckpointWriteError, match="symlink.*Remove it"):
        locking.RunLock(str(run)).acquire()
    assert outside.read_text() == "keep me"


def test_lock_fifo_does_not_block(tmp_path):
    os.mkfifo(tmp_path / ".lock")
    with pytest.raises(CheckpointWriteError, match="FIFO"):
        locking.RunLock(str(tmp_path)).acquire()


def test_lock_held_elsewhere_is_reported_as_in_use(tmp_path):
    first = locking.RunLock(str(tmp_path))
    first.acquire()
    try:
        holder = os.open(tmp_path / ".lock", os.O_RDONLY)  # another open file description
        with pytest.raises(BlockingIOError):
            fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(holder)
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            locking.RunLock(str(tmp_path)).acquire()
    finally:
        first.release()


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP])
def test_flock_unsupported_is_not_called_a_permission_problem(tmp_path, monkeypatch, code):
    """Lustre without ``-o flock`` answers ENOSYS/ENOLCK; no such mount exists here, so
    flock is made to answer that way."""

    def refuse(fd, op):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(locking.fcntl, "flock", refuse)
    with pytest.raises(CheckpointWriteError, match="refused flock.*-o flock") as e:
        locking.RunLock(str(tmp_path)).acquire()
    assert "permission" not in str(e.value) and e.value.errno == code


# ---------------------------------------------------------------------------- set-aside, stale entries


@pytest.fixture
def two(template, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(template, run, symlinks=True)
    return run


def test_set_aside_never_follows_a_symlinked_set_aside(two, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, os.path.join(two, "set-aside"))
    dest = commit.set_aside(two, checkpoint_name(2), "test")
    assert os.path.dirname(dest) == os.path.join(two, "set-aside.1")
    assert list(outside.iterdir()) == []


def test_set_aside_beside_a_regular_file(two):
    with open(os.path.join(two, "set-aside"), "w") as f:
        f.write("not a directory")
    dest = commit.set_aside(two, checkpoint_name(2), "test")
    assert os.path.isdir(dest) and "set-aside.1" in dest


def test_clean_stale_unlinks_links_and_files_without_following(two, tmp_path):
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "f").write_text("keep")
    os.symlink(outside / "sub", os.path.join(two, ".tmp-step-000000009-1-aa"))
    os.symlink(outside / "sub" / "f", os.path.join(two, ".trash-step-000000001-bb"))
    with open(os.path.join(two, ".tmp-step-000000010-2-cc"), "w") as f:
        f.write("x")
    os.makedirs(os.path.join(two, ".tmp-real", "d"))
    removed = commit.clean_stale(two)
    assert len(removed) == 4
    assert (outside / "sub" / "f").read_text() == "keep"
    assert not [n for n in os.listdir(two) if n.startswith((".tmp-", ".trash-"))]


# ---------------------------------------------------------------------------- reader budgets


def test_state_json_size_is_checked_before_reading(two, monkeypatch):
    """load_state_json refuses by fstat size; it never reads an oversized file."""
    ckpt = os.path.join(two, checkpoint_name(2))
    path = os.path.join(ckpt, STATE_FILE)
    budget = reader.state_budget(ckpt)
    with open(path, "r+b") as f:
        f.truncate(budget + 1)
    reads = []
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda *a: reads.append(a) or real(*a))
    with pytest.raises(UnsafeCheckpointError, match="more than a state file"):
        reader.load_state_json(ckpt)
    assert reads == []


def test_header_budget_follows_the_data(tmp_path):
    assert safetensors_io.header_budget(0) == safetensors_io.HEADER_BASE_BUDGET
    path = tmp_path / "t.safetensors"
    n = safetensors_io.HEADER_BASE_BUDGET + 8
    path.write_bytes(n.to_bytes(8, "little") + b" " * n)
    with pytest.raises(CorruptCheckpointError, match="header claims"):
        safetensors_io.read_layout(str(path))


def test_saving_more_state_than_a_reader_accepts_is_refused(monkeypatch):
    from guardian.errors import UnsupportedStateError

    monkeypatch.setattr(reader, "STATE_BASE_BUDGET", 1000)
    snap = capture({"extra": ("extra", {"history": list(range(1000))})})
    with pytest.raises(UnsupportedStateError, match="more than guardian reads back"):
        snap.state_json()
