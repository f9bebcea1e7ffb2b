"""The fsspec seam: one remote prefix (``s3://bucket/prefix/run``, ``gs://…``, a path on a
shared file system) seen as a flat set of objects addressed by relative names.

Everything guardian does remotely goes through ``RemoteStore``, so what it may touch is
decided here: only names under the prefix, built from a checkpoint name that matches
``CHECKPOINT_NAME_RE`` and a file name the manifest parser already proved safe. Nothing
outside the prefix is listed or read, and a symlink on a shared file system is never
followed.

Credentials come from the backend's standard provider chain (for S3: the environment,
``~/.aws`` files, instance metadata; ``AWS_ENDPOINT_URL`` for an S3-compatible
endpoint). guardian never receives, logs or writes them; a URL is shown only through
``redact``.

Torch-free: the CLI and the daemon can use it.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..errors import RemoteStoreError
from ..format.layout import MANIFEST_FILE, parse_checkpoint_name

log = logging.getLogger(__name__)

CHUNK = 8 * 1024 * 1024
PROBE_PREFIX = ".guardian-probe-"


def redact(url: str) -> str:
    """``url`` without user info, query or fragment (where a secret could hide)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _timeouts() -> tuple[float, float, int]:
    """(connect, read, attempts) for object stores; ``GUARDIAN_REMOTE_TIMEOUT`` (seconds)
    bounds one request try, so an endpoint that stops answering is noticed within
    about ``attempts`` × that and the upload retried by the replicator."""
    read = float(os.environ.get("GUARDIAN_REMOTE_TIMEOUT", "60"))
    return min(10.0, read), read, 2


def _storage_options(protocol: str) -> dict[str, Any]:
    if protocol not in ("s3", "s3a"):
        return {}
    connect, read, attempts = _timeouts()
    return {
        "skip_instance_cache": True,  # a fresh client per store: no state shared with the user's own
        "use_listings_cache": False,  # listings must be current: readers decide by them
        "config_kwargs": {
            "connect_timeout": connect,
            "read_timeout": read,
            "retries": {"max_attempts": attempts},
        },
    }


