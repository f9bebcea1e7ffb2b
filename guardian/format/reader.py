"""Reading checkpoints without torch: listing, verification, digests.

The daemon and the CLI use only this module (it never imports torch), so a
supervisor can check checkpoints without a CUDA context and in milliseconds.

Verification policy: a checkpoint is *valid* when its manifest parses, every listed
file is a regular file inside the checkpoint with the listed size and hash, no
unlisted files are present, and every tensor file and state file parses strictly.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointNotFoundError, CorruptCheckpointError, FormatVersionError, GuardianError
from . import manifest as manifest_mod
from . import safeio, safetensors_io, strictjson
from .hashing import hash_fd, new_hasher
from .layout import MANIFEST_FILE, SHARED_FILE, STATE_FILE, TENSORS_FILE, parse_checkpoint_name, rank_prefix
from .tree import tensor_refs

Progress = Callable[[int], object]  # told of each n bytes hashed


@dataclass
class CheckpointInfo:
    path: str
    name: str
    manifest: manifest_mod.Manifest | None
    problems: list[str] = field(default_factory=list)
    verified: bool = False  # True when hashes were checked (not only the manifest)
    format_error: FormatVersionError | None = None  # written by a newer guardian: not corrupt

    @property
    def valid(self) -> bool:
        return self.manifest is not None and not self.problems

    @property
    def sort_key(self) -> tuple[int, int, int]:
        if self.manifest is not None:
            return (self.manifest.seq, self.manifest.step, 0)
        parsed = parse_checkpoint_name(self.name) or (0, 0)
        return (-1, parsed[0], parsed[1])


MAX_DEPTH = 8  # a checkpoint nests at most rank-NNNNN/file; deeper is refused, never recursed
MAX_REPORTED = 20  # problems of one kind listed per checkpoint; the rest are counted


def _candidate_names(run_dir: str) -> Iterator[str]:
    try:
        names = os.listdir(run_dir)
    except FileNotFoundError as e:
        raise CheckpointNotFoundError(f"{run_dir}: no such directory") from e
    except NotADirectoryError as e:
        raise CheckpointNotFoundError(f"{run_dir}: not a directory") from e
    except OSError as e:
        raise CheckpointNotFoundError(f"{run_dir}: cannot list it ({e.strerror})") from e
    for name in names:
        if parse_checkpoint_name(name) is not None:
            yield name


def list_checkpoints(
    run_dir: str | os.PathLike[str], *, verify: bool = False, progress: Progress | None = None
) -> list[CheckpointInfo]:
    """All checkpoints of a run, oldest first. ``verify`` re-hashes every file;
    ``progress(n)`` is told of each ``n`` bytes hashed."""
    run_dir = os.fspath(run_dir)
    infos = [
        inspect_checkpoint(os.path.join(run_dir, n), verify=verify, progress=progress)
        for n in _candidate_names(run_dir)
    ]
    infos.sort(key=lambda i: i.sort_key)
    return infos


def inspect_checkpoint(
    path: str | os.PathLike[str], *, verify: bool = True, progress: Progress | None = None
) -> CheckpointInfo:
    """Check one checkpoint directory; problems are collected, never raised.
    ``progress(n)`` is told of each ``n`` bytes hashed (a CLI progress bar)."""
    path = os.fspath(path)
    info = CheckpointInfo(path=path, name=os.path.basename(path.rstrip("/")), manifest=None)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        info.problems.append(f"{path}: does not exist")
        return info
    if stat.S_ISLNK(st.st_mode):
        info.problems.append(f"{path}: is a symlink; refusing to follow it out of the run directory")
        return info
    if not stat.S_ISDIR(st.st_mode):
        info.problems.append(f"{path}: is not a directory")
        return info
    try:
        info.manifest = manifest_mod.read(path)
    except FormatVersionError as e:
        info.format_error = e
        info.problems.append(str(e))
        return info
    except GuardianError as e:
        info.problems.append(str(e))
        return info
    except (ValueError, TypeError, KeyError, OverflowError, RecursionError, UnicodeError, MemoryError) as e:
        # A parser bug must not make one hostile checkpoint crash the whole listing.
        info.problems.append(f"{path}: unreadable manifest ({type(e).__name__}: {str(e)[:200]})")
        return info
    except OSError as e:
        info.problems.append(f"{path}: unreadable manifest ({e.strerror or e})")
        return info
    info.problems.extend(_check_files(path, info.manifest, deep=verify, progress=progress))
    info.verified = verify
    return info


def _check_files(
    path: str, man: manifest_mod.Manifest, *, deep: bool, progress: Progress | None = None
) -> list[str]:
    problems = _missing_rank_parts(path, man)
    for rel, entry in sorted(man.files.items()):
        problems.extend(_check_one_file(path, rel, entry, deep=deep, progress=progress))
    listed = set(man.files) | {MANIFEST_FILE}
    unexpected = []
    for rel in _walk_files(path):
        if rel not in listed:
            unexpected.append(f"{os.path.join(path, rel)}: not listed in the manifest (unexpected file)")
    return problems + _capped(unexpected, f"{path}: … and {{n}} more unexpected file(s)")


def _capped(problems: list[str], more: str) -> list[str]:
    if len(problems) <= MAX_REPORTED:
        return problems
    return problems[:MAX_REPORTED] + [more.format(n=len(problems) - MAX_REPORTED)]


def _missing_rank_parts(path: str, man: manifest_mod.Manifest) -> list[str]:
    """A multi-rank checkpoint is whole only with every rank's state file listed
    (``world_size`` is bounded by the number of listed files when parsed)."""
    if man.world_size <= 1:
        return []
    missing = [
        f"{path}: rank {r}'s part ({rank_prefix(r, man.world_size)}{STATE_FILE}) is missing from the "
        f"manifest of a {man.world_size}-rank checkpoint"
        for r in range(man.world_size)
        if rank_prefix(r, man.world_size) + STATE_FILE not in man.files
    ]
    return _capped(missing, f"{path}: … and {{n}} more ranks' parts missing")


def _check_one_file(
    path: str, rel: str, entry: manifest_mod.FileEntry, *, deep: bool, progress: Progress | None = None
) -> list[str]:
    full = os.path.join(path, rel)
    if not rel.endswith((".safetensors", ".json")):
        return [
            f"{full}: guardian checkpoints hold only .safetensors and .json files; refusing "
            "(a pickle or a foreign file?)"
        ]
    try:
        fd, st = safeio.open_regular(path, rel)
    except FileNotFoundError:
        return [f"{full}: missing (listed in the manifest with {entry.bytes} bytes)"]
    except GuardianError as e:
        return [str(e)]
    try:
        if st.st_size != entry.bytes:
            return [
                f"{full}: size {st.st_size} bytes, manifest says {entry.bytes} (truncated or overwritten)"
            ]
        if not deep:
            return []
        try:
            digest, _ = hash_fd(fd, progress)
        except OSError as e:
            return [f"{full}: unreadable ({e.strerror})"]
        if digest != entry.hash:
            return [f"{full}: content hash {digest} does not match the manifest's {entry.hash} (corrupted)"]
        try:
            _parse_payload(fd, st.st_size, path, rel)
        except GuardianError as e:
            return [str(e)]
        except OSError as e:
            return [f"{full}: unreadable ({e.strerror or e})"]
        return []
    finally:
        os.close(fd)


def _parse_payload(fd: int, size: int, ckpt_dir: str, rel: str) -> None:
    """Parse files whose hash matched: a hash proves integrity, not well-formedness."""
    full = os.path.join(ckpt_dir, rel)
    if rel.endswith(".safetensors"):
        safetensors_io.read_layout_fd(fd, size, full)
    elif rel.endswith(".json"):
        limit = state_budget(ckpt_dir, rel) if rel.endswith(STATE_FILE) else strictjson.MAX_JSON_BYTES
        if size > limit:
            raise CorruptCheckpointError(
                f"{full}: {size} bytes is more than this checkpoint's state can need"
            )
        strictjson.loads(safeio.read_fd(fd, size, full), what=full)


def _walk_files(path: str) -> Iterator[str]:
    """Every non-directory entry (and every symlink) below ``path``, relative to it.
    Iterative and depth-bounded: a hostile chain of 1 500 nested directories is
    reported, never recursed into."""
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        try:
            with os.scandir(os.path.join(path, rel_dir) if rel_dir else path) as it:
                entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
        except OSError:
            yield rel_dir  # an unreadable directory is reported as unexpected
            continue
        for name, is_dir in entries:
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if not is_dir:
                yield rel
            elif rel.count("/") + 1 >= MAX_DEPTH:
                yield rel + "/…"  # nested deeper than any checkpoint: unexpected
            else:
                stack.append(rel)


def newest_valid(run_dir: str | os.PathLike[str], *, verify: bool = True) -> CheckpointInfo | None:
    """The newest checkpoint that verifies; older ones are tried only if newer fail."""
    for info in reversed(list_checkpoints(run_dir, verify=False)):
        if info.manifest is None:
            continue
        checked = inspect_checkpoint(info.path, verify=verify)
        if checked.valid:
            return checked
    return None


def resolve(path: str | os.PathLike[str]) -> tuple[str, bool]:
    """``(path, is_checkpoint)``: a checkpoint dir has a manifest, a run dir does not."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointNotFoundError(f"{path}: no such checkpoint or run directory")
    return path, os.path.lexists(os.path.join(path, MANIFEST_FILE))


