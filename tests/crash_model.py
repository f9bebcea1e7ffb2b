"""A model of what a power cut can leave on disk, for ALICE/CrashMonkey-style enumeration.

``RecordingFS`` is a ``guardian.fsops.FS`` that performs every operation for real and
also logs it (paths relative to a root directory). ``CrashModel`` replays a prefix of
that log over the durable starting state of the root and enumerates every on-disk state
a power cut right after that prefix could leave, under the rules of
/work/shared/design/testing.md:

* file contents and sizes not fsynced may be lost, or survive only up to some earlier
  size, or survive with the right size but zeroed data (ext4 ``data=writeback``);
* directory entries (create, mkdir, rename, link, unlink) made since the parent directory
  was last fsynced may each independently be applied or not (a rename within one
  directory is atomic: old name or new name; across directories its two halves are
  independent, which is more permissive than any real file system).

States are produced as plain ``{relpath: bytes | None}`` trees (``None`` = directory),
deduplicated by content, and written to disk only when new.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field

from guardian import fsops

Op = tuple


class RecordingFS(fsops.FS):
    """Performs each operation on the real file system and logs it."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.ops: list[Op] = []
        self._fd_path: dict[int, str] = {}

    def _rel(self, path: str) -> str:
        rel = os.path.relpath(os.path.abspath(path), self.root)
        assert not rel.startswith(".."), f"guardian touched {path} outside the run directory"
        return rel

    def mark(self, label: str) -> None:
        """A point where the library returned to its caller (an acknowledgement)."""
        self.ops.append(("mark", label))

    def mkdir(self, path: str) -> None:
        super().mkdir(path)
        self.ops.append(("mkdir", self._rel(path)))

    def create(self, path: str) -> int:
        fd = super().create(path)
        self._fd_path[fd] = self._rel(path)
        self.ops.append(("create", self._rel(path)))
        return fd

    def write(self, fd: int, data: bytes | memoryview) -> None:
        super().write(fd, data)
        self.ops.append(("write", self._fd_path[fd], bytes(memoryview(data).cast("B"))))

    def fsync(self, fd: int) -> None:
        super().fsync(fd)
        self.ops.append(("fsync", self._fd_path[fd]))

    def close(self, fd: int) -> None:
        path = self._fd_path.pop(fd)
        super().close(fd)
        self.ops.append(("close", path))

    def fsync_dir(self, path: str) -> None:
        super().fsync_dir(path)
        self.ops.append(("fsync_dir", self._rel(path)))

    def rename(self, src: str, dst: str) -> None:
        super().rename(src, dst)
        self.ops.append(("rename", self._rel(src), self._rel(dst)))

    def link(self, src: str, dst: str) -> None:
        super().link(src, dst)
        self.ops.append(("link", self._rel(src), self._rel(dst)))

    def rmtree(self, path: str) -> None:
        # shutil.rmtree unlinks bottom-up; log the individual unlinks/rmdirs it makes.
        steps: list[Op] = []
        for root, dirs, files in os.walk(path, topdown=False):
            steps.extend(("unlink", self._rel(os.path.join(root, f))) for f in sorted(files))
            steps.extend(("rmdir", self._rel(os.path.join(root, d))) for d in sorted(dirs))
        steps.append(("rmdir", self._rel(path)))
        super().rmtree(path)
        self.ops.extend(steps)


@dataclass
class _File:
    live: bytearray
    durable: bytes
    cuts: set[int] = field(default_factory=set)  # sizes after each write (natural truncation points)


@dataclass
class _Dir:
    live: dict[str, int]
    durable: dict[str, int]
    pending: list[Op] = field(default_factory=list)  # namespace ops since the last fsync


