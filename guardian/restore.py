"""Restoring one checkpoint into live objects: the meta pass, the load, resharding.

The order of operations is the safety argument. **Meta pass** (``check_fits``): every
tensor is read as a *meta* tensor (shape and dtype only), the reserved components are
validated as hostile input (``state.validate``), and every component is checked
against the live objects; nothing live is touched, so a refused restore leaves the
model exactly as it was. **Load**: model tensors are read straight into the live
parameters; sharded state is rebuilt for this rank's placement from every saved
rank's pieces, so a run saved by N ranks resumes on M.

Choosing *which* checkpoint to restore is ``resume.py``'s.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from .distributed import World
from .errors import CorruptCheckpointError, StateMismatchError
from .format import manifest as manifest_mod
from .format import reader, safeio
from .format.hashing import hash_fd
from .format.layout import rank_prefix
from .saving import best_checkpoint
from .state import dtensor, sharded, validate
from .state import rng as rng_mod
from .state import snapshot as snap_mod
from .state.components import OptimizerState
from .state.discover import RESERVED

log = logging.getLogger(__name__)


@dataclass
class Restored:
    """What a resume put back, for the guard to take over."""

    path: str
    progress: dict[str, Any]
    rng: dict[str, Any]
    policy: dict[str, Any]
    extra: dict[str, Any]
    metrics: dict[str, float]
    generators: dict[str, Any] = field(default_factory=dict)  # generator components' states
    hparams: Any = None  # the optimizer settings the saving run's script constructed (hparams.py)

    def put_back_rng(self, loader: Any, components: dict[str, Any]) -> None:
        """Every RNG to its checkpointed value: called right before the first remaining
        batch of a resumed epoch (after the skipped batches' indices were drawn)."""
        rng_mod.restore_global(self.rng)
        # Not the loader's own generators: the epoch's iterator was re-created from their
        # epoch-start states and has drawn exactly what it drew before the checkpoint
        # (with workers, prefetching may already have made the epoch's last draw).
        for name, state in self.generators.items():
            components[name].load_state_dict(state)


class Restorer:
    """Loads checkpoints into ``components`` (name → adapter) on this rank of ``world``.
    ``partial``: the live components are a subset the caller picked (guardian.load);
    the checkpoint's other components are ignored, never an error."""

    def __init__(
        self, run_dir: str, components: dict[str, Any], world: World, *, strict: bool, partial: bool = False
    ) -> None:
        self.run_dir = run_dir
        self.components = components
        self.world = world
        self.strict = strict
        self.partial = partial
        # Keys of live model tensors that a load which then failed verification wrote
        # into: the next successful load must overwrite them all (``_check_undone``).
        self.overwritten: set[str] = set()

    def load(self, path: str, *, fits_checked: bool = False) -> Restored:
        """Load ``path`` into the live components (after the meta pass, skipped when
        the caller has just run it), verifying every file of it on the way: the tensor
        files are hashed as they stream into the tensors (one read), every other file
        before. No tensor is used until all of it verified; a CorruptCheckpointError
        may leave live parameters holding refused bytes (see ``overwritten``)."""
        if not fits_checked:
            self.check_fits(path)
        man = manifest_mod.read(path)
        parts = self.parts(path)
        streamed = {os.path.relpath(f, path) for prefix in parts for f in reader.tensor_files(path, prefix)}
        _verify_files(path, man, skip=streamed, only=parts if self.world.distributed else None)
        # Checked: the model tensors' bytes can now be read straight into the live
        # parameters and buffers (no second full copy of the weights in memory).
        live = snap_mod.capture(
            {n: (a.kind, a.state_dict()) for n, a in self.components.items() if a.kind == "module"}
        ).tensors
        loaded: dict[str, Any] = {}
        written: set[str] = set()
        try:
            for prefix in parts:
                loaded.update(
                    snap_mod.load(
                        path,
                        prefix,
                        into=live if not prefix else None,
                        hashes={rel: entry.hash for rel, entry in man.files.items()},
                        overwrites=written,
                    )
                )
        except BaseException:
            self.overwritten |= written
            raise
        self._check_undone(path, written)
        self._reshard(path, loaded)
        generators: dict[str, Any] = {}
        for name, adapter in self.components.items():
            if name not in loaded:
                continue
            state = loaded[name][1]
            if adapter.kind in ("module", "optimizer"):
                adapter.load_state_dict(state, name)
            else:
                adapter.load_state_dict(state)
            if adapter.kind == "generator":
                generators[name] = state
        return Restored(
            path=path,
            progress=loaded["progress"][1],
            rng=loaded["rng"][1],
            policy=loaded.get("policy", ("policy", {}))[1],
            extra=loaded.get("extra", ("extra", {}))[1],
            metrics=dict(man.metrics or {}),
            generators=generators,
            hparams=(man.extra or {}).get("hparams"),
        )

    def _check_undone(self, path: str, written: set[str]) -> None:
        """A refused load wrote into live parameters; this load undoes that only if it
        overwrote every one of them (then the model is bitwise what loading ``path``
        alone gives). Otherwise stop: continuing would train on refused bytes."""
        left = sorted(self.overwritten - written)
        if left:
            raise StateMismatchError(
                f"{path} has no value for {len(left)} model tensor(s) ({left[:5]}) that an earlier, refused "
                "checkpoint had already been loaded into; they hold bytes that failed verification. "
                "Restart the script (a fresh model) to resume from this checkpoint."
            )
        self.overwritten.clear()

    def check_fits(self, path: str) -> None:
        """Every check a resume needs, on shapes alone (meta tensors), before any live
        tensor is touched. Corrupt or forged contents raise CorruptCheckpointError
        (the checkpoint is set aside); a mismatch with the live objects raises
        StateMismatchError (the user's to fix)."""
        meta: dict[str, Any] = {}
        for prefix in self.parts(path):
            meta.update(
                {n: (k, dtensor.global_meta(t)) for n, (k, t) in snap_mod.load_meta(path, prefix).items()}
            )
        validate.check_restorable(meta, path)
        self._check_component_sets(meta, path)
        for name, adapter in self.components.items():
            if name not in meta:
                continue
            kind, state = meta[name]
            if kind != adapter.kind:
                raise StateMismatchError(
                    f"{path}: component {name!r} is a {kind} in the checkpoint but a {adapter.kind} here"
                )
            if hasattr(adapter, "check_state"):
                adapter.check_state(state, name)

    def _check_component_sets(self, loaded: dict[str, Any], path: str) -> None:
        saved = set(loaded) - RESERVED
        live = set(self.components)
        if saved == live or (self.partial and live <= saved):
            return
        if self.partial:
            raise StateMismatchError(
                f"{path} has no component {sorted(live - saved)}; it holds {sorted(saved)}."
            )
        msg = (
            f"{path} does not match what protect() found: only in the checkpoint: "
            f"{sorted(saved - live) or 'nothing'}; only here: {sorted(live - saved) or 'nothing'}."
        )
        if self.strict:
            raise StateMismatchError(
                msg
                + " Pass the same objects as the run that saved it, or protect(strict=False) to load what matches."
            )
        log.warning("%s Loading the components both have (strict=False).", msg)

    def _reshard(self, path: str, loaded: dict[str, Any]) -> None:
        """Sharded components (saved as per-rank shards, or loaded into a live sharded
        model) are rebuilt for this rank's placement from every saved rank's pieces —
        so a run saved by N ranks resumes on M (reading only the regions it needs)."""
        names = [
            n
            for n, (_kind, tree) in loaded.items()
            if n in self.components
            and (dtensor.contains_records(tree) or dtensor.contains_dtensor(self.components[n].state_dict()))
        ]
        if not names:
            return
        all_ranks = sharded.load_all_ranks(path, manifest_mod.read(path).world_size)
        for name in names:
            loaded[name] = (loaded[name][0], self._resharded(path, name, all_ranks))

    def _resharded(self, path: str, name: str, all_ranks: list[dict[str, Any]]) -> Any:
        adapter = self.components[name]
        trees = [rank_parts[name][1] for rank_parts in all_ranks if name in rank_parts]
        if not trees:
            raise CorruptCheckpointError(f"{path}: no rank holds component {name!r}")
        target_for = None
        if isinstance(adapter, OptimizerState):
            target_for = sharded.params_as_targets(adapter.named_params())
        return sharded.walk_pairs(trees, adapter.state_dict(), rank=self.world.rank, target_for=target_for)

    def parts(self, path: str) -> list[str]:
        """Which state files this rank reads: the top level, plus its own rank's part
        of a multi-rank checkpoint."""
        saved_ws = manifest_mod.read(path).world_size
        if saved_ws <= 1:
            return [""]
        if saved_ws != self.world.world_size:
            source = self.world.rank if self.world.rank < saved_ws else 0
            log.warning(
                "%s was saved by %d ranks and is resumed by %d; rank %d takes rank %d's RNG and "
                "data position — the run continues but is no longer bit-exact",
                path,
                saved_ws,
                self.world.world_size,
                self.world.rank,
                source,
            )
        else:
            source = self.world.rank
        return ["", rank_prefix(source, saved_ws)]

    # ------------------------------------------------------------------ best weights

    def restore_best(self, score: float | None = None) -> str | None:
        """Load the newest best checkpoint's weights into the live model(s); its path,
        or None (with a warning) when the run has no best checkpoint."""
        best = best_checkpoint(self.run_dir)
        if best is None:
            log.warning("restore_best requested but no best checkpoint exists in %s", self.run_dir)
            return None
        self.load_best_weights(best)
        log.info("restored the best weights from %s (score %s)", best, score)
        return best

    def load_best_weights(self, best: str) -> None:
        """Load the model weights of checkpoint ``best`` into the live model(s),
        resharded like a resume (DDP, FSDP2/DTensor, any world size)."""
        loaded: dict[str, Any] = {}
        for prefix in self.parts(best):
            loaded.update(snap_mod.load(best, prefix))
        modules = {
            n: v
            for n, v in loaded.items()
            if self.components.get(n) is not None and self.components[n].kind == "module"
        }
        self._reshard(best, modules)
        for name, (_kind, state) in modules.items():
            self.components[name].load_state_dict(state, name)


def _verify_files(path: str, man: manifest_mod.Manifest, skip: set[str], only: list[str] | None) -> None:
    """Hash every file of the checkpoint except ``skip`` (verified while loading):
    the state files, and other ranks' tensor files of a multi-rank checkpoint.
    ``only`` (prefixes): under torch.distributed rank 0 hashed the whole checkpoint
    before choosing it, so each rank checks just its own parts (not N ranks × N files)."""
    for rel, entry in sorted(man.files.items()):
        if rel in skip or (only is not None and not any(_in_part(rel, p) for p in only)):
            continue
        try:
            fd, _ = safeio.open_regular(path, rel)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{path}/{rel}: missing (listed in the manifest)") from None
        try:
            digest, size = hash_fd(fd)
        finally:
            os.close(fd)
        if (digest, size) != (entry.hash, entry.bytes):
            raise CorruptCheckpointError(
                f"{path}/{rel}: content hash {digest} ({size} bytes) does not match the manifest's "
                f"{entry.hash} ({entry.bytes} bytes) (corrupted)"
            )


def _in_part(rel: str, prefix: str) -> bool:
    return rel.startswith(prefix) and "/" not in rel[len(prefix) :]