# ---------------------------------------------------------------------------- contents


STATE_BASE_BUDGET = 16 << 20  # RNG words, param_groups, scheduler state, user extras
STATE_HEADER_FACTOR = 4  # each stored tensor costs a reference and a parameter name


def state_budget(ckpt_dir: str, state_rel: str = STATE_FILE) -> int:
    """How large ``state_rel`` can legitimately be: a fixed allowance plus a multiple
    of its tensor file's header (state.json refers to each tensor at most a few
    times). Known from a stat and an 8-byte read per tensor file (an incremental
    checkpoint has two), before the state file is opened."""
    header = 0
    prefix = state_rel[: -len(STATE_FILE)]
    for rel in (prefix + TENSORS_FILE, prefix + SHARED_FILE):
        try:
            fd, st = safeio.open_regular(ckpt_dir, rel)
            try:
                if st.st_size >= 8:
                    header += min(int.from_bytes(os.pread(fd, 8, 0), "little"), st.st_size)
            finally:
                os.close(fd)
        except (OSError, GuardianError):
            pass
    return state_budget_for_header(header)


def state_budget_for_header(header_bytes: int) -> int:
    return min(strictjson.MAX_JSON_BYTES, STATE_BASE_BUDGET + STATE_HEADER_FACTOR * header_bytes)


