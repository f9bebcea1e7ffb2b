"""The manifest: the commit marker and table of contents of one checkpoint.

Only the serialized JSON form is the compatibility contract (not this class). A
directory is a checkpoint exactly when ``manifest.json`` exists, parses, carries our
format id and a version we understand, and lists files that are all present with the
listed sizes (and, when verifying, the listed hashes). The manifest is written last,
so its presence proves every file it names was fsynced before it.

Format history:
  1  tensors in safetensors, state in JSON, xxh3-128 per file; the manifest carries
     ``manifest_hash``, an xxh3-128 of its own canonical JSON without that field,
     so a bit flip in step/seq/metrics cannot make a checkpoint resume at the
     wrong place.
  2  incremental saves: a checkpoint may also hold ``shared.safetensors`` (tensors
     unchanged since an earlier checkpoint, usually a hard link to that one's file);
     the tensors of a checkpoint are those of both files. Written only by a
     checkpoint that has the file, so older readers still read every other one.
"""

from __future__ import annotations

import math
import os
import posixpath
import re
import time
from dataclasses import dataclass, field
from typing import Any

from .._version import __version__
from ..errors import CorruptCheckpointError, FormatVersionError, UnsafeCheckpointError
from . import safeio, strictjson
from .hashing import hash_bytes
from .layout import FORMAT_ID, FORMAT_VERSION, HASH_ALGORITHM, MANIFEST_FILE, SHARED_FILE

MAX_MANIFEST_BYTES = 64 * 1024 * 1024
# The budget of one manifest: a fixed allowance for metrics, reasons and extras, plus
# room for each entry the checkpoint directory holds (a multi-rank checkpoint lists
# two files per ``rank-NNNNN/`` entry, ~300 bytes). Checked before the file is read.
MANIFEST_BASE_BUDGET = 1 << 20
MANIFEST_BUDGET_PER_ENTRY = 4096
MAX_WORLD_SIZE = 1 << 20
MAX_COUNTER = 2**63 - 1
_HASH_RE = re.compile(r"^[0-9a-f]{32}$")
INCREMENTAL_VERSION = 2  # the format version of a checkpoint with a shared tensor file
READ_VERSION = INCREMENTAL_VERSION  # the newest version this guardian reads


@dataclass(frozen=True)
class FileEntry:
    bytes: int
    hash: str


@dataclass
class Manifest:
    name: str
    step: int
    epoch: int
    seq: int
    files: dict[str, FileEntry]
    reason: list[str] = field(default_factory=list)
    metrics: dict[str, float | None] = field(default_factory=dict)
    components: dict[str, dict[str, Any]] = field(default_factory=dict)
    world_size: int = 1
    batch_in_epoch: int = 0
    created_unix: float = field(default_factory=time.time)
    guardian_version: str = __version__
    extra: dict[str, Any] = field(default_factory=dict)
    # Not serialized: how the pending save gets its shared tensor file
    # (incremental.SharedPlan), applied by ``CheckpointTxn.commit``.
    shared: Any = field(default=None, repr=False, compare=False)

    @property
    def version(self) -> int:
        """1, or 2 for a checkpoint holding a shared tensor file (older guardians then
        refuse it clearly instead of missing half of its tensors)."""
        return INCREMENTAL_VERSION if any(_is_shared(r) for r in self.files) else FORMAT_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_ID,
            "version": self.version,
            "guardian_version": self.guardian_version,
            "name": self.name,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "seq": self.seq,
            "reason": list(self.reason),
            "metrics": {k: _json_metric(v) for k, v in self.metrics.items()},
            "world_size": self.world_size,
            "created_unix": self.created_unix,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created_unix)),
            "hash_algorithm": HASH_ALGORITHM,
            "files": {k: {"bytes": v.bytes, "hash": v.hash} for k, v in sorted(self.files.items())},
            "components": self.components,
            "extra": self.extra,
        }

    def to_bytes(self) -> bytes:
        obj = self.to_json()
        obj["manifest_hash"] = self_hash(obj)
        return strictjson.dumps_pretty(obj)


def _is_shared(rel: str) -> bool:
    return rel == SHARED_FILE or rel.endswith("/" + SHARED_FILE)


def self_hash(obj: dict[str, Any]) -> str:
    return hash_bytes(strictjson.dumps({k: v for k, v in obj.items() if k != "manifest_hash"}))


def _json_metric(v: float | None) -> float | None:
    """NaN/inf metrics are recorded as null: JSON cannot hold them and they never rank."""
    if v is None or v != v or v in (float("inf"), float("-inf")):
        return None
    return float(v)


