"""Real power cuts on a FUSE file system that forgets everything not fsynced.

tests/powercut_fs.py is a pass-through FUSE file system (mfusepy + libfuse) that
remembers the last fsynced content of every file and the last fsynced entry list of
every directory; a "power cut" replaces the live tree with that durable one — dropping
un-fsynced data *and* un-fsynced creates/renames/unlinks, which LazyFS cannot do.

A torch-free writer subprocess saves checkpoints through ``CheckpointTxn`` (with
retention deletes) onto the mount and prints an acknowledgement after each commit
and deletion returns. Power is cut just before a seeded random mutating operation,
the file system is remounted, and recovery must find only valid checkpoints,
including every acknowledged one.

Needs root, /dev/fuse, libfuse and mfusepy (``pip install mfusepy``; Debian
``fuse3 libfuse3-3``); skipped with the reason otherwise.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager

import pytest
from fault_helpers import PYTHON, REPO

from guardian.format.layout import checkpoint_name, parse_checkpoint_name
from guardian.format.reader import list_checkpoints, newest_valid


def _fuse_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount FUSE file systems"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (no FUSE kernel support)"
    if not (shutil.which("fusermount3") or shutil.which("fusermount")):
        return "fusermount3/fusermount not found (apt-get install fuse3)"
    try:
        import mfusepy  # noqa: F401  (loads libfuse through ctypes)
    except Exception as e:  # ImportError, or OSError/EnvironmentError when libfuse is missing
        return f"mfusepy/libfuse unavailable ({type(e).__name__}: {e}); pip install mfusepy, apt-get install libfuse3-3"
    return None


pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(_fuse_unavailable() is not None, reason=str(_fuse_unavailable())),
    pytest.mark.timeout(120),
]

SERVER = os.path.join(REPO, "tests", "powercut_fs.py")


def is_mounted(mnt: str) -> bool:
    """From /proc/self/mountinfo: ``os.path.ismount`` says False once the FS returns EIO."""
    target = os.path.realpath(mnt).encode().replace(b" ", b"\\040")
    with open("/proc/self/mountinfo", "rb") as f:
        return any(line.split()[4] == target for line in f)


def _unmount(mnt: str) -> None:
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
    for cmd in ([fusermount, "-u", mnt], [fusermount, "-uz", mnt], ["umount", "-l", mnt]):
        if not is_mounted(mnt):
            return
        subprocess.run(cmd, capture_output=True, timeout=30)
    assert not is_mounted(mnt), f"could not unmount {mnt}"


@contextmanager
def powercut_mount(backing: str, mnt: str, seed: int):
    """Mount the power-cut file system over ``backing`` at ``mnt``; always unmounts."""
    os.makedirs(mnt, exist_ok=True)
    log = open(os.path.join(os.path.dirname(mnt), f"server-{seed}.log"), "w")
    proc = subprocess.Popen([PYTHON, SERVER, backing, mnt, str(seed)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 15
        while not is_mounted(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                raise AssertionError(f"power-cut FS did not mount: {open(log.name).read()}")
            time.sleep(0.02)
        yield proc
    finally:
        _unmount(mnt)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def control(mnt: str, what: str) -> int:
    """Send a control lookup; returns the errno (ENOENT while powered, EIO once cut)."""
    try:
        os.stat(os.path.join(mnt, f".powercut-{what}"))
    except OSError as e:
        return e.errno
    raise AssertionError("control names never exist")


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


WRITER = """
import os, sys
sys.path.insert(0, {tests!r})
from fault_helpers import save_raw_checkpoint
from guardian import fsops
from guardian.commit import clean_stale, delete_checkpoint
from guardian.format.layout import checkpoint_name, parse_checkpoint_name

class NoParentFsync(fsops.FS):
    def fsync_dir(self, path):
        if not os.path.basename(path).startswith(".tmp-"):
            return
        super().fsync_dir(path)

run, start, count, keep, broken = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
if broken == "1":
    fsops.set_fs(NoParentFsync())
clean_stale(run)
for step in range(start, start + count):
    save_raw_checkpoint(run, step, nbytes=12000, chunk=4096)
    print("committed", checkpoint_name(step), flush=True)
    names = sorted(n for n in os.listdir(run) if parse_checkpoint_name(n))
    for old in names[:-keep]:
        print("deleting", old, flush=True)
        delete_checkpoint(run, old)
        print("deleted", old, flush=True)
