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
"""

from __future__ import annotations

import os
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any

from .._version import __version__
from ..errors import CorruptCheckpointError, FormatVersionError, UnsafeCheckpointError
from . import strictjson
from .hashing import hash_bytes
from .layout import FORMAT_ID, FORMAT_VERSION, HASH_ALGORITHM, MANIFEST_FILE

MAX_MANIFEST_BYTES = 64 * 1024 * 1024


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

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_ID,
            "version": FORMAT_VERSION,
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
        raise CorruptCheckpointError(f"{what}: not a guardian manifest (format={obj.get('format')!r})")
    version = obj.get("version")
    if not isinstance(version, int) or version < 1:
        raise CorruptCheckpointError(f"{what}: invalid format version {version!r}")
    if version > FORMAT_VERSION:
        raise FormatVersionError(
            f"{what}: written by guardian {obj.get('guardian_version', '?')} in format version "
            f"{version}; this guardian {__version__} reads up to {FORMAT_VERSION}. Upgrade guardian "
            "to resume from it."
        )
    if obj.get("manifest_hash") != self_hash(obj):
        raise CorruptCheckpointError(
            f"{what}: the manifest's own hash does not match its content (corrupted or edited by hand)"
        )
    try:
        files = {_check_rel_path(k, what): _file_entry(v) for k, v in obj["files"].items()}
        return Manifest(
            name=str(obj["name"]),
            step=_int(obj["step"]),
            epoch=_int(obj["epoch"]),
            seq=_int(obj["seq"]),
            batch_in_epoch=_int(obj.get("batch_in_epoch", 0)),
            files=files,
            reason=[str(r) for r in obj.get("reason", [])],
            metrics=dict(obj.get("metrics", {})),
            components=dict(obj.get("components", {})),
            world_size=_int(obj.get("world_size", 1)),
            created_unix=float(obj.get("created_unix", 0.0)),
            guardian_version=str(obj.get("guardian_version", "?")),
            extra=dict(obj.get("extra", {})),
        )
    except (KeyError, TypeError, AttributeError, ValueError, OverflowError) as e:
        if isinstance(e, CorruptCheckpointError):
            raise
        raise CorruptCheckpointError(f"{what}: malformed manifest ({type(e).__name__}: {e})") from e


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"expected an integer, got {v!r}")
    return v


def _file_entry(v: Any) -> FileEntry:
    size, digest = v["bytes"], v["hash"]
    if not isinstance(digest, str):
        raise TypeError("file hash must be a string")
    return FileEntry(bytes=_int(size), hash=digest)


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


def read(ckpt_dir: str | os.PathLike[str]) -> Manifest:
    """Read and parse ``ckpt_dir/manifest.json`` (without hashing any file)."""
    path = os.path.join(ckpt_dir, MANIFEST_FILE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError as e:
        raise CorruptCheckpointError(f"{path}: missing (the save never committed)") from e
    except OSError as e:
        raise UnsafeCheckpointError(f"{path}: cannot open safely ({e.strerror})") from e
    try:
        size = os.fstat(fd).st_size
        if size > MAX_MANIFEST_BYTES:
            raise UnsafeCheckpointError(f"{path}: {size} bytes is too large for a manifest")
        data = b""
        while len(data) < size:
            chunk = os.read(fd, size - len(data))
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    return parse(data, what=path)
