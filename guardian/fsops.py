"""The file-system operations checkpoint commits are made of, behind one seam.

Every byte and every directory entry guardian writes for a checkpoint goes through
an ``FS`` object. The real one is thin; tests swap in a recording one to enumerate
the states a power cut could leave (see tests/test_crash_states.py). Keeping the
operation list small (create, write, fsync, rename, link, mkdir, unlink/rmtree, fsync of
a directory) is what makes that enumeration tractable.
"""

from __future__ import annotations

import os
import shutil

from .smallfiles import fsync_dir


class FS:
    """Real file system. Methods mirror the syscalls and raise ``OSError`` as they do."""

    def mkdir(self, path: str) -> None:
        os.mkdir(path, 0o755)

    def create(self, path: str) -> int:
        """Open a new file for writing; it must not already exist."""
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)

    def write(self, fd: int, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.write(fd, view)
            view = view[n:]

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def rename(self, src: str, dst: str) -> None:
        """Atomic rename that never replaces an existing checkpoint."""
        if os.path.lexists(dst):
            raise FileExistsError(17, "destination exists", dst)
        os.rename(src, dst)

    def link(self, src: str, dst: str) -> None:
        """A new name for an existing (already durable) file; never follows ``src``."""
        os.link(src, dst, follow_symlinks=False)

    def rmtree(self, path: str) -> None:
        shutil.rmtree(path)

    def unlink(self, path: str) -> None:
        """Remove one non-directory entry (a symlink itself, never its target)."""
        os.unlink(path)


fs: FS = FS()


def set_fs(new: FS) -> FS:
    """Swap the file-system seam (tests only); returns the previous one."""
    global fs
    old, fs = fs, new
    return old


def make_dirs_durably(path: str, mode: int = 0o755) -> list[str]:
    """Create ``path`` and any missing parents, making each new entry durable.

    ``os.makedirs`` leaves a new directory's entry in its parent's page cache: a power
    cut can lose the whole run directory on a file system that does not journal it.
    Here each directory created is followed by an fsync of its parent (deepest last,
    so every entry is durable before anything is written inside it). Returns the
    directories created, outermost first (empty when ``path`` existed). Raises
    ``OSError`` as ``os.makedirs`` does, including ``FileExistsError`` when ``path``
    exists but is not a directory.
    """
    path = os.path.abspath(path)
    missing = []
    probe = path
    while not os.path.isdir(probe):
        if os.path.lexists(probe) and not os.path.isdir(probe):  # another rank may just have made it
            raise FileExistsError(17, "exists and is not a directory", probe)
        missing.append(probe)
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    created = []
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise
            continue
        fsync_dir(os.path.dirname(directory))  # outside any run: never through the test seam
        created.append(directory)
    return created
