"""The world changes under a running job: its directory is removed, its file system
goes read-only, it may not write at all. Each ends with a clear error and nothing
lost; with on_save_error='warn' training goes on and saves resume once they can."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

import guardian
from guardian.errors import CheckpointWriteError
from guardian.format import reader


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _steps(g, model, opt, n):
    for _ in range(n):
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
        g.step()


@pytest.mark.parametrize("async_save", [False, True])
def test_run_directory_removed_mid_run(tmp_path, async_save):
    import shutil

    run = str(tmp_path / "run")
    model, opt = _setup()
    with pytest.raises(CheckpointWriteError, match="removed while training"):
        with guardian.protect(model=model, optimizer=opt, dir=run, every_steps=2, async_save=async_save) as g:
            _steps(g, model, opt, 2)
            g._writer.wait()
            shutil.rmtree(run)
            _steps(g, model, opt, 4)


@pytest.fixture
def tmpfs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount tmpfs here")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _remount(mnt: str, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", mnt], check=True)


@pytest.mark.parametrize("async_save", [False, True])
def test_file_system_goes_read_only_mid_run(tmpfs, async_save):
    run = os.path.join(tmpfs, "run")
    model, opt = _setup()
    with pytest.raises(CheckpointWriteError, match="not writable"):
        with guardian.protect(model=model, optimizer=opt, dir=run, every_steps=2, async_save=async_save) as g:
            _steps(g, model, opt, 2)
            g._writer.wait()
            _remount(tmpfs, "ro")
            _steps(g, model, opt, 4)
    infos = reader.list_checkpoints(run, verify=True)
    assert [i.name for i in infos] == ["step-000000002"] and infos[0].valid
    _remount(tmpfs, "rw")


def test_read_only_with_warn_keeps_training_and_recovers(tmpfs):
    run = os.path.join(tmpfs, "run")
    model, opt = _setup()
    with guardian.protect(
        model=model,
        optimizer=opt,
        dir=run,
        every_steps=2,
        on_save_error="warn",
        async_save=False,
        keep_last=None,
    ) as g:
        _steps(g, model, opt, 2)
        _remount(tmpfs, "ro")
        _steps(g, model, opt, 4)  # saves at 4 and 6 fail, training goes on
        _remount(tmpfs, "rw")
        _steps(g, model, opt, 2)  # the save at 8 succeeds
    steps = [i.manifest.step for i in reader.list_checkpoints(run, verify=True) if i.valid]
    assert steps[:2] == [2, 8]
    assert not [n for n in os.listdir(run) if n.startswith(".tmp-")]


def _chattr(flag: str, path: str) -> bool:
    return subprocess.run(["chattr", flag, path], capture_output=True).returncode == 0


def test_permission_denied_is_a_clear_error(tmp_path):
    """An immutable directory refuses writes even to root (EPERM), like a directory
    another user owns refuses an unprivileged one (EACCES)."""
    run = tmp_path / "locked"
    run.mkdir()
    if not _chattr("+i", str(run)):
        pytest.skip("chattr +i is not available here (needs root and ext2/3/4, xfs or btrfs)")
    try:
        with pytest.raises(CheckpointWriteError, match="is not writable by this"):
            guardian.protect(model=torch.nn.Linear(2, 2), dir=str(run)).__enter__()
    finally:
        _chattr("-i", str(run))
    assert os.listdir(run) == []
