"""The commit protocol across ranks: every rank writes its part, rank 0 commits.

    rank 0: mkdir RUN/.tmp-<name>-s<seq>           (a name every rank can compute)
    all:    agree the temp dir exists               (collective)
    rank 0: write the replicated files (top level)
    each r: write rank-r/{tensors.safetensors,state.json}, fsync, then rank-r/part.json
            (sizes + hashes of its files), fsync it and rank-r/
    all:    agree every rank succeeded              (collective; a failure anywhere aborts
                                                     everywhere and rank 0 removes the dir)
    rank 0: adopt every part.json, write the manifest last, fsync, rename, fsync RUN
    all:    learn whether the commit succeeded      (broadcast)

A power cut or a killed rank at any point leaves either no new checkpoint or a
complete one: the manifest — the only commit marker — is written after every rank's
part is durable, and the reader refuses a checkpoint missing any rank's part.
"""

from __future__ import annotations

import os

from .commit import CheckpointTxn, check_free_space
from .distributed import World
from .errors import CheckpointWriteError, GuardianError
from .format import strictjson
from .format.hashing import hash_file
from .format.layout import TMP_PREFIX, rank_prefix
from .format.manifest import FileEntry, Manifest
from .state.snapshot import Snapshot, write_files

PART_FILE = "part.json"


def save_distributed(
    world: World, run_dir: str, manifest: Manifest, replicated: Snapshot | None, own: Snapshot
) -> str | None:
    """Collective: every rank calls it with the same manifest name and seq. Returns the
    committed path (on every rank), or raises ``CheckpointWriteError`` on every rank."""
    txn = CheckpointTxn(
        run_dir, manifest.name, tmp_name=f"{TMP_PREFIX}{manifest.name}-s{manifest.seq}", owner=world.is_leader
    )
    error = _attempt(lambda: _create(world, txn, replicated, own, run_dir))
    _agree(world, error, "could not create the checkpoint directory")
    error = _attempt(lambda: _write_part(world, txn, replicated, own))
    if not world.agree_ok(error is None):
        if world.is_leader:
            txn.abort()
        _raise(error, world, "a rank failed to write its part of the checkpoint; nothing was committed")
    if world.is_leader:
        error = _attempt(lambda: _adopt_parts(world, txn))
        if error is None:
            error = _attempt(lambda: txn.commit(manifest))
        if error is not None:
            txn.abort()
    committed = world.broadcast_ints([1 if world.is_leader and error is None else 0])[0]
    if not committed:
        _raise(error, world, "rank 0 could not commit the checkpoint; see its log")
    return os.path.join(run_dir, manifest.name)


def _attempt(fn) -> Exception | None:
    """Run one rank-local step of the protocol and return its failure instead of raising:
    every rank must still reach every agreement below, or its peers would wait in a
    collective forever. Any exception counts as a failure of the step; the rank that
    had it raises it after the agreement — an I/O failure as ``CheckpointWriteError``,
    anything else (a bug, ``MemoryError``) as itself, never disguised as a write error.
    The other ranks raise ``CheckpointWriteError`` ("a rank failed ...")."""
    try:
        fn()
    except GuardianError as e:
        return e
    except OSError as e:
        error = CheckpointWriteError(f"{type(e).__name__}: {e}", e.errno)
        error.__cause__ = e
        return error
    except Exception as e:  # noqa: BLE001 — reported to every rank, raised by this one
        return e
    return None


def _agree(world: World, error: Exception | None, what: str) -> None:
    if not world.agree_ok(error is None):
        _raise(error, world, what)


def _raise(error: Exception | None, world: World, what: str) -> None:
    if error is not None:
        raise error
    raise CheckpointWriteError(f"rank {world.rank}: {what}")


def _create(
    world: World, txn: CheckpointTxn, replicated: Snapshot | None, own: Snapshot, run_dir: str
) -> None:
    needed = own.tensor_bytes + (replicated.tensor_bytes if replicated else 0)
    check_free_space(run_dir, int(needed * 1.02) + (1 << 20))
    if world.is_leader:
        txn.create()


def _write_part(world: World, txn: CheckpointTxn, replicated: Snapshot | None, own: Snapshot) -> None:
    prefix = rank_prefix(world.rank, world.world_size)
    if world.is_leader and replicated is not None:
        write_files(txn, replicated, "")
    write_files(txn, own, prefix)
    mine = {rel: {"bytes": e.bytes, "hash": e.hash} for rel, e in txn.files.items() if rel.startswith(prefix)}
    txn.add_file(prefix + PART_FILE, [strictjson.dumps({"rank": world.rank, "files": mine})])
    txn.fsync_subdirs()


def _adopt_parts(world: World, txn: CheckpointTxn) -> None:
    """Rank 0 takes every other rank's word for its files (they were fsynced before
    the collective that got us here) and hashes each small part.json itself."""
    for r in range(1, world.world_size):
        rel = rank_prefix(r, world.world_size) + PART_FILE
        full = os.path.join(txn.tmp_dir, rel)
        try:
            with open(full, "rb") as f:
                part = strictjson.loads(f.read(), what=full)
            digest, size = hash_file(full)
        except (OSError, GuardianError) as e:
            raise CheckpointWriteError(f"rank {r}'s part of {txn.name} is unreadable: {e}") from e
        for name, entry in part["files"].items():
            txn.adopt(name, FileEntry(bytes=entry["bytes"], hash=entry["hash"]))
        txn.adopt(rel, FileEntry(bytes=size, hash=digest))