def load_state_json(ckpt_dir: str, rel: str = STATE_FILE) -> dict[str, Any]:
    """A checkpoint's state file, opened safely and refused by size before reading."""
    full = os.path.join(ckpt_dir, rel)
    try:
        data = safeio.read_bounded(ckpt_dir, rel, state_budget(ckpt_dir, rel), "state file")
    except FileNotFoundError as e:
        raise CorruptCheckpointError(f"{full}: missing") from e
    obj = strictjson.loads(data, what=full)
    if not isinstance(obj, dict) or not isinstance(obj.get("components"), dict):
        raise CorruptCheckpointError(f"{full}: state file has no 'components' object")
    return obj


def state_files(man: manifest_mod.Manifest) -> list[str]:
    """The state.json files of a checkpoint (one per rank that wrote state)."""
    return sorted(r for r in man.files if r == STATE_FILE or r.endswith("/" + STATE_FILE))


def _tensor_file_for(state_rel: str) -> str:
    return state_rel[: -len(STATE_FILE)] + TENSORS_FILE


def tensor_files(ckpt_dir: str, prefix: str = "") -> list[str]:
    """The paths of one rank's tensor files: ``tensors.safetensors``, then
    ``shared.safetensors`` when the checkpoint is incremental (format version 2; a
    key is in exactly one of them). Which exist is what counts: verification
    refuses a file the manifest does not list."""
    paths = [os.path.join(ckpt_dir, prefix + TENSORS_FILE)]
    shared = os.path.join(ckpt_dir, prefix + SHARED_FILE)
    if os.path.lexists(shared):
        paths.append(shared)
    return paths


