"""The background replicator: every locally committed checkpoint goes to the remote
prefix, off the training thread.

Protocol for one checkpoint ``NAME`` (object stores have no atomic directory rename):

1. delete ``NAME/manifest.json`` if it exists (a checkpoint of that name from an
   earlier attempt is uncommitted before any of its objects changes);
2. upload every file the local manifest lists, re-hashing the bytes as they are read
   (a local file that no longer matches its manifest is never published);
3. upload ``NAME/manifest.json`` last: the remote commit point. A reader trusts only
   checkpoints whose manifest exists and whose objects hash to it;
4. mirror retention: the same ``Retention`` policy decides which remote checkpoints go;
   each is uncommitted (manifest first) before its objects are removed.

Training never waits for the network: ``committed()`` only hands over the path. At
most one checkpoint waits behind the one uploading, and a newer one replaces it (the
newest wins). A failed upload is retried with exponential backoff, and given up in
favour of a newer checkpoint when one is waiting.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..faults import fault_point
from ..format import manifest as manifest_mod
from ..format.hashing import new_hasher
from ..format.layout import MANIFEST_FILE
from ..format.manifest import Manifest
from ..policies import BestMetric, Retention
from ..smallfiles import write_small_file_atomically
from ..threads import lower_thread_priority
from .store import CHUNK, RemoteStore

log = logging.getLogger(__name__)

REMOTE_STATUS_FILE = "remote.json"  # in the run directory: the newest remote-durable checkpoint
BACKOFF_FIRST = 1.0
BACKOFF_CAP = 60.0


class LocalChanged(Exception):
    """A local file no longer matches its manifest (deleted by retention, or damaged)."""


@dataclass
class Durable:
    name: str
    step: int
    seconds_after_commit: float  # local commit → remote manifest written


class Replicator:
    """Uploads committed checkpoints in one background thread (rank 0 only)."""

    def __init__(
        self, store: RemoteStore, run_dir: str, retention: Retention, best: BestMetric | None
    ) -> None:
        self.store = store
        self.run_dir = run_dir
        self.retention = retention
        self.best = best
        self.durable: Durable | None = None
        self.failures = 0  # uploads given up (superseded after a failure, or abandoned at exit)
        self._cond = threading.Condition()
        self._pending: tuple[str, Manifest, float] | None = None
        self._busy = False
        self._closing = False
        self._pinned: set[str] = set()  # names this replicator keeps from local retention
        self._thread = threading.Thread(target=self._run, name="guardian-replicate", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ training side

    def committed(self, path: str, manifest: Manifest) -> None:
        """A local commit happened: queue it, replacing any checkpoint still waiting.

        Called on the committing thread before local retention runs, so the queued
        checkpoint is pinned before retention can see it: an upload slower than
        ``keep_last`` local saves would otherwise lose its files mid-upload, give up,
        and start over on a newer one, forever."""
        with self._cond:
            self._pin(manifest.name)
            if self._pending is not None:
                log.info(
                    "remote: %s superseded by %s before its upload began",
                    self._pending[1].name,
                    manifest.name,
                )
                self._unpin(self._pending[1].name)
            self._pending = (path, manifest, time.monotonic())
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is uploading or waiting; False if ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._busy or self._pending is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float | None = None) -> None:
        """At the end of training: give the last upload ``timeout`` seconds
        (``GUARDIAN_REMOTE_EXIT_WAIT``, default 300) to become remote-durable, then stop."""
        if timeout is None:
            timeout = float(os.environ.get("GUARDIAN_REMOTE_EXIT_WAIT", "300"))
        if not self.wait_idle(timeout):
            log.error(
                "remote: the newest checkpoint is not on %s yet and the process is exiting; "
                "the newest remote-durable one is %s",
                self.store.shown,
                self.durable.name if self.durable else "none",
            )
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        lower_thread_priority()
        self._clean_leftovers()
        while True:
            with self._cond:
                while self._pending is None and not self._closing:
                    self._cond.wait()
                if self._pending is None:
                    return
                job, self._pending = self._pending, None
                self._busy = True
            try:
                self._replicate_with_retries(*job)
            except Exception:  # noqa: BLE001 - a bug here must not kill the thread silently
                log.exception("remote: replicating %s failed unexpectedly", job[1].name)
            finally:
                with self._cond:
                    self._unpin(job[1].name)  # the next local commit's retention may take it
                    self._busy = False
                    self._cond.notify_all()

    def _pin(self, name: str) -> None:
        """Keep ``name`` from local retention while it waits or uploads; a name already
        protected for another reason (the resume source) is left to that owner."""
        if name not in self.retention.protected:
            self.retention.protected.add(name)
            self._pinned.add(name)

    def _unpin(self, name: str) -> None:
        if name in self._pinned:
            self._pinned.discard(name)
            self.retention.protected.discard(name)

    def _clean_leftovers(self) -> None:
        """Uncommitted remote checkpoints (no manifest) and multipart uploads a killed
        writer left behind: invisible to readers, but they cost storage."""
        try:
            committed = set(self.store.committed())
            for name in self.store.checkpoint_dirs():
                if name not in committed:
                    log.info("remote: removing %s/%s, an upload that never committed", self.store.shown, name)
                    self.store.remove_tree(name)
            if aborted := self.store.abort_incomplete_uploads():
                log.info("remote: aborted %d incomplete multipart upload(s)", aborted)
        except Exception as e:  # noqa: BLE001 - housekeeping only: nothing committed is at stake
            log.warning("remote: could not clean leftovers under %s: %s", self.store.shown, e)

    def _replicate_with_retries(self, path: str, manifest: Manifest, committed_at: float) -> None:
        delay = BACKOFF_FIRST
        attempt = 0
        while True:
            attempt += 1
            try:
                self._upload(path, manifest)
                self.durable = Durable(manifest.name, manifest.step, time.monotonic() - committed_at)
                self._write_status()
                log.info(
                    "remote: %s is durable on %s (%.1fs after its local commit)",
                    manifest.name,
                    self.store.shown,
                    self.durable.seconds_after_commit,
                )
                self._mirror_retention(manifest.name)
                return
            except LocalChanged as e:
                log.warning("remote: %s not uploaded: %s", manifest.name, e)
                self.failures += 1
                return
            except Exception as e:  # noqa: BLE001 - any backend error is a failed attempt
                log.warning(
                    "remote: upload of %s to %s failed (attempt %d: %s: %s); retrying in %.0fs",
                    manifest.name,
                    self.store.shown,
                    attempt,
                    type(e).__name__,
                    str(e)[:200],
                    delay,
                )
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closing, delay)
                if self._pending is not None or self._closing:
                    self.failures += 1
                    log.error(
                        "remote: giving up on %s (%s); the newest remote-durable checkpoint is %s",
                        manifest.name,
                        "a newer checkpoint is waiting" if self._pending else "the run is ending",
                        self.durable.name if self.durable else "none",
                    )
                    return
            delay = min(delay * 2, BACKOFF_CAP)

    def _upload(self, path: str, manifest: Manifest) -> None:
        name = manifest.name
        if self.store.exists(name, MANIFEST_FILE):
            self.store.remove(f"{name}/{MANIFEST_FILE}")  # uncommit before any object changes
        for rel, entry in sorted(manifest.files.items()):
            self.store.put_chunks(f"{name}/{rel}", _verified_chunks(os.path.join(path, rel), entry))
            fault_point("remote.file_uploaded")
        try:
            with open(os.path.join(path, MANIFEST_FILE), "rb") as f:
                data = f.read(manifest_mod.MAX_MANIFEST_BYTES + 1)
        except FileNotFoundError as e:
            raise LocalChanged(f"{path} was deleted during its upload") from e
        self.store.put_bytes(f"{name}/{MANIFEST_FILE}", data)  # the remote commit point

    def _write_status(self) -> None:
        """``RUN/remote.json``: what ``guardian status`` shows beside the local checkpoint."""
        import json

        assert self.durable is not None
        data = {
            "url": self.store.shown,
            "newest_durable": self.durable.name,
            "step": self.durable.step,
            "durable_unix": time.time(),
            "seconds_after_commit": round(self.durable.seconds_after_commit, 3),
        }
        try:
            write_small_file_atomically(
                os.path.join(self.run_dir, REMOTE_STATUS_FILE), json.dumps(data).encode(), durable=False
            )
        except OSError as e:
            log.warning("remote: could not write %s: %s", REMOTE_STATUS_FILE, e)

    def _mirror_retention(self, newest: str) -> None:
        from .fetch import remote_listing

        try:
            listing = remote_listing(self.store)
            doomed = set(self.retention.doomed(listing, self.best)) - {newest}
            for name in sorted(doomed):
                self.store.remove(f"{name}/{MANIFEST_FILE}")  # uncommitted first
                self.store.remove_tree(name)
        except Exception as e:  # noqa: BLE001 - an old remote checkpoint left behind costs storage only
            log.warning("remote: retention on %s failed: %s", self.store.shown, e)


def _verified_chunks(path: str, entry: manifest_mod.FileEntry) -> Any:
    """The file's bytes, hashed as they are read; ``LocalChanged`` if they no longer match."""
    hasher = new_hasher()
    size = 0
    try:
        f = open(path, "rb")
    except FileNotFoundError as e:
        raise LocalChanged(f"{path} was deleted before its upload") from e
    with f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
            size += len(chunk)
            if size > entry.bytes:
                break
            yield chunk
    if size != entry.bytes or hasher.hexdigest() != entry.hash:
        raise LocalChanged(f"{path} no longer matches its manifest; not published")
