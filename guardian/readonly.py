"""Reading a run from outside it: ``guardian.load``, ``guardian.open``, ``export_weights``.

    info = guardian.load("runs/exp1", model=model)            # newest restorable checkpoint
    info = guardian.load("runs/exp1", which="best", model=model, optimizer=opt)
    with guardian.open("runs/exp1") as ckpt:                   # lazy, dict-like
        w = ckpt["model/fc.weight"]
    guardian.export_weights("runs/exp1", "model.safetensors")

All three are **read-only**: they never take the run's lock, never write ``run.json``
and never set a checkpoint aside, so they are safe while training is running in the
same directory (they see only committed checkpoints: a save in progress lives in a
``.tmp-`` directory until its rename). A checkpoint is used only when every file's
hash matches its manifest; ``load`` additionally checks the whole state against the
live objects on shapes alone before touching any of them (the resume's meta pass).
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .distributed import World
from .errors import CheckpointNotFoundError, CorruptCheckpointError, StateMismatchError
from .format import reader
from .format.layout import SHARED_FILE, STATE_FILE, TENSORS_FILE
from .format.manifest import Manifest
from .resume import Resumer
from .smallfiles import fsync_dir
from .state import dtensor
from .state import snapshot as snap_mod
from .state.discover import discover
from .state.fileread import preadv_exactly

log = logging.getLogger(__name__)

WHICH_HELP = 'which= is "latest", "best" or a checkpoint name such as "step-000000120"'


@dataclass
class Loaded:
    """What ``guardian.load`` put into the objects, and from where."""

    path: str
    name: str
    step: int
    epoch: int
    metrics: dict[str, Any]
    reason: list[str]
    components: dict[str, str] = field(default_factory=dict)  # loaded name → name in the checkpoint


# ---------------------------------------------------------------------------- choosing


def _checkpoints(path: str) -> tuple[str | None, list[reader.CheckpointInfo]]:
    """(the checkpoint ``path`` names itself, or None for a run directory; the run's
    checkpoints, newest first)."""
    path, is_checkpoint = reader.resolve(path)
    if is_checkpoint:
        return path, []
    return None, list(reversed(reader.list_checkpoints(path)))


def _candidates(path: str, which: str) -> list[reader.CheckpointInfo]:
    """Checkpoints ``which`` may mean, in the order to try them (newest first)."""
    own, existing = _checkpoints(path)
    if own is not None:
        if which not in ("latest", "best"):
            raise ValueError(f"{path} is a checkpoint; which={which!r} only applies to a run directory")
        return [reader.inspect_checkpoint(own, verify=False)]
    if which == "latest":
        out = existing
    elif which == "best":
        out = [i for i in existing if i.manifest and "best" in i.manifest.reason]
    else:
        named = os.path.join(path, which)
        if os.path.basename(which) != which or not os.path.isdir(named):
            names = ", ".join(i.name for i in existing[:5]) or "none"
            raise CheckpointNotFoundError(
                f"{path}: no checkpoint named {which!r} (newest: {names}); {WHICH_HELP}"
            )
        out = [reader.inspect_checkpoint(named, verify=False)]
    if not out:
        what = "no checkpoint saved as best (was monitor= set?)" if which == "best" else "no checkpoint"
        raise CheckpointNotFoundError(f"{path}: {what}")
    return out


def _refusal(path: str, which: str, refused: list[tuple[str, str]]) -> CorruptCheckpointError:
    lines = [f"{name}: {why}" for name, why in refused]
    return CorruptCheckpointError(
        f"{path}: no {which} checkpoint can be loaded ({len(refused)} refused: "
        + "; ".join(lines)[:2000]
        + "). `guardian verify` shows what is wrong with each; nothing was changed.",
        lines,
    )


def choose_verified(path: str | os.PathLike[str], which: str = "latest") -> reader.CheckpointInfo:
    """The newest checkpoint ``which`` names whose every file verifies (read-only)."""
    path = os.fspath(path)
    refused: list[tuple[str, str]] = []
    for info in _candidates(path, which):
        checked = reader.inspect_checkpoint(info.path, verify=True)
        if checked.format_error is not None:
            raise checked.format_error
        if checked.valid:
            if refused:
                log.warning(
                    "skipped %d newer checkpoint(s) that fail verification: %s", len(refused), refused
                )
            return checked
        refused.append((info.name, "; ".join(checked.problems)))
    raise _refusal(path, which, refused)


# ---------------------------------------------------------------------------- load


def load(
    path_or_run_dir: str | os.PathLike[str],
    *,
    which: str = "latest",
    model: Any = None,
    optimizer: Any = None,
    scheduler: Any = None,
    scaler: Any = None,
    strict: bool = True,
    **components: Any,
) -> Loaded:
    """Load a checkpoint into the objects given, without writing anything.

    ``path_or_run_dir``: a run directory (then ``which`` picks: "latest" — the newest
    checkpoint that verifies and fits the objects —, "best", or a checkpoint name) or
    one checkpoint directory. Pass only the objects you want filled: the checkpoint's
    other components are ignored. Keywords other than the four named ones load the
    component of that name (``ema=ema_model``). With one object of a kind given and
    one component of that kind saved, names need not match (``model=`` loads a run
    that protected ``net``). An optimizer needs its ``model=`` too: its state is keyed
    by parameter name.

    ``strict`` (default True): every key of a model must match. False loads the keys
    both have and logs the rest. Tensors are read on the CPU and copied into the
    objects on whatever device they live on (so no ``map_location`` is needed here;
    ``guardian.open`` has one). Global RNG and the data position are not touched.

    Raises ``StateMismatchError`` naming the first mismatching keys (before any
    object is modified), ``CorruptCheckpointError`` when nothing verifies.
    """
    path = os.fspath(path_or_run_dir)
    given = {
        n: v
        for n, v in {
            "model": model,
            "optimizer": optimizer,
            "scheduler": scheduler,
            "scaler": scaler,
            **components,
        }.items()
        if v is not None
    }
    candidates = _candidates(path, which)
    saved_kinds = _saved_kinds(candidates[0].path)
    given, renamed = _match_names(given, saved_kinds, candidates[0].path)
    adapters, _ = discover(None, given) if given else ({}, [])
    if not strict:
        adapters = {n: _Lenient(a) if a.kind == "module" else a for n, a in adapters.items()}
    resumer = Resumer(os.path.dirname(candidates[0].path), adapters, World(), strict=True, partial=True)
    chosen, refused = resumer.first_restorable(candidates)
    if chosen is None:
        raise _refusal(path, which, refused)
    if refused:
        log.warning("skipped %d newer checkpoint(s) that cannot be loaded: %s", len(refused), refused)
    if adapters:
        resumer.load(chosen)
    man = reader.inspect_checkpoint(chosen, verify=False).manifest
    assert man is not None
    return Loaded(
        path=chosen,
        name=man.name,
        step=man.step,
        epoch=man.epoch,
        metrics=dict(man.metrics),
        reason=list(man.reason),
        components=renamed,
    )


def _saved_kinds(ckpt: str) -> dict[str, str]:
    try:
        state = reader.load_state_json(ckpt, STATE_FILE)
    except (OSError, CorruptCheckpointError):
        return {}
    return {n: c.get("kind", "?") for n, c in state["components"].items() if isinstance(c, dict)}


def _match_names(
    given: dict[str, Any], saved: dict[str, str], where: str
) -> tuple[dict[str, Any], dict[str, str]]:
    """``model=`` finds the run's one module even when the run called it ``net``.
    Returns (checkpoint name → object, given name → checkpoint name)."""
    from .state.discover import _classify

    out, renamed = {}, {}
    for name, obj in given.items():
        if name in saved or not saved:
            out[name], renamed[name] = obj, name
            continue
        kind = _classify(obj)
        same_kind_given = [n for n, o in given.items() if _classify(o) == kind]
        same_kind_saved = [n for n, k in saved.items() if k == kind]
        if len(same_kind_given) == 1 and len(same_kind_saved) == 1 and same_kind_saved[0] not in given:
            out[same_kind_saved[0]], renamed[name] = obj, same_kind_saved[0]
            continue
        raise StateMismatchError(
            f"{where} has no component {name!r}; it holds {', '.join(f'{n} ({k})' for n, k in sorted(saved.items()))}. "
            f"Pass the object under one of those names (guardian.load(..., {next(iter(saved), 'name')}=obj))."
        )
    return out, renamed


class _Lenient:
    """strict=False for a model: load the keys both sides have, log the others."""

    kind = "module"

    def __init__(self, adapter: Any) -> None:
        self.adapter = adapter
        self.module = adapter.module

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.adapter.state_dict()

    def check_state(self, state: dict[str, Any], where: str = "model") -> None:
        live = self.module.state_dict()
        bad = [
            k
            for k in set(live) & set(state)
            if isinstance(state[k], torch.Tensor) and tuple(state[k].shape) != tuple(live[k].shape)
        ]
        if bad:
            raise StateMismatchError(f"{where!r}: shape mismatch even with strict=False: {sorted(bad)[:20]}")

    def load_state_dict(self, state: dict[str, torch.Tensor], where: str = "model") -> None:
        self.check_state(state, where)
        result = self.module.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            log.warning(
                "%s loaded with strict=False: missing %s, unexpected %s",
                where,
                result.missing_keys[:20],
                result.unexpected_keys[:20],
            )


# ---------------------------------------------------------------------------- open


class CheckpointView(Mapping[str, torch.Tensor]):
    """A verified checkpoint, read lazily: a mapping of tensor key → tensor
    (``"model/fc.weight"``, ``"optimizer/state/fc.weight/exp_avg"``; a multi-rank
    checkpoint's per-rank tensors under ``"rank-00001/…"``). Only the tensors you
    index are read. ``state(name)`` decodes one component's state tree."""

    def __init__(self, info: reader.CheckpointInfo, map_location: Any = None) -> None:
        assert info.manifest is not None
        self.path = info.path
        self.manifest: Manifest = info.manifest
        self.map_location = map_location
        self._entries: dict[str, tuple[str, Any, torch.dtype, int]] = {}
        for rel in sorted(self.manifest.files):
            for name in (TENSORS_FILE, SHARED_FILE):  # SHARED_FILE: an incremental checkpoint's
                if rel == name or rel.endswith("/" + name):
                    self._index(rel, rel[: -len(name)])

    def _index(self, rel: str, prefix: str) -> None:
        full = os.path.join(self.path, rel)
        layout, entries = snap_mod.stored_tensors(full)
        for e, dtype in entries:
            if prefix + e.key in self._entries:
                raise CorruptCheckpointError(
                    f"{full}: tensor {e.key!r} is also stored in another tensor file"
                )
            self._entries[prefix + e.key] = (full, e, dtype, layout.data_start)

    name = property(lambda self: self.manifest.name)
    step = property(lambda self: self.manifest.step)
    epoch = property(lambda self: self.manifest.epoch)
    metrics = property(lambda self: dict(self.manifest.metrics))

    def __getitem__(self, key: str) -> torch.Tensor:
        try:
            full, e, dtype, start = self._entries[key]
        except KeyError:
            raise KeyError(f"{key!r} is not a tensor of {self.path}") from None
        out = torch.empty(e.shape, dtype=dtype)
        if e.nbytes:
            view = out.reshape(-1).view(torch.uint8).numpy().data  # a writable 'B' memoryview
            fd = os.open(full, os.O_RDONLY | os.O_CLOEXEC)
            try:
                preadv_exactly(fd, [view], start + e.begin, full)
            finally:
                os.close(fd)
        return out if self.map_location is None else out.to(self.map_location)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def components(self) -> dict[str, str]:
        """Component name → kind (module, optimizer, scheduler, rng, progress…)."""
        return _saved_kinds(self.path)

    def state(self, component: str) -> Any:
        """One component's state tree (a model's is its ``state_dict()``), reading
        only the tensors it references."""
        raw = reader.load_state_json(self.path, STATE_FILE)["components"]
        if component not in raw:
            raise KeyError(f"{self.path} has no component {component!r}; it holds {sorted(raw)}")
        decoded = snap_mod.Decoder(self.__getitem__, dtensor.decode_ext).decode(
            raw[component]["state"], component
        )
        return decoded

    def __enter__(self) -> CheckpointView:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __repr__(self) -> str:
        return f"<guardian checkpoint {self.path} step={self.step} epoch={self.epoch} tensors={len(self)}>"


def open(  # noqa: A001 - guardian.open reads like the builtin on purpose
    path_or_run_dir: str | os.PathLike[str], *, which: str = "latest", map_location: Any = None
) -> CheckpointView:
    """A lazy, read-only, dict-like view of a verified checkpoint (see ``CheckpointView``).
    ``map_location`` moves each tensor read (``"cuda:0"``); default: CPU."""
    return CheckpointView(choose_verified(path_or_run_dir, which), map_location)


# ---------------------------------------------------------------------------- export


HF_WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"


def export_weights(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    which: str = "latest",
    component: str | None = None,
    hf_config: Any = None,
) -> str:
    """Write one model's weights as a plain safetensors file: exactly the keys of its
    ``state_dict()``, loadable with ``safetensors.torch.load_file`` and
    ``load_state_dict(strict=True)``. Returns the path written.

    ``component``: which model (default: the checkpoint's only one). ``hf_config``: a
    Hugging Face ``config.json`` path, a directory holding one, a dict or a
    ``PretrainedConfig`` — then ``out`` is a directory ``from_pretrained`` reads. A
    checkpoint written through ``guardian.integrations.transformers`` carries its
    config, so the directory layout is chosen automatically.
    """
    view = open(source, which=which)
    name = _model_component(view, component)
    state = view.state(name)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StateMismatchError(f"{view.path}: component {name!r} is not a model state_dict")
    weights = {k: v.contiguous() for k, v in state.items()}
    config = _hf_config_json(hf_config) if hf_config is not None else _saved_hf_config(view)
    out = os.fspath(out)
    if config is None:
        _write_safetensors(out, weights, view)
        log.info("exported %d tensors of %s (%s) to %s", len(weights), name, view.name, out)
        return out
    os.makedirs(out, exist_ok=True)
    _write_safetensors(os.path.join(out, HF_WEIGHTS), weights, view)
    _write_atomically(
        os.path.join(out, HF_CONFIG), (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    )
    log.info("exported %s (%s) as a Hugging Face model directory %s", name, view.name, out)
    return out


def _model_component(view: CheckpointView, component: str | None) -> str:
    kinds = view.components()
    modules = [n for n, k in kinds.items() if k == "module"]
    if component is not None:
        if kinds.get(component) != "module":
            raise StateMismatchError(
                f"{view.path}: {component!r} is not a model component; models: {modules}"
            )
        return component
    if len(modules) != 1:
        raise StateMismatchError(
            f"{view.path} holds {len(modules)} models ({modules}); choose one with component= (--component)"
        )
    return modules[0]


def _saved_hf_config(view: CheckpointView) -> dict[str, Any] | None:
    if "extra" not in view.components():
        return None
    extra = view.state("extra")
    config = extra.get("hf_config") if isinstance(extra, dict) else None
    return config if isinstance(config, dict) else None


def _hf_config_json(config: Any) -> dict[str, Any]:
    if isinstance(config, dict):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    path = os.fspath(config)
    if os.path.isdir(path):
        path = os.path.join(path, HF_CONFIG)
    with builtins.open(path, "rb") as f:
        return json.loads(f.read())


def _write_safetensors(path: str, weights: dict[str, torch.Tensor], view: CheckpointView) -> None:
    from safetensors.torch import save

    data = save(weights, metadata={"format": "pt", "guardian_checkpoint": view.name, "step": str(view.step)})
    _write_atomically(path, data)


def _write_atomically(path: str, data: bytes) -> None:
    """tmp file next to ``path`` → fsync → rename → fsync the directory: a crash
    leaves the old file or the new one, never half of it."""
    parent = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(parent)
