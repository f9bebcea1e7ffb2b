"""A FUSE pass-through file system that can lose power (run as a separate process).

    python tests/powercut_fs.py BACKING MOUNTPOINT SEED

Every operation is performed on BACKING. Alongside, the server remembers what a disk
would have made durable:

* per file, the content as of its last ``fsync`` (a new file is durable as empty);
* per directory, the entry list as of its last ``fsync`` of the directory (a new
  directory is durable as empty).

A *power cut* replaces BACKING with the durable view: un-fsynced data is dropped (or,
chosen with the seeded RNG, survives only up to a random earlier size), and so are
un-fsynced creates, mkdirs, renames and unlinks. That is stricter than LazyFS, which
never loses namespace operations. After a cut every operation fails with EIO until
the file system is unmounted; mount it again on the same BACKING to see what
survived.

Control, through lookups of names that never exist (the kernel does not cache them):

    stat MNT/.powercut-now          cut power now
    stat MNT/.powercut-arm-<N>      cut power just before the N-th mutating operation
    stat MNT/.powercut-status       ENOENT while powered, EIO after the cut

The server is single-threaded (``nothreads``), so a cut is atomic with respect to
every operation.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import sys

import mfusepy
from mfusepy import FUSE, FuseOSError, Operations

CONTROL = "/.powercut-"


class PowerCutFS(Operations):
    use_ns = True

    def __init__(self, backing: str, seed: int) -> None:
        self.backing = os.path.abspath(backing)
        self.rng = random.Random(seed)
        self.ids: dict[int, int] = {}  # backing st_ino -> our id (stable across renames)
        self.kind: dict[int, str] = {}
        self.durable_file: dict[int, bytes] = {}
        self.durable_dir: dict[int, dict[str, int]] = {}
        self.next_id = 0
        self.dead = False
        self.countdown: int | None = None
        self.mutations = 0
        self.root_id = self._scan(self.backing)

    # ------------------------------------------------------------ bookkeeping

    def _new_id(self, st_ino: int, kind: str) -> int:
        self.next_id += 1
        self.ids[st_ino] = self.next_id
        self.kind[self.next_id] = kind
        return self.next_id

    def _scan(self, full: str) -> int:
        """At mount time everything on BACKING is durable."""
        st = os.lstat(full)
        if os.path.isdir(full):
            ino = self._new_id(st.st_ino, "d")
            self.durable_dir[ino] = {n: self._scan(os.path.join(full, n)) for n in os.listdir(full)}
        else:
            ino = self._new_id(st.st_ino, "f")
            with open(full, "rb") as f:
                self.durable_file[ino] = f.read()
        return ino

    def _full(self, path: str) -> str:
        return os.path.join(self.backing, path.lstrip("/"))

    def _id(self, full: str) -> int:
        st = os.lstat(full)
        if st.st_ino not in self.ids:
            self._new_id(st.st_ino, "d" if os.path.isdir(full) else "f")
        return self.ids[st.st_ino]

    def _alive(self) -> None:
        if self.dead:
            raise FuseOSError(errno.EIO)

    def _mutate(self) -> None:
        """Called before every operation that changes state (or makes it durable)."""
        self._alive()
        self.mutations += 1
        if self.countdown is not None:
            self.countdown -= 1
            if self.countdown <= 0:
                self.cut()
                raise FuseOSError(errno.EIO)

    # --------------------------------------------------------------- power cut

    def cut(self) -> None:
        live_paths: dict[int, str] = {}
        for root, dirs, files in os.walk(self.backing):
            for name in dirs + files:
                full = os.path.join(root, name)
                ino = os.lstat(full).st_ino
                if ino in self.ids:
                    live_paths[self.ids[ino]] = full
        staging = self.backing + ".powercut-staging"
        shutil.rmtree(staging, ignore_errors=True)
        self._build(self.root_id, staging, live_paths, depth=0)
        dead = self.backing + ".powercut-live"
        os.rename(self.backing, dead)
        os.rename(staging, self.backing)
        shutil.rmtree(dead, ignore_errors=True)
        self.dead = True
        sys.stderr.write(f"powercut_fs: power cut after {self.mutations} mutating operations\n")

    def _build(self, ino: int, dest: str, live_paths: dict[int, str], depth: int) -> None:
        if depth > 64:
            return
        if self.kind[ino] == "d":
            os.mkdir(dest)
            for name, child in sorted(self.durable_dir.get(ino, {}).items()):
                self._build(child, os.path.join(dest, name), live_paths, depth + 1)
            return
        with open(dest, "wb") as f:
            f.write(self._surviving_content(ino, live_paths.get(ino)))

    def _surviving_content(self, ino: int, live_path: str | None) -> bytes:
        durable = self.durable_file.get(ino, b"")
        if live_path is None or self.rng.random() < 0.5:
            return durable
        with open(live_path, "rb") as f:
            live = f.read()
        if live == durable or not live.startswith(durable):
            return durable
        return live[: self.rng.randint(len(durable), len(live))]  # un-fsynced tail partly written

    # -------------------------------------------------------------- operations

    def getattr(self, path, fh=None):
        if path.startswith(CONTROL):
            self._control(path[len(CONTROL) :])
        self._alive()
        st = os.lstat(self._full(path))
        return {
            k: getattr(st, k)
            for k in (
                "st_mode",
                "st_nlink",
                "st_size",
                "st_uid",
                "st_gid",
                "st_atime_ns",
                "st_mtime_ns",
                "st_ctime_ns",
            )
        } | {"st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns, "st_ctime": st.st_ctime_ns}

    def _control(self, what: str) -> None:
        if what == "now" and not self.dead:
            self.cut()
        elif what.startswith("arm-"):
            self.countdown = int(what[4:])
        self._alive()
        raise FuseOSError(errno.ENOENT)

    def access(self, path, amode):
        self._alive()
        if not os.access(self._full(path), amode):
            raise FuseOSError(errno.EACCES)
        return 0

    def readdir(self, path, fh):
        self._alive()
        return [".", ".."] + os.listdir(self._full(path))

    def opendir(self, path):
        self._alive()
        return 0

    def releasedir(self, path, fh):
        return 0

    def statfs(self, path):
        self._alive()
        sv = os.statvfs(self._full(path))
        return {
            k: getattr(sv, k)
            for k in (
                "f_bavail",
                "f_bfree",
                "f_blocks",
                "f_bsize",
                "f_favail",
                "f_ffree",
                "f_files",
                "f_flag",
                "f_frsize",
                "f_namemax",
            )
        }

    def mkdir(self, path, mode):
        self._mutate()
        full = self._full(path)
        os.mkdir(full, mode)
        ino = self._new_id(os.lstat(full).st_ino, "d")
        self.durable_dir[ino] = {}

    def create(self, path, mode, flags=0):
        self._mutate()
        full = self._full(path)
        fd = os.open(full, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
        ino = self._new_id(os.fstat(fd).st_ino, "f")
        self.durable_file[ino] = b""
        return fd

    def open(self, path, flags):
        self._alive()
        return os.open(self._full(path), flags & ~(os.O_CREAT | os.O_EXCL))

    def read(self, path, size, offset, fh):
        self._alive()
        return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        self._mutate()
        return os.pwrite(fh, data, offset)

    def truncate(self, path, length, fh=None):
        self._mutate()
        os.truncate(self._full(path), length)

    def flush(self, path, fh):
        self._alive()
        return 0

    def release(self, path, fh):
        os.close(fh)
        return 0

    def fsync(self, path, datasync, fh):
        self._mutate()
        os.fsync(fh)
        ino = self.ids[os.fstat(fh).st_ino]
        size = os.fstat(fh).st_size
        self.durable_file[ino] = os.pread(fh, size, 0) if size else b""
        return 0

    def fsyncdir(self, path, datasync, fh):
        self._mutate()
        full = self._full(path)
        self.durable_dir[self._id(full)] = {n: self._id(os.path.join(full, n)) for n in os.listdir(full)}
        return 0

    def rename(self, old, new):
        self._mutate()
        dst = self._full(new)
        replaced = os.lstat(dst).st_ino if os.path.lexists(dst) else None
        os.rename(self._full(old), dst)
        if replaced is not None:
            self.ids.pop(replaced, None)

    def unlink(self, path):
        self._mutate()
        full = self._full(path)
        ino = os.lstat(full).st_ino
        os.unlink(full)
        self.ids.pop(ino, None)  # the backing inode number may be reused; our id is not

    def rmdir(self, path):
        self._mutate()
        full = self._full(path)
        ino = os.lstat(full).st_ino
        os.rmdir(full)
        self.ids.pop(ino, None)

    def chmod(self, path, mode):
        self._mutate()
        os.chmod(self._full(path), mode)

    def chown(self, path, uid, gid):
        self._mutate()
        os.chown(self._full(path), uid, gid)

    def utimens(self, path, times=None):
        self._mutate()
        os.utime(self._full(path), ns=times)


def main() -> None:
    backing, mountpoint, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ops = PowerCutFS(backing, seed)
    FUSE(
        ops,
        mountpoint,
        foreground=True,
        nothreads=True,
        hard_remove=True,  # unlink for real, never rename open files to .fuse_hidden*
        entry_timeout=0,
        attr_timeout=0,
        negative_timeout=0,
        fsname="powercut",
    )


if __name__ == "__main__":
    assert mfusepy.fuse_version_major in (2, 3)
    main()
