"""The commit protocol: the only code that writes checkpoint bytes.

    1. mkdir RUN/.tmp-<name>-<pid>-<nonce>      (readers ignore dot-names)
    2. for each file: create, write, fsync, close (or, for an incremental save's
       unchanged tensors, a hard link to a committed checkpoint's fsynced file)
    3. manifest.json written last, fsynced      (its presence proves 2 is durable)
    4. fsync the temp directory (and its subdirectories)
    5. rename temp → RUN/<name>                 (atomic; never replaces anything)
    6. fsync RUN                                 (makes the rename itself durable)

A crash or power cut at any point leaves either no new checkpoint (a temp dir that
readers skip and the next writer removes) or a complete one. Deletion is the mirror
image: rename to ``.trash-…``, fsync RUN, then remove — so a half-deleted checkpoint
is never mistaken for a good one. Nothing here ever deletes a committed checkpoint
except ``delete_checkpoint``, which retention calls only after a newer commit.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterable

from . import fsops
from .errors import CheckpointWriteError
from .faults import fault_point
from .format.hashing import new_hasher
from .format.layout import MANIFEST_FILE, SET_ASIDE_DIR, TMP_PREFIX, TRASH_PREFIX
from .format.manifest import FileEntry, Manifest

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview


def _write_error(what: str, e: OSError) -> CheckpointWriteError:
    if e.errno == errno.ENOSPC:
        hint = "the disk is full; free space or point guardian at another directory"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "the directory is not writable; fix its permissions or choose another one"
    elif e.errno == errno.ENOENT:
        hint = "the run directory was removed while training; recreate it or point guardian elsewhere"
    else:
        hint = "check the disk and the file system"
    return CheckpointWriteError(
        f"could not write checkpoint {what}: {e.strerror or e} — {hint}. Earlier checkpoints are untouched.",
        e.errno,
    )


class CheckpointTxn:
    """One checkpoint being written. Use as a context manager; call ``commit`` last.

    Leaving the ``with`` block without a commit removes the temp directory, so a
    failed save (ENOSPC, EIO, an exception while serializing) leaves nothing behind.
    """

    def __init__(self, run_dir: str, name: str, *, tmp_name: str | None = None, owner: bool = True) -> None:
        """``tmp_name`` fixes the temp directory's name, so the ranks of a distributed
        save can all write into it; only its ``owner`` (rank 0) creates, commits or
        removes it — a participant only adds files."""
        self.run_dir = run_dir
        self.name = name
        tmp_name = tmp_name or f"{TMP_PREFIX}{name}-{os.getpid()}-{secrets.token_hex(4)}"
        self.tmp_dir = os.path.join(run_dir, tmp_name)
        self.owner = owner
        self.files: dict[str, FileEntry] = {}
        self._subdirs: list[str] = []
        self._committed = False

    def __enter__(self) -> CheckpointTxn:
        if self.owner:
            self.create()
        return self

    def create(self) -> None:
        try:
            fsops.fs.mkdir(self.tmp_dir)
        except OSError as e:
            raise _write_error(f"{self.name} (creating {self.tmp_dir})", e) from e
        fault_point("save.tmpdir_created")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self.owner and not self._committed:
            self.abort()

    def abort(self) -> None:
        try:
            fsops.fs.rmtree(self.tmp_dir)
        except FileNotFoundError:
            pass
        except OSError as e:  # leftover temp dirs are harmless; the next writer removes them
            log.warning("could not remove %s after a failed save: %s", self.tmp_dir, e)

    def _ensure_parent(self, rel: str) -> None:
        parts = rel.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            parent = "/".join(parts[:depth])
            if parent not in self._subdirs:
                fsops.fs.mkdir(os.path.join(self.tmp_dir, parent))
                self._subdirs.append(parent)

    def add_file(self, rel: str, chunks: Iterable[Buffer], *, writer: Callable | None = None) -> FileEntry:
        """Write, hash and fsync one file. ``writer(fd, chunks, hasher)`` may replace
        the plain write loop (the O_DIRECT path uses it); it must hash every byte."""
        try:
            self._ensure_parent(rel)
            fd = fsops.fs.create(os.path.join(self.tmp_dir, rel))
            try:
                hasher = new_hasher()
                size = (writer or _plain_write)(fd, chunks, hasher)
                fault_point("save.file_written")
                fsops.fs.fsync(fd)
                fault_point("save.file_fsynced")
            finally:
                fsops.fs.close(fd)
        except OSError as e:
            raise _write_error(f"{self.name}/{rel}", e) from e
        entry = FileEntry(bytes=size, hash=hasher.hexdigest())
        self.files[rel] = entry
        return entry

    def fsync_subdirs(self) -> None:
        """A participant makes its own directory entries durable (the owner's commit
        fsyncs only the directories it created)."""
        try:
            for sub in reversed(self._subdirs):
                fsops.fs.fsync_dir(os.path.join(self.tmp_dir, sub))
        except OSError as e:
            raise _write_error(f"{self.name} (fsync of {self._subdirs})", e) from e

    def link_file(self, rel: str, src: str, entry: FileEntry) -> FileEntry:
        """Make ``rel`` a hard link to ``src``, a file of a committed checkpoint that
        ``entry`` describes (incremental saves): no byte is copied. The link count is
        the reference count, so deleting or setting aside either checkpoint leaves
        the other whole. Raises ``OSError`` as ``link`` does (EXDEV, EPERM on file
        systems without hard links): the caller decides to copy instead."""
        self._ensure_parent(rel)
        dst = os.path.join(self.tmp_dir, rel)
        fsops.fs.link(src, dst)
        st, st_src = os.lstat(dst), os.lstat(src)
        if (st.st_ino, st.st_dev) != (st_src.st_ino, st_src.st_dev) or st.st_size != entry.bytes:
            raise CheckpointWriteError(
                f"{src} changed while {self.name} was linking it (size {st.st_size}, manifest says "
                f"{entry.bytes}); this save is abandoned, earlier checkpoints are untouched."
            )
        fault_point("incremental.linked")
        self.files[rel] = entry
        return entry

    def adopt(self, rel: str, entry: FileEntry) -> None:
        """Record a file another rank wrote (and fsynced) into this temp directory."""
        self.files[rel] = entry

    def commit(self, manifest: Manifest) -> str:
        """Write the manifest, make everything durable and publish the checkpoint."""
        if manifest.shared is not None:  # incremental: the unchanged tensors' file
            manifest.shared.apply(self)
        manifest.files = dict(self.files)
        final = os.path.join(self.run_dir, self.name)
        try:
            fault_point("save.before_manifest")
            fd = fsops.fs.create(os.path.join(self.tmp_dir, MANIFEST_FILE))
            try:
                fsops.fs.write(fd, manifest.to_bytes())
                fault_point("save.manifest_written")
                fsops.fs.fsync(fd)
                fault_point("save.manifest_fsynced")
            finally:
                fsops.fs.close(fd)
            for sub in reversed(self._subdirs):  # deepest first: each entry before its parent
                fsops.fs.fsync_dir(os.path.join(self.tmp_dir, sub))
            fsops.fs.fsync_dir(self.tmp_dir)
            fault_point("save.tmpdir_fsynced")
            fsops.fs.rename(self.tmp_dir, final)
            self._committed = True
            fault_point("save.renamed")
            fsops.fs.fsync_dir(self.run_dir)
            fault_point("save.parent_fsynced")
        except OSError as e:
            if self._committed:
                # The rename happened but may not be durable: a power cut could still
                # undo it. Report the failure; the checkpoint is usable but not promised.
                raise _write_error(f"{self.name} (fsync of {self.run_dir} after rename)", e) from e
            raise _write_error(self.name, e) from e
        return final


def _plain_write(fd: int, chunks: Iterable[Buffer], hasher) -> int:
    size = 0
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        hasher.update(view)
        fsops.fs.write(fd, view)
        size += len(view)
    return size


def delete_checkpoint(run_dir: str, name: str) -> None:
    """Remove a committed checkpoint so that no crash can leave half of it visible."""
    trash = os.path.join(run_dir, f"{TRASH_PREFIX}{name}-{secrets.token_hex(4)}")
    fsops.fs.rename(os.path.join(run_dir, name), trash)
    fault_point("retention.renamed")
    fsops.fs.fsync_dir(run_dir)
    fsops.fs.rmtree(trash)
    fault_point("retention.deleted")


MAX_ASIDE_ALTERNATIVES = 100


def _aside_root(run_dir: str) -> str:
    """RUN/set-aside, created if absent — but never through a symlink and never on
    top of a file: when that name is taken by something else, the first free or
    real-directory ``set-aside.N`` is used instead (readers ignore both)."""
    for n in range(MAX_ASIDE_ALTERNATIVES):
        candidate = os.path.join(run_dir, SET_ASIDE_DIR if n == 0 else f"{SET_ASIDE_DIR}.{n}")
        try:
            mode = os.lstat(candidate).st_mode
        except FileNotFoundError:
            fsops.fs.mkdir(candidate)
            fsops.fs.fsync_dir(run_dir)
            return candidate
        if stat.S_ISDIR(mode):
            return candidate
        if n == 0:
            log.warning(
                "%s is not a directory (a symlink or a file?); setting checkpoints aside elsewhere", candidate
            )
    raise CheckpointWriteError(
        f"cannot set a checkpoint aside in {run_dir}: '{SET_ASIDE_DIR}' and its alternatives are taken "
        "by files or links; remove them"
    )


def set_aside(run_dir: str, name: str, why: str) -> str:
    """Move a checkpoint to RUN/set-aside/ (never deleted) and say so."""
    aside_root = _aside_root(run_dir)
    dest = os.path.join(aside_root, f"{name}.{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(2)}")
    fsops.fs.rename(os.path.join(run_dir, name), dest)
    fsops.fs.fsync_dir(aside_root)
    fsops.fs.fsync_dir(run_dir)
    log.warning("set aside %s → %s (%s)", name, dest, why)
    return dest


def clean_stale(run_dir: str) -> list[str]:
    """Remove temp and trash entries left by crashed writers. Call only while holding
    the run lock: otherwise another live writer's temp dir could be removed.

    A directory is removed with its contents; anything else under those names (a
    symlink, a file) is unlinked itself — never followed. One that cannot be removed
    is logged and left: a leftover temp entry costs disk space, never data."""
    removed = []
    for entry in os.listdir(run_dir):
        if not entry.startswith((TMP_PREFIX, TRASH_PREFIX)):
            continue
        path = os.path.join(run_dir, entry)
        try:
            if stat.S_ISDIR(os.lstat(path).st_mode):
                fsops.fs.rmtree(path)
            else:
                fsops.fs.unlink(path)
        except FileNotFoundError:
            continue
        except (OSError, RecursionError) as e:
            log.warning("could not remove the leftover %s: %s", path, e)
            continue
        removed.append(entry)
    return removed


def check_free_space(run_dir: str, needed: int) -> None:
    """Fail before writing a byte when the save cannot fit.

    Some file systems (FUSE, network) report zero total blocks: that means
    "unknown", not "full", and the check is skipped.
    """
    try:
        st = os.statvfs(run_dir)
    except OSError:
        return
    if st.f_blocks == 0:
        return
    free = st.f_bavail * st.f_frsize
    if free < needed:
        raise CheckpointWriteError(
            f"not enough space in {run_dir} for the next checkpoint: {needed / 1e6:.1f} MB needed, "
            f"{free / 1e6:.1f} MB free. Free space or point guardian at another directory; "
            "earlier checkpoints are untouched.",
            errno.ENOSPC,
        )
