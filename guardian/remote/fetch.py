"""Download and verify: bring a remote checkpoint into a local directory, trusting
nothing the remote says until it is checked.

A remote checkpoint is a candidate only when its manifest object exists; the manifest
is read with a size bound and parsed by the same hardened parser as a local one (so
its file names stay inside the checkpoint and its self-hash must match). Only the files
it lists are downloaded, each read at most one byte past its listed size and hashed
as it arrives; anything else under the prefix is never read. The bytes land in a
temporary directory of the run directory through the local commit protocol, so a
download killed half-way leaves nothing a reader would accept, and the local reader's
full verification runs on the result before a resume uses it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

from .. import commit
from ..errors import CorruptCheckpointError, GuardianError
from ..format import manifest as manifest_mod
from ..format.hashing import new_hasher
from ..format.layout import MANIFEST_FILE, parse_checkpoint_name
from ..format.manifest import Manifest
from .store import RemoteStore

log = logging.getLogger(__name__)

# A remote manifest is read before anything says how large it may be: 16 MiB holds the
# manifest of thousands of ranks and bounds what a hostile object can cost.
MAX_REMOTE_MANIFEST = 16 * 1024 * 1024


def read_manifest(store: RemoteStore, name: str) -> Manifest:
    """The parsed manifest of remote checkpoint ``name`` (``CorruptCheckpointError`` if bad)."""
    what = f"{store.shown}/{name}/{MANIFEST_FILE}"
    try:
        data = store.read_bounded(f"{name}/{MANIFEST_FILE}", MAX_REMOTE_MANIFEST)
    except ValueError as e:
        raise CorruptCheckpointError(f"{what}: {e}") from e
    man = manifest_mod.parse(data, what=what)
    if man.name != name:
        raise CorruptCheckpointError(
            f"{what}: names checkpoint {man.name[:80]!r}, not {name!r} (copied or forged)"
        )
    for rel in man.files:
        if not rel.endswith((".safetensors", ".json")):
            raise CorruptCheckpointError(
                f"{what}: lists {rel[:120]!r}, not a guardian file (a pickle?); refusing"
            )
    return man


def remote_checkpoints(store: RemoteStore) -> list[tuple[str, Manifest | None, str | None]]:
    """(name, manifest or None, problem or None) of every committed remote checkpoint,
    oldest first (by the manifest's sequence number, then step)."""
    out: list[tuple[str, Manifest | None, str | None]] = []
    for name in store.committed():
        try:
            out.append((name, read_manifest(store, name), None))
        except GuardianError as e:
            out.append((name, None, str(e)))
        except (ValueError, OSError) as e:
            out.append((name, None, f"{store.shown}/{name}: unreadable manifest ({type(e).__name__}: {e})"))

    def key(item: tuple[str, Manifest | None, str | None]) -> tuple[int, int, int]:
        man = item[1]
        step, dup = parse_checkpoint_name(item[0]) or (0, 0)
        return (man.seq, man.step, dup) if man else (-1, step, dup)

    return sorted(out, key=key)


def remote_listing(store: RemoteStore) -> list[dict[str, Any]]:
    """The committed remote checkpoints as ``Retention.doomed`` takes them."""
    return [
        {"name": n, "step": m.step, "seq": m.seq, "reason": m.reason, "metrics": m.metrics}
        for n, m, _ in remote_checkpoints(store)
        if m is not None
    ]


def download(store: RemoteStore, name: str, run_dir: str) -> str:
    """Download remote checkpoint ``name`` into ``run_dir/name`` (committed locally only
    when every file arrived with its listed size and hash). Returns the local path."""
    man = read_manifest(store, name)
    commit.check_free_space(run_dir, man.total_bytes)
    if os.path.lexists(os.path.join(run_dir, name)):
        commit.set_aside(run_dir, name, "replaced by the remote copy")
    with commit.CheckpointTxn(run_dir, name) as txn:
        for rel, entry in sorted(man.files.items()):
            got = txn.add_file(rel, _checked(store, f"{name}/{rel}", entry))
            if got != entry:  # _checked already refused; a second look costs nothing
                raise CorruptCheckpointError(f"{store.shown}/{name}/{rel}: does not match its manifest")
        return txn.commit(man)


def _checked(store: RemoteStore, rel: str, entry: manifest_mod.FileEntry) -> Iterator[bytes]:
    """The object's bytes; ``CorruptCheckpointError`` when its size or hash is not the
    manifest's (raised inside the write, so the local transaction is abandoned)."""
    hasher = new_hasher()
    size = 0
    try:
        for chunk in store.chunks(rel, entry.bytes):
            size += len(chunk)
            if size > entry.bytes:
                break
            hasher.update(chunk)
            yield chunk
    except FileNotFoundError as e:
        raise CorruptCheckpointError(f"{store.shown}/{rel}: missing (listed in its manifest)") from e
    except ValueError as e:
        raise CorruptCheckpointError(f"{store.shown}/{rel}: {e}") from e
    if size != entry.bytes:
        raise CorruptCheckpointError(
            f"{store.shown}/{rel}: {'more than' if size > entry.bytes else 'only'} "
            f"{min(size, entry.bytes)} bytes, its manifest says {entry.bytes} (truncated or overwritten)"
        )
    if hasher.hexdigest() != entry.hash:
        raise CorruptCheckpointError(
            f"{store.shown}/{rel}: content does not match its manifest's hash (corrupted)"
        )


def fetch_restorable(url: str, run_dir: str, why_unusable: Callable[[str], str | None]) -> str | None:
    """The newest remote checkpoint that downloads intact and passes ``why_unusable``
    (the resume's verification and meta pass), placed in ``run_dir``; None when the
    prefix holds none. Refused ones are reported and skipped (a local copy that
    failed the meta pass is set aside, never deleted)."""
    store = RemoteStore(url)
    candidates = remote_checkpoints(store)
    if not candidates:
        log.info("remote: no checkpoint under %s either; starting fresh", store.shown)
        return None
    refused: list[str] = []
    for name, man, problem in reversed(candidates):
        if problem is None:
            try:
                path = download(store, name, run_dir)
                problem = why_unusable(path)
                if problem is not None:
                    commit.set_aside(run_dir, name, problem[:500])
            except (CorruptCheckpointError, OSError) as e:
                problem = str(e)
        if problem is None:
            log.info(
                "remote: fetched %s from %s (%d bytes verified)",
                name,
                store.shown,
                man.total_bytes if man else 0,
            )
            return path
        log.error("remote checkpoint %s/%s skipped: %s", store.shown, name, problem)
        refused.append(f"{name}: {problem}")
    raise CorruptCheckpointError(
        f"{store.shown} holds {len(refused)} checkpoint(s) and none can be restored; nothing was trained. "
        f"`guardian verify {store.shown}` shows what is wrong with each; to start fresh anyway, "
        "replicate to another prefix.",
        refused,
    )


def is_remote(path: str) -> bool:
    """A URL with a scheme (``s3://…``) names a remote prefix, not a local path."""
    return "://" in path and not path.startswith("file://")


def remote_infos(url: str, *, verify: bool) -> list[Any]:
    """``reader.CheckpointInfo`` rows of a remote run prefix (or of one remote checkpoint
    when ``url`` ends in a checkpoint name), oldest first. ``verify`` streams and hashes
    every listed object (nothing is written locally)."""
    from ..format.reader import CheckpointInfo

    base, _, last = url.rstrip("/").rpartition("/")
    single = parse_checkpoint_name(last) is not None
    store = RemoteStore(base if single else url)
    if single:
        listed: list[tuple[str, Manifest | None, str | None]] = []
        try:
            listed.append((last, read_manifest(store, last), None))
        except (GuardianError, ValueError, OSError) as e:
            listed.append((last, None, str(e)))
    else:
        listed = remote_checkpoints(store)
    infos = []
    for name, man, problem in listed:
        info = CheckpointInfo(path=f"{store.shown}/{name}", name=name, manifest=man, verified=verify)
        if problem is not None:
            info.problems.append(problem)
        elif verify and man is not None:
            info.problems.extend(_hash_problems(store, name, man))
        infos.append(info)
    return infos


def _hash_problems(store: RemoteStore, name: str, man: Manifest) -> list[str]:
    problems = []
    for rel, entry in sorted(man.files.items()):
        try:
            for _ in _checked(store, f"{name}/{rel}", entry):
                pass
        except CorruptCheckpointError as e:
            problems.append(str(e))
        except OSError as e:
            problems.append(f"{store.shown}/{name}/{rel}: unreadable ({e})")
    return problems
