"""Resuming: choose a checkpoint, prove it can be restored, load it, reshard it.

The order of operations is the safety argument:

1. **Choose** (rank 0): the newest checkpoint whose bytes verify *and* whose contents
   pass the meta pass below. A checkpoint that fails either is corrupt or forged
   (hashes are unkeyed, so a forger can re-hash): it is set aside — never deleted —
   and the next older one is tried. If checkpoints exist and none can be restored,
   resume stops with an error naming them rather than silently starting from step 0.
2. **Meta pass**: every tensor is read as a *meta* tensor (shape and dtype only) and
   every component is checked against the live objects; nothing live is touched, so
   a refused resume leaves the model exactly as it was.
3. **Load**: model tensors are read straight into the live parameters; sharded state
   is rebuilt for this rank's placement from every saved rank's pieces.

Under ``torch.distributed`` the other ranks take rank 0's choice by name.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from . import commit, knobs
from .distributed import World
from .errors import CheckpointNotFoundError, CorruptCheckpointError, GuardianError, StateMismatchError
from .format import manifest as manifest_mod
from .format import reader
from .format.layout import rank_prefix
from .saving import best_checkpoint
from .state import data as data_pos
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
        saved = self.progress.get("loader_generators") or []
        for gen, state in zip(data_pos.loader_generators(loader), saved, strict=bool(saved)):
            gen.set_state(state)
        for name, state in self.generators.items():
            components[name].load_state_dict(state)


class Resumer:
    def __init__(
        self,
        run_dir: str,
        components: dict[str, Any],
        world: World,
        *,
        strict: bool,
        partial: bool = False,
        remote: str | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.components = components
        self.world = world
        self.strict = strict
        # partial: the live components are a subset the caller picked (guardian.load);
        # the checkpoint's other components are ignored, never an error.
        self.partial = partial
        self.seq = 0  # the highest manifest seq seen: new saves continue after it
        self.remote = remote  # replicate_to: asked when the run directory has no checkpoint

    def resume(self, request: Any, on_load: Any = None) -> Restored | None:
        """Choose and load (every rank the same checkpoint); None: start fresh."""
        chosen = self.choose(request)
        if chosen is None:
            return None
        if on_load is not None:
            on_load()
        if not self.world.distributed:
            restored = self.load(chosen)
        else:
            restored = self._load_agreed(chosen)
        rng_mod.restore_global(restored.rng)
        p = restored.progress
        where = f", batch {p['batch_in_epoch']} of the epoch" if p.get("epoch_start") is not None else ""
        log.info("resumed from %s (epoch %d, step %d%s)", chosen, p["epoch"], p["global_step"], where)
        return restored

    def _load_agreed(self, chosen: str) -> Restored:
        restored, error = None, None
        try:
            restored = self.load(chosen)
        except GuardianError as e:
            error = e
        if not self.world.agree_ok(error is None):
            if error is not None:
                raise error
            raise StateMismatchError(
                f"rank {self.world.rank}: another rank could not resume from {chosen}; see its log"
            )
        assert restored is not None
        return restored

    # ------------------------------------------------------------------ choosing

    def choose(self, request: Any) -> str | None:
        """The checkpoint every rank resumes from (None: start fresh)."""
        chosen, error = None, None
        if self.world.is_leader:
            try:
                chosen = self._choose_here(knobs.resume_from() or request)
            except GuardianError as e:
                if not self.world.distributed:
                    raise
                error = e
        if self.world.distributed:
            chosen = self._follow_leader(chosen, request, failed=error is not None)
            if error is not None:
                raise error
        return chosen

    def _choose_here(self, request: Any) -> str | None:
        existing = reader.list_checkpoints(self.run_dir)
        self.seq = max((i.manifest.seq for i in existing if i.manifest), default=0)
        if request is False:
            for info in existing:
                commit.set_aside(self.run_dir, info.name, "protect(resume=False): starting fresh")
            return None
        if request is True:
            if not existing and self.remote:  # a new node: the remote tier has the run
                return self._from_remote()
            return self._newest_restorable(existing)
        return self._named(str(request), existing)

    def _from_remote(self) -> str | None:
        """Download the newest remote checkpoint that verifies and passes the meta pass."""
        from .remote.fetch import fetch_restorable

        chosen = fetch_restorable(str(self.remote), self.run_dir, self._why_unusable)
        if chosen is not None:
            self.seq = max(self.seq, manifest_mod.read(chosen).seq)
        return chosen

    def first_restorable(
        self, candidates: list[reader.CheckpointInfo]
    ) -> tuple[str | None, list[tuple[str, str]]]:
        """Read-only: the first of ``candidates`` that verifies and fits the live
        objects, and (name, why) for each one refused before it. Writes nothing."""
        refused: list[tuple[str, str]] = []
        for info in candidates:
            problem = self._why_unusable(info.path)
            if problem is None:
                return info.path, refused
            refused.append((info.name, problem))
        return None, refused

    def _newest_restorable(self, existing: list[reader.CheckpointInfo]) -> str | None:
        chosen, refused = self.first_restorable(list(reversed(existing)))
        for name, why in refused:
            log.error("checkpoint %s cannot be used and will be set aside: %s", name, why)
        if chosen is not None:
            for name, why in refused:  # only now: an older checkpoint is known to be good
                commit.set_aside(self.run_dir, name, why[:500])
            return chosen
        if refused:
            names = ", ".join(n for n, _ in refused)
            raise CorruptCheckpointError(
                f"{self.run_dir} holds {len(refused)} checkpoint(s) and none can be restored ({names}). "
                "Nothing was set aside and nothing was trained. `guardian verify` shows what is wrong "
                "with each; to start fresh anyway, pass protect(resume=False) (they are set aside, "
                "never deleted) or choose another dir=.",
                [f"{n}: {w}" for n, w in refused],
            )
        return None

    def _why_unusable(self, path: str) -> str | None:
        """None if ``path`` verifies and passes the meta pass; else why not. A
        mismatch with the live objects is the user's to fix: it raises."""
        checked = reader.inspect_checkpoint(path, verify=True)
        if checked.format_error is not None:  # newer format, not corrupt: never set it aside
            raise checked.format_error
        if not checked.valid:
            return "failed verification: " + "; ".join(checked.problems)
        try:
            self.check_fits(path)
        except CorruptCheckpointError as e:
            return f"verifies but cannot be restored: {e}"
        return None

    def _named(self, request: str, existing: list[reader.CheckpointInfo]) -> str:
        path = request if os.path.isdir(request) else os.path.join(self.run_dir, request)
        if not os.path.isdir(path):
            raise CheckpointNotFoundError(f"resume={request!r}: no such checkpoint (looked for {path})")
        checked = reader.inspect_checkpoint(path, verify=True)
        if checked.format_error is not None:
            raise checked.format_error
        if not checked.valid:
            raise CorruptCheckpointError(
                f"cannot resume from {path}: " + "; ".join(checked.problems), checked.problems
            )
        self.check_fits(path)
        newer = [
            i for i in existing if i.manifest and checked.manifest and i.manifest.seq > checked.manifest.seq
        ]
        if os.path.dirname(os.path.realpath(path)) == os.path.realpath(self.run_dir):
            for info in newer:
                commit.set_aside(self.run_dir, info.name, f"superseded: resuming from older {checked.name}")
        return path

    def _follow_leader(self, chosen: str | None, request: Any, failed: bool) -> str | None:
        """Rank 0 chose (and verified, and set aside what was corrupt); the others take
        its answer by name, so every rank resumes from the same checkpoint."""
        code = 1 if failed else 0
        name = os.path.basename(chosen.rstrip("/")) if chosen else ""
        encoded = list(name.encode()[:255].ljust(256, b"\0")) if self.world.is_leader else [0] * 256
        outside = int(
            bool(chosen) and os.path.dirname(os.path.realpath(chosen)) != os.path.realpath(self.run_dir)
        )
        code, self.seq, outside, *encoded = self.world.broadcast_ints([code, self.seq, outside, *encoded])
        if code and not self.world.is_leader:
            raise CheckpointNotFoundError(
                f"rank {self.world.rank}: rank 0 could not choose a checkpoint to resume from; its log says why"
            )
        name = bytes(b for b in encoded if b).decode()
        if not name or code:
            return None
        if outside:  # an explicit path outside the run dir: every rank was given the same request
            return chosen if self.world.is_leader else str(knobs.resume_from() or request)
        return os.path.join(self.run_dir, name)

    # ------------------------------------------------------------------ loading

    def load(self, path: str) -> Restored:
        """Load ``path`` into the live components (after the meta pass)."""
        self.check_fits(path)
        # Checked: the model tensors' bytes can now be read straight into the live
        # parameters and buffers (no second full copy of the weights in memory).
        live = snap_mod.capture(
            {n: (a.kind, a.state_dict()) for n, a in self.components.items() if a.kind == "module"}
        ).tensors
        loaded: dict[str, Any] = {}
        for prefix in self.parts(path):
            loaded.update(snap_mod.load(path, prefix, into=live if not prefix else None))
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
        man = reader.inspect_checkpoint(path, verify=False).manifest
        return Restored(
            path=path,
            progress=loaded["progress"][1],
            rng=loaded["rng"][1],
            policy=loaded.get("policy", ("policy", {}))[1],
            extra=loaded.get("extra", ("extra", {}))[1],
            metrics=dict((man.metrics if man else {}) or {}),
            generators=generators,
            hparams=(man.extra or {}).get("hparams") if man else None,
        )

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