def parse(data: bytes, what: str) -> Manifest:
    obj = strictjson.loads(data, what=what, max_bytes=MAX_MANIFEST_BYTES)
    if not isinstance(obj, dict):
        raise CorruptCheckpointError(f"{what}: manifest is not a JSON object")
    if obj.get("format") != FORMAT_ID:
        raise CorruptCheckpointError(
            f"{what}: not a guardian manifest (format={str(obj.get('format'))[:80]!r})"
        )
    version = obj.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CorruptCheckpointError(f"{what}: invalid format version {str(version)[:40]!r}")
    if version > READ_VERSION:
        raise FormatVersionError(
            f"{what}: written by guardian {str(obj.get('guardian_version', '?'))[:40]} in format version "
            f"{version}; this guardian {__version__} reads up to {READ_VERSION}. Upgrade guardian "
            "to resume from it."
        )
    if obj.get("manifest_hash") != self_hash(obj):
        raise CorruptCheckpointError(
            f"{what}: the manifest's own hash does not match its content (corrupted or edited by hand)"
        )
    try:
        man = _from_json(obj, what)
    except (KeyError, TypeError, AttributeError, ValueError, OverflowError) as e:
        if isinstance(e, CorruptCheckpointError):
            raise
        detail = str(e)[:200]
        raise CorruptCheckpointError(f"{what}: malformed manifest ({type(e).__name__}: {detail})") from e
    if man.version > version:
        raise CorruptCheckpointError(f"{what}: a version-{version} manifest cannot list {SHARED_FILE}")
    return man


def _from_json(obj: dict[str, Any], what: str) -> Manifest:
    """Every field type-checked: the manifest hash is unkeyed, so a forger re-hashes."""
    if obj.get("hash_algorithm", HASH_ALGORITHM) != HASH_ALGORITHM:
        raise ValueError(f"unknown hash_algorithm {str(obj.get('hash_algorithm'))[:40]!r}")
    raw_files = _typed(obj["files"], dict, "files")
    files = {_check_rel_path(k, what): _file_entry(v) for k, v in raw_files.items()}
    world_size = _int(obj.get("world_size", 1), "world_size")
    if not 1 <= world_size <= min(MAX_WORLD_SIZE, max(1, len(files))):
        raise ValueError(f"world_size {world_size} is impossible for a checkpoint of {len(files)} file(s)")
    return Manifest(
        name=_typed(obj["name"], str, "name"),
        step=_int(obj["step"], "step"),
        epoch=_int(obj["epoch"], "epoch"),
        seq=_int(obj["seq"], "seq"),
        batch_in_epoch=_int(obj.get("batch_in_epoch", 0), "batch_in_epoch"),
        files=files,
        reason=[_typed(r, str, "reason") for r in _typed(obj.get("reason", []), list, "reason")],
        metrics=_metrics(obj.get("metrics", {})),
        components={
            _typed(k, str, "components"): _typed(v, dict, f"components[{k!r}]")
            for k, v in _typed(obj.get("components", {}), dict, "components").items()
        },
        world_size=world_size,
        created_unix=_number(obj.get("created_unix", 0.0), "created_unix"),
        guardian_version=_typed(obj.get("guardian_version", "?"), str, "guardian_version"),
        extra=_typed(obj.get("extra", {}), dict, "extra"),
    )


def _typed(v: Any, kind: type, field_name: str) -> Any:
    if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
        raise TypeError(f"{field_name}: expected {kind.__name__}, got {type(v).__name__}")
    return v


def _number(v: Any, field_name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise TypeError(f"{field_name}: expected a finite number, got {str(v)[:40]!r}")
    return float(v)


def _metrics(v: Any) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for k, m in _typed(v, dict, "metrics").items():
        out[k] = None if m is None else _number(m, f"metrics[{k!r}]")
    return out


def _int(v: Any, field_name: str = "value") -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{field_name}: expected an integer, got {str(v)[:40]!r}")
    if not 0 <= v <= MAX_COUNTER:
        raise ValueError(f"{field_name}: {v} is out of range")
    return v


def _file_entry(v: Any) -> FileEntry:
    _typed(v, dict, "file entry")
    size, digest = v["bytes"], v["hash"]
    if not isinstance(digest, str) or not _HASH_RE.match(digest):
        raise TypeError("file hash must be 32 lowercase hex digits")
    return FileEntry(bytes=_int(size, "bytes"), hash=digest)


def _check_rel_path(rel: str, what: str) -> str:
    """Manifest paths must stay inside the checkpoint: no absolute paths, no '..'."""
    if (
        not isinstance(rel, str)
        or not rel
        or "\x00" in rel
        or "\\" in rel
        or rel.startswith("/")
        or posixpath.normpath(rel) != rel
        or rel.split("/")[0] == ".."
        or rel == MANIFEST_FILE
    ):
        raise UnsafeCheckpointError(f"{what}: refusing file path {rel!r} (outside the checkpoint)")
    return rel


def budget(ckpt_dir: str) -> int:
    """How many bytes a manifest of this checkpoint directory can legitimately need."""
    try:
        with os.scandir(ckpt_dir) as it:
            entries = sum(1 for _ in it)
    except OSError:
        entries = 0
    return min(MAX_MANIFEST_BYTES, MANIFEST_BASE_BUDGET + MANIFEST_BUDGET_PER_ENTRY * entries)


def read(ckpt_dir: str | os.PathLike[str]) -> Manifest:
    """Read and parse ``ckpt_dir/manifest.json`` (without hashing any file).

    Opened without following links and without blocking; its size is checked
    against ``budget`` before a byte is read."""
    ckpt_dir = os.fspath(ckpt_dir)
    path = os.path.join(ckpt_dir, MANIFEST_FILE)
    try:
        data = safeio.read_bounded(ckpt_dir, MANIFEST_FILE, budget(ckpt_dir), "manifest")
    except FileNotFoundError as e:
        raise CorruptCheckpointError(f"{path}: missing (the save never committed)") from e
    return parse(data, what=path)
