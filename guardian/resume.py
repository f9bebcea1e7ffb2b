"""Resuming: choose the checkpoint a run continues from, then restore it (``restore.py``).

Choosing (rank 0): the newest checkpoint whose bytes verify *and* whose contents pass
the restorer's meta pass. A checkpoint that fails either is corrupt or forged (hashes
are unkeyed, so a forger can re-hash): it is set aside — never deleted — once an older
one is known to be good. If checkpoints exist and none can be restored, resume stops
with an error naming them rather than silently starting from step 0. Under
``torch.distributed`` the other ranks take rank 0's choice by name, and every rank
must restore it successfully, or all stop.

One read in one process: the candidate gets the manifest and size checks and the
meta pass, then the load hashes the bytes as they stream into the tensors. A
checkpoint refused there counts as one that failed verification, and the next older
one is loaded over it (``Restorer.overwritten`` checks that it overwrites all the
refused one wrote). Under ``torch.distributed`` rank 0 still hashes before choosing
(a rank must not fall back alone), and the load verifies again.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from . import commit, knobs
from .distributed import World
from .errors import CheckpointNotFoundError, CorruptCheckpointError, GuardianError, StateMismatchError
from .format import manifest as manifest_mod
from .format import reader
from .restore import Restored, Restorer
from .state import rng as rng_mod

log = logging.getLogger(__name__)


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
        self.world = world
        self.restorer = Restorer(run_dir, components, world, strict=strict, partial=partial)
        self.check_fits = self.restorer.check_fits
        self.load = self.restorer.load
        self.seq = 0  # the highest manifest seq seen: new saves continue after it
        self.remote = remote  # replicate_to: asked when the run directory has no checkpoint
        self._loaded: Restored | None = None  # chosen by loading it (one read)
        self._on_load: Any = None

    def resume(self, request: Any, on_load: Any = None) -> Restored | None:
        """Choose and load (every rank the same checkpoint); None: start fresh."""
        self._on_load = on_load
        chosen = self.choose(request)
        if chosen is None:
            return None
        if self._loaded is not None and self._loaded.path == chosen:
            restored = self._loaded
        elif not self.world.distributed:
            self._announce_load()
            restored = self.load(chosen)
        else:
            self._announce_load()
            restored = self._load_agreed(chosen)
        rng_mod.restore_global(restored.rng)
        p = restored.progress
        where = f", batch {p['batch_in_epoch']} of the epoch" if p.get("epoch_start") is not None else ""
        log.info("resumed from %s (epoch %d, step %d%s)", chosen, p["epoch"], p["global_step"], where)
        return restored

    def _announce_load(self) -> None:
        if self._on_load is not None:
            self._on_load()
            self._on_load = None

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
            if not self.world.distributed:
                return self._load_newest(existing)
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

    def _load_newest(self, existing: list[reader.CheckpointInfo]) -> str | None:
        """One process: choose by loading. Each candidate, newest first, gets the
        cheap checks and the meta pass, then a load that verifies while reading."""
        refused: list[tuple[str, str]] = []
        for info in reversed(existing):
            problem = self._why_unusable(info.path, deep=False)
            if problem is None:
                try:
                    self._announce_load()
                    self._loaded = self.restorer.load(info.path, fits_checked=True)
                except CorruptCheckpointError as e:
                    problem = f"failed verification while loading: {e}"
                else:
                    return self._chosen(info.path, refused)
            log.error(
                "checkpoint %s cannot be used (set aside once an older one loads): %s", info.name, problem
            )
            refused.append((info.name, problem))
        return self._chosen(None, refused)

    def _newest_restorable(self, existing: list[reader.CheckpointInfo]) -> str | None:
        chosen, refused = self.first_restorable(list(reversed(existing)))
        for name, why in refused:
            log.error("checkpoint %s cannot be used (set aside once an older one loads): %s", name, why)
        return self._chosen(chosen, refused)

    def _chosen(self, chosen: str | None, refused: list[tuple[str, str]]) -> str | None:
        """Set the refused aside once ``chosen`` is known to be good; with none good,
        stop with an error naming every refused checkpoint."""
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
                "never deleted) or choose another dir=." + self._overwritten_note(),
                [f"{n}: {w}" for n, w in refused],
            )
        return None

    def _overwritten_note(self) -> str:
        if not self.restorer.overwritten:
            return ""
        return (
            " The model's parameters were partly overwritten while loading a refused checkpoint: "
            "rebuild the model (restart the script) before training it."
        )

    def _why_unusable(self, path: str, *, deep: bool = True) -> str | None:
        """None if ``path`` verifies (hashes too when ``deep``) and passes the meta
        pass; else why not. A mismatch with the live objects is the user's to fix:
        it raises."""
        checked = reader.inspect_checkpoint(path, verify=deep)
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
