"""Incremental checkpoints: tensors that did not change are not written again.

A save splits its tensors in two files. ``tensors.safetensors`` holds what changed
since the last committed save of this process; ``shared.safetensors`` holds the rest
(a frozen backbone, LoRA base weights, constant buffers). When the set of unchanged
tensors is the one already stored in the previous checkpoint's shared file, the new
checkpoint *hard-links* that file inside its transaction, before the commit rename:
no byte is copied or written, and the file system's link count is the reference
count. Retention (rename + rmtree), set-aside (rename) and ``guardian verify`` (hash
every listed file) therefore never break a reference, by construction.

Deciding "unchanged" must never be wrong: a tensor counts as unchanged only when it
is still the same memory (data pointer, shape, strides, dtype, device — and we keep a
reference to the previous one, so its memory cannot be freed and reused by another
tensor meanwhile), its autograd version counter has not moved (every in-place torch
op bumps it, including an optimizer's step under ``no_grad``), and a sample of its
bytes is equal. The sample is the net for writes the counter does not see
(``p.data.mul_()``, numpy views): any edit of the whole tensor (an EMA update, a
rescale) changes it. An edit of a few bytes through ``.data`` that misses every
sampled block would go unseen: code that does that must not use incremental saves.

The first save of a process is a full one (nothing is known yet), the second writes a
fresh shared file (an asynchronous writer copies those bytes from the previous
checkpoint's files, hash-checked, instead of from memory during the stall), later ones
link it; when the unchanged set shrinks, or grows by more than a quarter, a new shared
file is written. A shared file is refreshed (copied from the previous one,
hash-checked) every ``full_every`` saves if asked, so a media error in one copy
reaches only the checkpoints of that generation. Hard links refused by the
file system (some FUSE mounts) fall back to that copy, with one log line.
Multi-process saves and DTensor state do not use this (they always write in full).
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from .commit import CheckpointTxn
from .errors import CheckpointWriteError
from .format import safetensors_io
from .format.hashing import new_hasher
from .format.layout import FORMAT_ID, SHARED_FILE, TENSORS_FILE
from .format.manifest import FileEntry, Manifest
from .state import tensors as T
from .state.snapshot import Snapshot, tensor_chunks

log = logging.getLogger(__name__)

SAMPLE_BLOCKS, SAMPLE_BLOCK = 4, 1024  # bytes compared per tensor on top of the version counter:
SAMPLE_POINTS = (
    SAMPLE_BLOCKS * SAMPLE_BLOCK
)  # few blocks, evenly spread: on cold memory each costs a page walk and misses
# Smaller tensors are always rewritten: they cost nothing, and one that changes now and
# then (the RNG state kept at an epoch's start) would otherwise force a new shared file.
MIN_SHARED_TENSOR = 8 << 10
MIN_SHARED_FRACTION = 0.25  # a shared file for less than this share of the bytes is not worth a file
COPY_CHUNK = 8 << 20
LINK_REFUSED = {errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS}
_no_links: set[str] = set()  # run directories whose file system refused a hard link: copy there


@dataclass(frozen=True)
class _Print:
    """What a tensor was at a committed save (``tensor`` pins its memory)."""

    tensor: torch.Tensor
    version: int
    sample: bytes
    where: tuple  # what makes it the same memory: see ``_where``
    probe: np.ndarray | None = None  # host tensors: the sampled blocks, a view of that memory
    nbytes: int = 0


@dataclass(frozen=True)
class _SharedFile:
    """The shared file of the newest committed checkpoint."""

    ckpt_dir: str
    keys: tuple[str, ...]
    entry: FileEntry
    generation: int  # saves since this content was last written or copied
    inode: tuple[int, int] = (0, 0)  # (st_dev, st_ino) when committed


@dataclass
class SharedPlan:
    """How the pending checkpoint gets its shared file, carried by its manifest into
    ``CheckpointTxn.commit`` (so any writer, sync or async, applies it before the
    manifest is written)."""

    keys: tuple[str, ...]
    link_from: _SharedFile | None = None  # link (or copy) this file
    fresh: dict[str, torch.Tensor] = field(default_factory=dict)  # or write these tensors
    copy: bool = False  # copy link_from instead of linking (a refresh)
    # or copy their bytes out of the previous checkpoint's files (relative path → entry)
    extract_from: tuple[str, dict[str, FileEntry]] | None = None

    def apply(self, txn: CheckpointTxn) -> FileEntry:
        if self.extract_from is not None:
            return _extract(txn, *self.extract_from, set(self.keys))
        if self.link_from is None:
            specs = [(k, T.st_dtype(t), tuple(t.shape)) for k, t in self.fresh.items()]
            layout = safetensors_io.plan_layout(specs, metadata={"format": FORMAT_ID})
            snap = Snapshot(tensors=self.fresh)
            return txn.add_file(SHARED_FILE, tensor_chunks(snap, layout))
        src = os.path.join(self.link_from.ckpt_dir, SHARED_FILE)
        if not self.copy and txn.run_dir not in _no_links:
            try:
                return txn.link_file(SHARED_FILE, src, self.link_from.entry)
            except OSError as e:
                if e.errno not in LINK_REFUSED:
                    raise _source_error(src, e) from e
                _no_links.add(txn.run_dir)
                log.warning(
                    "hard links refused in %s (%s); unchanged tensors are copied there instead",
                    txn.run_dir,
                    e.strerror,
                )
        return _copy_checked(txn, src, self.link_from.entry)


def _source_error(src: str, e: OSError) -> CheckpointWriteError:
    return CheckpointWriteError(
        f"could not refer to the unchanged tensors in {src}: {e.strerror or e}. The next save "
        "writes every tensor; earlier checkpoints are untouched.",
        e.errno,
    )


def _extract(txn: CheckpointTxn, ckpt_dir: str, files: dict[str, FileEntry], keys: set[str]) -> FileEntry:
    """Write a new shared file from the previous checkpoint's tensor files: the bytes
    of ``keys`` there are their bytes now (they did not change), so an asynchronous
    save needs no copy of them in memory. Every source file is hashed whole as it
    streams by and must match its manifest, or the save fails (corrupt bytes are
    never carried into a new checkpoint)."""
    sources = []
    for rel in (TENSORS_FILE, SHARED_FILE):
        if rel in files:
            layout = safetensors_io.read_layout(os.path.join(ckpt_dir, rel))
            wanted = sorted((e for e in layout.entries if e.key in keys), key=lambda e: e.begin)
            sources.append((rel, files[rel], layout.data_start, wanted))
    specs = [(e.key, e.dtype, e.shape) for *_, wanted in sources for e in wanted]
    if {k for k, _, _ in specs} != keys:
        raise CheckpointWriteError(
            f"{ckpt_dir} does not hold every unchanged tensor; the next save writes all"
        )
    header = safetensors_io.plan_layout(specs, metadata={"format": FORMAT_ID}).header

    def chunks():
        yield header
        for rel, entry, start, wanted in sources:
            yield from _ranges_checked(
                os.path.join(ckpt_dir, rel), entry, [(start + e.begin, start + e.end) for e in wanted]
            )

    try:
        return txn.add_file(SHARED_FILE, chunks())
    except CheckpointWriteError:
        raise
    except OSError as e:
        raise _source_error(ckpt_dir, e) from e


def _ranges_checked(path: str, expected: FileEntry, ranges: list[tuple[int, int]]):
    """Yield the bytes of sorted ``ranges`` of ``path`` while hashing all of it."""
    hasher = new_hasher()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        pos, i = 0, 0
        while chunk := os.read(fd, COPY_CHUNK):
            hasher.update(chunk)
            end = pos + len(chunk)
            while i < len(ranges) and ranges[i][0] < end:
                lo, hi = max(ranges[i][0], pos), min(ranges[i][1], end)
                if lo < hi:
                    yield memoryview(chunk)[lo - pos : hi - pos]
                if ranges[i][1] > end:
                    break
                i += 1
            pos = end
    finally:
        os.close(fd)
    if pos != expected.bytes or hasher.hexdigest() != expected.hash:
        raise CheckpointWriteError(
            f"{path} no longer matches its manifest (corrupted on disk): this save cannot reuse it. "
            "The next save writes every tensor; run `guardian verify` on the run directory."
        )


def _copy_checked(txn: CheckpointTxn, src: str, expected: FileEntry) -> FileEntry:
    """Copy a shared file into the pending checkpoint; its hash must be the one its
    manifest recorded, or the copy would launder corrupt bytes into a new checkpoint."""

    def chunks():
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            while chunk := os.read(fd, COPY_CHUNK):
                yield chunk
        finally:
            os.close(fd)

    try:
        entry = txn.add_file(SHARED_FILE, chunks())
    except CheckpointWriteError:
        raise
    except OSError as e:
        raise _source_error(src, e) from e
    if entry != expected:
        raise CheckpointWriteError(
            f"{src} no longer matches its manifest (corrupted on disk): this save cannot reuse it. "
            "The next save writes every tensor; run `guardian verify` on the run directory."
        )
    return entry


class IncrementalSaves:
    """Per-process memory of the last committed save; plans each save's split."""

    def __init__(self, full_every: int = 0) -> None:
        self.full_every = full_every  # 0: link for as long as the tensors stay unchanged
        self._prints: dict[str, _Print] = {}  # as of the newest committed save
        self._shared: _SharedFile | None = None
        self._pending: tuple[dict[str, _Print], SharedPlan | None] | None = None
        self._last: tuple[str, dict[str, FileEntry]] | None = None  # newest committed: path, files

    def plan(self, snap: Snapshot, *, copy_fresh: bool) -> tuple[Snapshot, SharedPlan | None]:
        """The snapshot to hand to the writer (only the changed tensors) and the plan
        for the rest, which the caller puts on the manifest (``Manifest.shared``).
        Call it once the previous save's outcome is known. ``copy_fresh``: tensors of
        a new shared file are cloned now, for a writer that returns before writing
        (the live tensors may change as soon as ``submit`` returns)."""
        if self._pending is not None:  # the previous save never committed
            self.failed()
        # small tensors are always rewritten, so they need no print (half the tensors
        # of a model are biases: this halves the check that runs inside the stall)
        big = {k: t for k, t in snap.tensors.items() if _nbytes(t) >= MIN_SHARED_TENSOR}
        prints = {k: self._print(k, t) for k, t in big.items()}
        unchanged = [k for k, p in prints.items() if p is not None and self._prints.get(k) is p]
        prints_now = {k: p or _take_print(big[k]) for k, p in prints.items()}
        plan = self._choose(snap, unchanged)
        self._pending = (prints_now, plan)
        if plan is None:
            return snap, None
        kept = set(plan.keys)
        if plan.link_from is None and copy_fresh and self._last is not None:
            plan.extract_from = self._last  # no copy in the stall: the bytes are on disk already
        elif plan.link_from is None:
            plan.fresh = {
                k: (snap.tensors[k].detach().to("cpu", copy=True) if copy_fresh else snap.tensors[k])
                for k in plan.keys
            }
        changed = Snapshot(components=snap.components)
        changed.tensors = {k: t for k, t in snap.tensors.items() if k not in kept}
        return changed, plan

    def _print(self, key: str, t: torch.Tensor) -> _Print | None:
        """The previous print when ``t`` is provably unchanged since it was taken."""
        old = self._prints.get(key)
        if old is None or t._version != old.version or _where(t) != old.where:
            return None
        if old.probe is not None:  # a host tensor, eligible then; the same memory and layout now
            return old if old.probe.tobytes() == old.sample else None
        return old if _eligible(t) and _sample(t) == old.sample else None

    def _choose(self, snap: Snapshot, unchanged: list[str]) -> SharedPlan | None:
        total = snap.tensor_bytes
        unchanged_set = set(unchanged)
        base = self._shared
        size = sum(_nbytes(snap.tensors[k]) for k in unchanged)
        if base is not None and set(base.keys) <= unchanged_set and _still_there(base):
            shared = sum(_nbytes(snap.tensors[k]) for k in base.keys)
            if size - shared <= MIN_SHARED_FRACTION * shared:  # else more froze since: a new file
                refresh = bool(self.full_every) and base.generation + 1 >= self.full_every
                return SharedPlan(keys=base.keys, link_from=base, copy=refresh)
        if not unchanged or size < MIN_SHARED_FRACTION * total:
            return None
        return SharedPlan(keys=tuple(unchanged))

    def committed(self, path: str, manifest: Manifest) -> None:
        """The pending save is durable: it is now what the next one compares with."""
        if self._pending is None:
            return
        prints, plan = self._pending
        self._pending = None
        self._prints = prints
        self._last = (path, dict(manifest.files))
        entry = manifest.files.get(SHARED_FILE)
        if plan is None or entry is None:
            self._shared = None
            return
        linked = plan.link_from is not None and not plan.copy
        generation = plan.link_from.generation + 1 if linked and plan.link_from else 0
        try:
            st = os.lstat(os.path.join(path, SHARED_FILE))
        except OSError:
            self._shared = None
            return
        self._shared = _SharedFile(path, plan.keys, entry, generation, (st.st_dev, st.st_ino))

    def failed(self) -> None:
        """A save failed: compare with the last committed one again; a broken shared
        file is never offered twice."""
        self._pending = None
        self._shared = None
        self._last = None