def merge_tensor_maps(maps: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """One key → tensor map from per-file maps; a key stored twice is corruption
    (which copy would count?)."""
    out: dict[str, Any] = {}
    for path, tensors in maps:
        for key, value in tensors.items():
            if key in out:
                raise CorruptCheckpointError(f"{path}: tensor {key!r} is also stored in another tensor file")
            out[key] = value
    return out


def component_summaries(ckpt_dir: str, man: manifest_mod.Manifest) -> dict[str, dict[str, Any]]:
    """Per component: kind, tensor count, tensor bytes and content digest (torch-free)."""
    out: dict[str, dict[str, Any]] = {}
    for state_rel in state_files(man):
        prefix = state_rel[: -len(STATE_FILE)]
        state = load_state_json(ckpt_dir, state_rel)
        tensor_path = os.path.join(ckpt_dir, _tensor_file_for(state_rel))
        entries = _stored_entries(ckpt_dir, man, prefix)
        for name, comp in sorted(state["components"].items()):
            label = f"{prefix}{name}" if prefix else name
            out[label] = _component_summary(comp, entries, ckpt_dir, tensor_path)
    return out


def _stored_entries(
    ckpt_dir: str, man: manifest_mod.Manifest, prefix: str
) -> dict[str, tuple[str, Any, int]]:
    """key → (file relative path, entry, data start) over one rank's tensor files."""
    maps = []
    for rel in (prefix + TENSORS_FILE, prefix + SHARED_FILE):
        if rel in man.files:
            path = os.path.join(ckpt_dir, rel)
            layout = safetensors_io.read_layout(path)
            maps.append((path, {e.key: (rel, e, layout.data_start) for e in layout.entries}))
    return merge_tensor_maps(maps)


def _component_summary(comp: Any, entries: dict, ckpt_dir: str, tensor_path: str) -> dict[str, Any]:
    if not isinstance(comp, dict) or "state" not in comp:
        raise CorruptCheckpointError(f"{tensor_path}: malformed component entry")
    h = new_hasher()
    h.update(strictjson.dumps({"kind": comp.get("kind"), "state": comp["state"]}))
    refs = sorted(set(tensor_refs(comp["state"])))
    if not all(isinstance(r, str) for r in refs):
        raise CorruptCheckpointError(f"{tensor_path}: malformed tensor reference")
    total = 0
    files: dict[str, Any] = {}
    try:
        for key in refs:
            if key not in entries:
                raise CorruptCheckpointError(f"{tensor_path}: state references missing tensor {key!r}")
            rel, e, data_start = entries[key]
            h.update(strictjson.dumps([key, e.dtype, list(e.shape)]))
            if rel not in files:
                files[rel] = os.fdopen(safeio.open_regular(ckpt_dir, rel)[0], "rb")
            f = files[rel]
            f.seek(data_start + e.begin)
            remaining = e.nbytes
            while remaining:
                chunk = f.read(min(remaining, 8 << 20))
                if not chunk:
                    raise CorruptCheckpointError(f"{tensor_path}: truncated inside tensor {key!r}")
                h.update(chunk)
                remaining -= len(chunk)
            total += e.nbytes
    finally:
        for f in files.values():
            f.close()
    return {"kind": comp.get("kind"), "tensors": len(refs), "bytes": total, "digest": h.hexdigest()}


def checkpoint_digest(components: dict[str, dict[str, Any]]) -> str:
    """One hash over every component's digest, in a canonical order."""
    h = new_hasher()
    for name in sorted(components):
        h.update(strictjson.dumps([name, components[name]["digest"]]))
    return h.hexdigest()