class RemoteStore:
    """A remote prefix. Methods raise ``OSError`` (fsspec's convention) for a failed
    request; callers decide whether that is fatal."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.shown = redact(self.url)
        try:
            import fsspec  # type: ignore[import-untyped]
            from fsspec.core import split_protocol  # type: ignore[import-untyped]
        except ImportError as e:
            raise RemoteStoreError(
                f"replicating to {self.shown} needs fsspec: pip install 'torch-guardian[s3]'"
            ) from e
        protocol = split_protocol(self.url)[0] or "file"
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **_storage_options(protocol))
        except (ImportError, ValueError) as e:
            raise RemoteStoreError(
                f"cannot open {self.shown}: {e}. For s3:// URLs: pip install 'torch-guardian[s3]'"
            ) from e
        self.root = self.root.rstrip("/")
        self.local = protocol in ("file", "local")
        if hasattr(self.fs, "retries"):
            # s3fs retries a timed-out request 5 times on top of botocore's attempts: a
            # silent endpoint then costs minutes per request, not the timeout asked for.
            # The replicator retries whole uploads with backoff; one layer is enough.
            self.fs.retries = 1

    # ------------------------------------------------------------------ names

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def checkpoint_dirs(self) -> list[str]:
        """Names directly under the prefix that look like checkpoints (committed or not)."""
        self._fresh()
        try:
            entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return []
        names = []
        for e in entries:
            name = str(e["name"]).rstrip("/").rsplit("/", 1)[-1]
            if parse_checkpoint_name(name) is None or e.get("type") != "directory":
                continue
            if self.local and e.get("islink"):
                log.warning("%s/%s is a symlink; never followed out of the prefix", self.shown, name)
                continue
            names.append(name)
        return names

    def committed(self) -> list[str]:
        """Checkpoint names whose manifest object exists (the remote commit point)."""
        return [n for n in self.checkpoint_dirs() if self.exists(n, MANIFEST_FILE)]

    def exists(self, *parts: str) -> bool:
        return bool(self.fs.exists(self.path(*parts)))

    def _fresh(self) -> None:
        invalidate = getattr(self.fs, "invalidate_cache", None)
        if invalidate is not None:
            invalidate()

    # ------------------------------------------------------------------ reading

    def read_bounded(self, rel: str, limit: int) -> bytes:
        """The whole object, refused (``ValueError``) beyond ``limit`` bytes, read so
        that a huge or endless object never costs more than ``limit`` of memory."""
        self._refuse_link(rel)
        with self.fs.open(self.path(rel), "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise ValueError(f"{self.shown}/{rel}: larger than {limit} bytes")
        return bytes(data)

    def chunks(self, rel: str, limit: int) -> Iterator[bytes]:
        """The object's bytes in chunks, at most ``limit + 1`` of them (the caller sees
        the one byte too many and refuses)."""
        self._refuse_link(rel)
        left = limit + 1
        with self.fs.open(self.path(rel), "rb", block_size=CHUNK) as f:
            while left > 0:
                data = f.read(min(CHUNK, left))
                if not data:
                    return
                left -= len(data)
                yield data

    def _refuse_link(self, rel: str) -> None:
        if self.local and os.path.islink(self.path(rel)):
            raise ValueError(f"{self.shown}/{rel}: a symlink; refusing to follow it out of the prefix")

    # ------------------------------------------------------------------ writing

    def put_chunks(self, rel: str, chunks: Iterator[bytes]) -> None:
        """Write one object from ``chunks`` (multipart on S3: parts are invisible until
        the upload completes, so a killed writer leaves no partial object)."""
        target = self.path(rel)
        if self.local:
            self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        f = self.fs.open(target, "wb", block_size=max(CHUNK, 5 * 1024 * 1024))
        try:
            for chunk in chunks:
                f.write(chunk)
        except BaseException:
            discard = getattr(f, "discard", None)  # S3: abort the multipart upload, publish nothing
            if discard is not None:
                discard()
            raise
        finally:
            f.close()

    def put_bytes(self, rel: str, data: bytes) -> None:
        self.put_chunks(rel, iter([data]))

    def remove(self, rel: str) -> None:
        """Delete one object. ``rm_file``, never ``rm``: ``rm`` expands glob characters,
        and a prefix may contain ``[`` or ``*``."""
        try:
            self.fs.rm_file(self.path(rel))
        except FileNotFoundError:
            pass

    def remove_tree(self, name: str) -> None:
        """Delete every object under ``name`` (one checkpoint), object by object."""
        self._fresh()
        try:
            found = self.fs.find(self.path(name))
        except FileNotFoundError:
            return
        prefix = self.path(name) + "/"
        for full in found:
            if str(full).startswith(prefix):  # never anything outside the checkpoint
                self.remove(str(full)[len(self.root) + 1 :])
        if self.local:
            for sub in sorted(self.fs.find(self.path(name), withdirs=True), reverse=True):
                if self.fs.isdir(sub) and str(sub).startswith(self.root + "/"):
                    self.fs.rmdir(sub)
            if self.fs.isdir(self.path(name)):
                self.fs.rmdir(self.path(name))

    def check_writable(self) -> None:
        """Write and delete a probe object: a bucket that does not exist, a denied
        write or an endpoint that does not answer is a ``RemoteStoreError`` now, at
        ``protect()``, not at the first save."""
        probe = PROBE_PREFIX + secrets.token_hex(6)
        try:
            self.put_bytes(probe, b"guardian write probe\n")
            self.remove(probe)
        except Exception as e:  # noqa: BLE001 - backends raise anything from OSError to botocore errors
            raise RemoteStoreError(
                f"cannot write to {self.shown} ({type(e).__name__}: {str(e)[:300]}). Check that the "
                "bucket exists, that the credentials of the standard provider chain (environment, "
                "~/.aws, instance metadata) may write to that prefix, and that the endpoint answers."
            ) from e

    def abort_incomplete_uploads(self) -> int:
        """S3 only: abort multipart uploads under the prefix that a killed writer never
        completed (invisible, but billed). Returns how many were aborted."""
        call = getattr(self.fs, "call_s3", None)  # s3fs's synchronous wrapper of a boto call
        if call is None:
            return 0
        bucket, _, key = self.root.partition("/")
        listed = call("list_multipart_uploads", Bucket=bucket, Prefix=key + "/")
        aborted = 0
        for up in listed.get("Uploads", []):
            if str(up.get("Key", "")).startswith(key + "/"):
                call("abort_multipart_upload", Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
                aborted += 1
        return aborted
