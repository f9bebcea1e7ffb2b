"""Full disks and I/O errors: a failed save leaves nothing behind and never harms older checkpoints.

Real ENOSPC on a 2 MiB tmpfs (root only; skipped otherwise), then OSError(ENOSPC/EIO)
injected at every file-system call of the commit protocol through the ``fsops`` seam.
"""

from __future__ import annotations

import errno
import os
import subprocess
from types import SimpleNamespace

import pytest
from fault_helpers import save_raw_checkpoint, use_fs

from guardian import commit, fsops
from guardian.commit import CheckpointTxn, check_free_space, clean_stale
from guardian.errors import CheckpointWriteError
from guardian.format.layout import TMP_PREFIX, checkpoint_name
from guardian.format.manifest import Manifest
from guardian.format.reader import inspect_checkpoint, list_checkpoints, newest_valid

STEP1, STEP2, STEP3 = checkpoint_name(1), checkpoint_name(2), checkpoint_name(3)


def _leftovers(run: str) -> list[str]:
    return [e for e in os.listdir(run) if e.startswith(TMP_PREFIX)]


def _assert_untouched(run: str, newest: str = STEP1) -> None:
    assert inspect_checkpoint(os.path.join(run, STEP1)).valid
    best = newest_valid(run)
    assert best is not None and best.name == newest