def _still_there(base: _SharedFile) -> bool:
    """The previous shared file is still the file that was committed, at its size
    (retention or a user may have removed it since). A committed manifest is never
    rewritten; the link itself checks the inode again, and a copy checks the hash."""
    try:
        st = os.lstat(os.path.join(base.ckpt_dir, SHARED_FILE))
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == base.inode and st.st_size == base.entry.bytes


def _eligible(t: torch.Tensor) -> bool:
    return (
        type(t) is torch.Tensor
        and t.layout == torch.strided
        and t.is_contiguous()
        and t.numel() > 0
        and not (t.is_conj() or t.is_neg())
    )


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _take_print(t: torch.Tensor) -> _Print:
    nbytes = _nbytes(t)
    if not _eligible(t):
        return _Print(tensor=t.detach(), version=t._version, sample=b"", where=_where(t), nbytes=nbytes)
    probe = _probe(t) if t.device.type == "cpu" else None
    sample = probe.tobytes() if probe is not None else _sample(t)
    return _Print(t.detach(), t._version, sample, _where(t), probe, nbytes)


def _where(t: torch.Tensor) -> tuple:
    return (type(t), t.data_ptr(), t.dtype, t.shape, t.stride(), t.device, t.is_conj(), t.is_neg())


def _sample(t: torch.Tensor) -> bytes:
    """Up to ``SAMPLE_POINTS`` bytes in blocks spread evenly over the tensor, copied."""
    if t.device.type == "cpu":
        return _probe(t).tobytes()
    flat = t.detach().reshape(-1).view(torch.uint8)
    n = flat.numel()
    picked = flat if n <= SAMPLE_POINTS else flat.as_strided((SAMPLE_BLOCKS, SAMPLE_BLOCK), (_stride(n), 1))
    return picked.cpu().numpy().tobytes()


def _probe(t: torch.Tensor) -> np.ndarray:
    """A numpy view of the sampled blocks of a host tensor (no copy). numpy, not torch:
    torch ops go through the intra-op thread pool, which on a loaded machine costs
    more than the copy the check saves."""
    data = t.detach().reshape(-1).view(torch.uint8).numpy()
    n = data.size
    if n <= SAMPLE_POINTS:
        return data
    return np.lib.stride_tricks.as_strided(
        data, (SAMPLE_BLOCKS, SAMPLE_BLOCK), (_stride(n), 1), writeable=False
    )


def _stride(n: int) -> int:
    """Distance between sampled blocks: the first at 0, the last ending at ``n``."""
    return (n - SAMPLE_BLOCK) // (SAMPLE_BLOCKS - 1)