"""


def run_writer(run: str, start: int, count: int, *, keep: int = 2, broken: bool = False, timeout: float = 30):
    proc = subprocess.Popen(
        [
            PYTHON,
            "-c",
            WRITER.format(tests=os.path.join(REPO, "tests")),
            run,
            str(start),
            str(count),
            str(keep),
            "1" if broken else "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    acks = [line.split() for line in out.splitlines() if line.strip()]
    return proc.returncode, acks, err


def check_recovery(run: str, known: set[str], acks: list[list[str]]) -> set[str]:
    """Assert nothing acknowledged was lost and nothing invalid is visible; returns valid names."""
    committed = {n for what, n in acks if what == "committed"}
    deleting = {n for what, n in acks if what == "deleting"}
    deleted = {n for what, n in acks if what == "deleted"}
    listed = list_checkpoints(run, verify=True)
    garbage = {i.name: i.problems for i in listed if not i.valid}
    assert not garbage, f"invalid checkpoints visible after power cut: {garbage}"
    valid = {i.name for i in listed}
    must = (known | committed) - deleting
    assert must <= valid, f"lost acknowledged checkpoints {sorted(must - valid)}; have {sorted(valid)}"
    assert not (deleted & valid), f"deleted checkpoints came back: {sorted(deleted & valid)}"
    best = newest_valid(run)
    assert best is not None, "no checkpoint survived the power cut"
    if must:
        assert best.name >= max(must), (best.name, sorted(must))
    return valid


def test_powercut_fs_drops_unsynced_data_and_entries(tmp_path):
    """The file system itself: only fsynced data and fsynced directory entries survive."""
    backing, mnt = str(tmp_path / "backing"), str(tmp_path / "mnt")
    os.mkdir(backing)
    with powercut_mount(backing, mnt, seed=0):
        os.mkdir(os.path.join(mnt, "d"))
        fsync_dir(mnt)
        with open(os.path.join(mnt, "d", "synced"), "wb") as f:
            f.write(b"s" * 1000)
            os.fsync(f.fileno())
        fsync_dir(os.path.join(mnt, "d"))
        with open(os.path.join(mnt, "d", "synced"), "ab") as f:
            f.write(b"t" * 1000)  # appended, never fsynced
        with open(os.path.join(mnt, "d", "entry-not-synced"), "wb") as f:
            f.write(b"x")
            os.fsync(f.fileno())  # data durable, but its name is not
        os.rename(os.path.join(mnt, "d", "synced"), os.path.join(mnt, "d", "renamed"))
        os.mkdir(os.path.join(mnt, "lost-dir"))
        assert control(mnt, "status") == errno.ENOENT
        assert control(mnt, "now") == errno.EIO
        assert control(mnt, "status") == errno.EIO
    with powercut_mount(backing, mnt, seed=0):
        assert sorted(os.listdir(mnt)) == ["d"]
        assert os.listdir(os.path.join(mnt, "d")) == ["synced"]  # rename undone, new name lost
        with open(os.path.join(mnt, "d", "synced"), "rb") as f:
            data = f.read()
        assert data[:1000] == b"s" * 1000 and set(data[1000:]) <= {ord("t")}
    assert not is_mounted(mnt)


@pytest.mark.parametrize("block", range(6))
def test_random_power_cuts_during_saves_and_retention(block, tmp_path):
    """Seeded random power cuts while saving and deleting; remount and recover each time."""
    backing, mnt = str(tmp_path / "backing"), str(tmp_path / "mnt")
    os.makedirs(os.path.join(backing, "run"))
    run = os.path.join(mnt, "run")
    rng = random.Random(1000 + block)
    known: set[str] = set()
    step, cuts, acked = 1, 0, 0
    for rnd in range(5):
        seed = 1000 * block + rnd
        with powercut_mount(backing, mnt, seed):
            arm = rng.randint(1, 110)  # one save is ~18 mutating operations, a deletion ~6
            assert control(mnt, f"arm-{arm}") == errno.ENOENT
            code, acks, err = run_writer(run, step, count=5)
            if control(mnt, "status") == errno.ENOENT:  # the writer finished first
                assert code == 0, err
                control(mnt, "now")
            else:
                cuts += 1
                assert code != 0 and ("Input/output error" in err or "EIO" in err), err
        acked += sum(1 for what, _ in acks if what == "committed")
        with powercut_mount(backing, mnt, seed):
            known = check_recovery(run, known, acks)
        step += 5
    print(f"\n[powercut] block {block}: 5 rounds, {cuts} cuts mid-write, {acked} acknowledged commits")
    assert cuts >= 2


def test_missing_parent_fsync_loses_an_acknowledged_save(tmp_path):
    """Negative control: a writer that skips the run-dir fsync after the rename (which
    LazyFS cannot catch) loses a checkpoint it already reported as saved."""
    backing, mnt = str(tmp_path / "backing"), str(tmp_path / "mnt")
    os.makedirs(os.path.join(backing, "run"))
    run = os.path.join(mnt, "run")
    with powercut_mount(backing, mnt, seed=7):
        code, acks, err = run_writer(run, 1, count=2, keep=5, broken=True)
        assert code == 0, err
        assert control(mnt, "now") == errno.EIO
    with powercut_mount(backing, mnt, seed=7):
        assert os.listdir(run) == []
        assert newest_valid(run) is None
    assert acks == [["committed", checkpoint_name(1)], ["committed", checkpoint_name(2)]]
    assert all(parse_checkpoint_name(n) for _, n in acks)