def _assert_enospc(e: pytest.ExceptionInfo, name: str) -> None:
    assert e.value.errno == errno.ENOSPC
    msg = str(e.value)
    assert name in msg and "the disk is full; free space or point guardian at another directory" in msg, msg
    assert "Earlier checkpoints are untouched." in msg


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (64 inodes), unmounted in teardown."""
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    mnt = str(tmp_path / "small")
    os.mkdir(mnt)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,nr_inodes=64", "tmpfs", mnt], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", mnt], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", mnt], capture_output=True)


def _ballast(path: str, nbytes: int) -> None:
    with open(path, "wb") as f:
        f.write(b"\xab" * nbytes)


def test_real_enospc_fails_cleanly_and_next_save_succeeds(small_disk):
    run = os.path.join(small_disk, "run")
    os.mkdir(run)
    save_raw_checkpoint(run, 1, nbytes=256 * 1024)
    ballast = os.path.join(small_disk, "ballast")
    _ballast(ballast, 1200 * 1024)
    with pytest.raises(CheckpointWriteError) as e:
        save_raw_checkpoint(run, 2, nbytes=1024 * 1024)
    _assert_enospc(e, f"{STEP2}/tensors.safetensors")
    assert not _leftovers(run), "the failed save left its temp dir behind"
    _assert_untouched(run)
    with pytest.raises(CheckpointWriteError, match="not enough space") as e2:
        check_free_space(run, 1024 * 1024)  # the pre-check would have said so up front
    assert e2.value.errno == errno.ENOSPC and run in str(e2.value)

    os.unlink(ballast)
    check_free_space(run, 1024 * 1024)
    save_raw_checkpoint(run, 2, nbytes=1024 * 1024)
    assert [i.name for i in list_checkpoints(run, verify=True) if i.valid] == [STEP1, STEP2]
    assert newest_valid(run).name == STEP2


def test_real_enospc_at_every_fill_level(small_disk):
    """Leave 0..N pages free so the save runs out at different points (data, state, manifest)."""
    run = os.path.join(small_disk, "run")
    os.mkdir(run)
    save_raw_checkpoint(run, 1, nbytes=4000)
    ballast = os.path.join(small_disk, "ballast")
    st = os.statvfs(small_disk)
    free = st.f_bavail * st.f_frsize
    outcomes = []
    for pages_left in range(0, 6):
        _ballast(ballast, free - pages_left * 4096)
        step = 10 + pages_left
        try:
            save_raw_checkpoint(run, step, nbytes=6000)
        except CheckpointWriteError as e:
            assert e.errno == errno.ENOSPC and "disk is full" in str(e), str(e)
            outcomes.append(str(e).split(":")[0])
        else:
            outcomes.append("saved")
        assert not _leftovers(run)
        assert all(i.valid for i in list_checkpoints(run, verify=True))
        assert inspect_checkpoint(os.path.join(run, STEP1)).valid
        os.unlink(ballast)
    assert outcomes[0] != "saved" and "saved" in outcomes, outcomes
    assert len(set(outcomes)) >= 3, f"expected failures at different files: {outcomes}"


def test_real_inode_exhaustion(small_disk):
    run = os.path.join(small_disk, "run")
    os.mkdir(run)
    save_raw_checkpoint(run, 1, nbytes=100)
    filler = os.path.join(small_disk, "filler")
    os.mkdir(filler)
    n = 0
    try:
        while True:
            open(os.path.join(filler, str(n)), "wb").close()
            n += 1
    except OSError as e:
        assert e.errno == errno.ENOSPC
    with pytest.raises(CheckpointWriteError) as e:
        save_raw_checkpoint(run, 2, nbytes=100)
    _assert_enospc(e, STEP2)
    assert not _leftovers(run)
    _assert_untouched(run)


# ---------------------------------------------------------------- injected errors


class FailingFS(fsops.FS):
    """Raises ``OSError(err)`` at the ``nth`` call of ``method`` (matching ``where``)."""

    def __init__(self, method: str, err: int, nth: int = 1, where: str = "") -> None:
        self.method, self.err, self.nth, self.where, self.calls = method, err, nth, where, 0

    def _maybe_fail(self, name: str, arg: object) -> None:
        if name == self.method and self.where in str(arg):
            self.calls += 1
            if self.calls == self.nth:
                raise OSError(self.err, os.strerror(self.err), str(arg))

    def mkdir(self, path):
        self._maybe_fail("mkdir", path)
        super().mkdir(path)

    def create(self, path):
        self._maybe_fail("create", path)
        return super().create(path)

    def write(self, fd, data):
        self._maybe_fail("write", fd)
        super().write(fd, data)

    def fsync(self, fd):
        self._maybe_fail("fsync", fd)
        super().fsync(fd)

    def fsync_dir(self, path):
        self._maybe_fail("fsync_dir", os.path.basename(path))
        super().fsync_dir(path)

    def rename(self, src, dst):
        self._maybe_fail("rename", dst)
        super().rename(src, dst)


SITES = [
    ("mkdir", 1, ""),
    ("create", 1, ""),  # tensors.safetensors
    ("write", 1, ""),  # its header
    ("write", 2, ""),  # its data
    ("fsync", 1, ""),
    ("create", 2, ""),  # state.json
    ("fsync", 2, ""),
    ("create", 3, ""),  # manifest.json
    ("write", 4, ""),  # manifest bytes
    ("fsync", 3, ""),  # manifest fsync
    ("fsync_dir", 1, TMP_PREFIX),
    ("rename", 1, ""),
]


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
@pytest.mark.parametrize("method,nth,where", SITES, ids=[f"{m}#{n}" for m, n, _ in SITES])
def test_injected_error_before_publish(method, nth, where, err, tmp_path):
    run = str(tmp_path / "run")
    os.mkdir(run)
    save_raw_checkpoint(run, 1)
    fs = FailingFS(method, err, nth, where)
    with use_fs(fs), pytest.raises(CheckpointWriteError) as e:
        save_raw_checkpoint(run, 2, nbytes=8192, chunk=4096)
    assert fs.calls == nth, "the injected fault was never reached"
    assert e.value.errno == err
    assert isinstance(e.value.__cause__, OSError) and e.value.__cause__.errno == err
    msg = str(e.value)
    assert STEP2 in msg and os.strerror(err) in msg and "Earlier checkpoints are untouched." in msg
    hint = "disk is full" if err == errno.ENOSPC else "check the disk and the file system"
    assert hint in msg
    assert not _leftovers(run) and STEP2 not in os.listdir(run)
    _assert_untouched(run)
    save_raw_checkpoint(run, 3)  # the next save works
    assert newest_valid(run).name == STEP3


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_injected_error_in_parent_fsync_after_rename(err, tmp_path):
    """The rename happened; only its durability is in doubt: say so, keep the checkpoint."""
    run = str(tmp_path / "run")
    os.mkdir(run)
    save_raw_checkpoint(run, 1)
    with use_fs(FailingFS("fsync_dir", err, 1, "run")), pytest.raises(CheckpointWriteError) as e:
        save_raw_checkpoint(run, 2)
    assert e.value.errno == err and f"fsync of {run} after rename" in str(e.value)
    assert not _leftovers(run)
    assert newest_valid(run).name == STEP2 and inspect_checkpoint(os.path.join(run, STEP1)).valid


def test_failed_cleanup_after_failed_save_is_harmless(tmp_path, caplog):
    class FailBoth(FailingFS):
        def rmtree(self, path):
            raise OSError(errno.EIO, "Input/output error", path)

    run = str(tmp_path / "run")
    os.mkdir(run)
    save_raw_checkpoint(run, 1)
    with use_fs(FailBoth("fsync", errno.EIO)), pytest.raises(CheckpointWriteError) as e:
        save_raw_checkpoint(run, 2)
    assert e.value.errno == errno.EIO  # the original error, not the cleanup's
    assert "could not remove" in caplog.text
    assert len(_leftovers(run)) == 1
    _assert_untouched(run)
    assert clean_stale(run) and not _leftovers(run)


def test_exception_while_serializing_removes_temp_dir(tmp_path):
    run = str(tmp_path / "run")
    os.mkdir(run)
    save_raw_checkpoint(run, 1)

    def chunks():
        yield b"partial"
        raise RuntimeError("serializer blew up")

    with pytest.raises(RuntimeError, match="serializer"):
        with CheckpointTxn(run, STEP2) as txn:
            txn.add_file("tensors.safetensors", chunks())
            txn.commit(Manifest(name=STEP2, step=2, epoch=0, seq=2, files={}))
    assert not _leftovers(run)
    _assert_untouched(run)


# ------------------------------------------------------------------ free-space check


def test_free_space_check_treats_zero_blocks_as_unknown(monkeypatch, tmp_path):
    zero = SimpleNamespace(f_blocks=0, f_bavail=0, f_frsize=4096)
    monkeypatch.setattr(commit.os, "statvfs", lambda p: zero)
    check_free_space(str(tmp_path), 10**15)  # FUSE/network: "unknown", not "full"


def test_free_space_check_ignores_statvfs_errors(monkeypatch, tmp_path):
    def boom(p):
        raise OSError(errno.ENOSYS, "not implemented")

    monkeypatch.setattr(commit.os, "statvfs", boom)
    check_free_space(str(tmp_path), 10**15)


def test_free_space_check_refuses_when_full(monkeypatch, tmp_path):
    full = SimpleNamespace(f_blocks=1000, f_bavail=10, f_frsize=4096)
    monkeypatch.setattr(commit.os, "statvfs", lambda p: full)
    with pytest.raises(CheckpointWriteError) as e:
        check_free_space(str(tmp_path), 1_000_000)
    assert e.value.errno == errno.ENOSPC
    assert str(e.value) == (
        f"not enough space in {tmp_path} for the next checkpoint: 1.0 MB needed, 0.0 MB free. "
        "Free space or point guardian at another directory; earlier checkpoints are untouched."
    )
    check_free_space(str(tmp_path), 40960)  # exactly what is free: fine