class CrashModel:
    """Live and durable state of a directory tree, driven by a ``RecordingFS`` log."""

    def __init__(self, root: str) -> None:
        self.inodes: dict[int, _File | _Dir] = {}
        self.root_id = self._load(root)

    def _new(self, node: _File | _Dir) -> int:
        ino = len(self.inodes)
        self.inodes[ino] = node
        return ino

    def _load(self, path: str) -> int:
        """Everything already on disk before the drill is taken as durable."""
        if os.path.isdir(path):
            entries = {name: self._load(os.path.join(path, name)) for name in sorted(os.listdir(path))}
            return self._new(_Dir(live=dict(entries), durable=dict(entries)))
        with open(path, "rb") as f:
            data = f.read()
        return self._new(_File(live=bytearray(data), durable=data))

    # ------------------------------------------------------------------ replay

    def _lookup(self, rel: str) -> int:
        ino = self.root_id
        for part in [p for p in rel.split("/") if p and p != "."]:
            node = self.inodes[ino]
            assert isinstance(node, _Dir)
            ino = node.live[part]
        return ino

    def _parent(self, rel: str) -> tuple[_Dir, str]:
        head, name = os.path.split(rel)
        parent = self.inodes[self._lookup(head)]
        assert isinstance(parent, _Dir)
        return parent, name

    def apply(self, op: Op) -> None:
        kind = op[0]
        if kind == "mark":
            return
        if kind in ("mkdir", "create"):
            parent, name = self._parent(op[1])
            node = _Dir({}, {}) if kind == "mkdir" else _File(bytearray(), b"", {0})
            ino = self._new(node)
            parent.live[name] = ino
            parent.pending.append(("link", name, ino))
        elif kind == "link":  # a second name for an existing inode (incremental saves)
            ino = self._lookup(op[1])
            parent, name = self._parent(op[2])
            parent.live[name] = ino
            parent.pending.append(("link", name, ino))
        elif kind == "write":
            f = self.inodes[self._lookup(op[1])]
            assert isinstance(f, _File)
            f.live += op[2]
            f.cuts.add(len(f.live))
        elif kind == "fsync":
            f = self.inodes[self._lookup(op[1])]
            assert isinstance(f, _File)
            f.durable = bytes(f.live)
        elif kind == "fsync_dir":
            d = self.inodes[self._lookup(op[1])]
            assert isinstance(d, _Dir)
            d.durable, d.pending = dict(d.live), []
        elif kind == "rename":
            sp, sname = self._parent(op[1])
            dp, dname = self._parent(op[2])
            ino = sp.live.pop(sname)
            dp.live[dname] = ino
            if sp is dp:
                sp.pending.append(("rename", sname, dname, ino))
            else:
                sp.pending.append(("unlink", sname, ino))
                dp.pending.append(("link", dname, ino))
        elif kind in ("unlink", "rmdir"):
            parent, name = self._parent(op[1])
            ino = parent.live.pop(name)
            parent.pending.append(("unlink", name, ino))
        elif kind == "close":
            pass
        else:  # pragma: no cover
            raise AssertionError(f"unknown op {op!r}")

    # --------------------------------------------------------------- crash states

    def crash_trees(self) -> Iterator[dict[str, bytes | None]]:
        """Every tree a power cut now could leave (may repeat; callers dedupe)."""
        dirs = [(ino, d) for ino, d in self.inodes.items() if isinstance(d, _Dir)]
        choices = []
        for _ino, d in dirs:
            n = len(d.pending)
            assert n <= 12, f"{n} pending namespace ops in one directory: enumeration too large"
            choices.append(list(itertools.product((False, True), repeat=n)))
        for masks in itertools.product(*choices):
            entries = {}
            for (ino, d), mask in zip(dirs, masks, strict=True):
                entries[ino] = _apply_pending(
                    d.durable, [op for op, on in zip(d.pending, mask, strict=True) if on]
                )
            yield from self._contents(entries)

    def _contents(self, entries: dict[int, dict[str, int]]) -> Iterator[dict[str, bytes | None]]:
        files: list[tuple[str, int]] = []
        tree_dirs: list[str] = []
        stack = [("", self.root_id, 0)]
        while stack:
            rel, ino, depth = stack.pop()
            assert depth < 20, "directory cycle in a crash state"
            node = self.inodes[ino]
            if isinstance(node, _Dir):
                tree_dirs.append(rel)
                for name, child in entries[ino].items():
                    stack.append((f"{rel}/{name}" if rel else name, child, depth + 1))
            else:
                files.append((rel, ino))
        options = [self._file_versions(self.inodes[ino]) for _rel, ino in files]  # type: ignore[arg-type]
        for combo in itertools.product(*options):
            tree: dict[str, bytes | None] = dict.fromkeys(tree_dirs)
            tree.update({rel: data for (rel, _), data in zip(files, combo, strict=True)})
            yield tree

    @staticmethod
    def _file_versions(f: _File) -> list[bytes]:
        live = bytes(f.live)
        if live == f.durable:
            return [live]
        assert live.startswith(f.durable), "guardian only appends to files it writes"
        base = len(f.durable)
        sizes = {base, base + 1, len(live) - 1, (base + len(live)) // 2, len(live)}
        sizes |= {c for c in f.cuts if c >= base}
        out = [live[:s] for s in sorted(sizes) if base <= s <= len(live)]
        out.append(live[:base] + bytes(len(live) - base))  # size made it, data did not
        return out


def _apply_pending(durable: dict[str, int], ops: list[Op]) -> dict[str, int]:
    out = dict(durable)
    for op in ops:
        if op[0] == "link":
            out[op[1]] = op[2]
        elif op[0] == "unlink":
            if out.get(op[1]) == op[2]:
                del out[op[1]]
        elif op[0] == "rename":
            _, src, dst, ino = op
            if out.get(src) == ino:
                del out[src]
            out[dst] = ino
    return out


def tree_digest(tree: dict[str, bytes | None]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for rel in sorted(tree):
        data = tree[rel]
        h.update(rel.encode() + b"\0" + (b"D" if data is None else b"F" + hashlib.sha1(data).digest()))
    return h.hexdigest()


def materialize(tree: dict[str, bytes | None], dest: str) -> None:
    """Write a crash state to ``dest`` (replacing whatever was there)."""
    if os.path.exists(dest):
        shutil.rmtree(dest)
    os.makedirs(dest)
    for rel in sorted(tree, key=lambda r: r.count("/")):
        if not rel:
            continue
        data = tree[rel]
        full = os.path.join(dest, rel)
        if data is None:
            os.makedirs(full, exist_ok=True)
        else:
            with open(full, "wb") as f:
                f.write(data)
