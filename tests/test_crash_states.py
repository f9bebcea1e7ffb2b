"""Crash-state enumeration of the commit protocol (ALICE / CrashMonkey style, no FUSE).

A save (and a retention deletion) is run once through a recording ``FS``. Then, for
every prefix of the recorded operations, every on-disk state a power cut could leave
(see tests/crash_model.py for the rules) is built in a scratch directory and recovered
with the torch-free reader. Each must recover the previous good checkpoint or the new
one: never garbage, never neither, never a checkpoint that ``commit()`` had already
acknowledged. Mutated logs (an fsync dropped) prove the check has teeth.

The second half crashes a real subprocess at every named fault point
(``GUARDIAN_FAULT``) and recovers in a fresh process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field

import pytest
from crash_model import CrashModel, RecordingFS, materialize, tree_digest
from fault_helpers import PYTHON, REPO, recover_in_fresh_process, save_checkpoint, save_raw_checkpoint, use_fs

from guardian.commit import clean_stale, delete_checkpoint
from guardian.faults import FAULT_EXIT_CODE, POINTS
from guardian.format.layout import TRASH_PREFIX, checkpoint_name, parse_checkpoint_name
from guardian.format.reader import list_checkpoints, newest_valid

STEP1, STEP2 = checkpoint_name(1), checkpoint_name(2)


# ----------------------------------------------------------------------------- checker


@dataclass
class Expectations:
    """What may and must be on disk after a crash, derived from the op-log prefix."""

    base: set[str]
    saving: set[str]
    committed: set[str] = field(default_factory=set)  # commit() returned
    deleting: set[str] = field(default_factory=set)  # rename to .trash- happened
    deleted: set[str] = field(default_factory=set)  # delete_checkpoint() returned

    def key(self) -> tuple:
        return tuple(frozenset(s) for s in (self.committed, self.deleting, self.deleted))

    def see(self, op: tuple) -> None:
        if op[0] == "mark":
            what, _, name = op[1].partition(":")
            (self.committed if what == "committed" else self.deleted).add(name)
        elif op[0] == "rename" and os.path.basename(op[2]).startswith(TRASH_PREFIX):
            self.deleting.add(op[1])


def violations(run_dir: str, exp: Expectations) -> list[str]:
    listed = list_checkpoints(run_dir, verify=True)
    bad = [f"garbage checkpoint {i.name}: {i.problems}" for i in listed if not i.valid]
    valid = {i.name for i in listed if i.valid}
    best = newest_valid(run_dir)
    if best is None:
        bad.append(f"no valid checkpoint at all (listed: {sorted(i.name for i in listed)})")
    elif best.name not in exp.base | exp.saving:
        bad.append(f"recovered unknown checkpoint {best.name}")
    must = (exp.base | exp.committed) - exp.deleting
    if missing := must - valid:
        bad.append(f"acknowledged checkpoint(s) lost: {sorted(missing)}")
    if resurrected := exp.deleted & {i.name for i in listed}:
        bad.append(f"deleted checkpoint(s) came back: {sorted(resurrected)}")
    if best is not None and must and best.name not in must | exp.saving:
        bad.append(f"recovered {best.name}, older than acknowledged {sorted(must)}")
    return bad


@dataclass
class Stats:
    prefixes: int = 0
    states: int = 0  # crash states enumerated (with repeats)
    distinct: int = 0  # distinct on-disk trees recovered and checked
    failures: list[str] = field(default_factory=list)


def enumerate_crashes(model: CrashModel, ops: list[tuple], exp: Expectations, scratch: str) -> Stats:
    stats = Stats()
    seen: set[tuple] = set()
    for k in range(len(ops) + 1):
        if k:
            model.apply(ops[k - 1])
            exp.see(ops[k - 1])
        stats.prefixes += 1
        for tree in model.crash_trees():
            stats.states += 1
            # The same tree may need a different verdict once more has been acknowledged.
            digest = (tree_digest(tree), exp.key())
            if digest in seen:
                continue
            seen.add(digest)
            stats.distinct += 1
            materialize(tree, scratch)
            for v in violations(scratch, exp):
                if len(stats.failures) < 20:
                    last = ops[k - 1][:2] if k else ("<start>",)
                    stats.failures.append(f"after op {k} {last}: {v}; tree={sorted(tree)}")
    return stats


def report(label: str, stats: Stats) -> None:
    print(
        f"\n[crash states] {label}: {stats.prefixes} op-log prefixes, {stats.states} crash states "
        f"enumerated, {stats.distinct} distinct on-disk states recovered and checked"
    )


def record(run: str, action) -> list[tuple]:
    rec = RecordingFS(run)
    with use_fs(rec):
        action(rec)
    return rec.ops


def save_step2(rec: RecordingFS) -> None:
    save_checkpoint(rec.root, 2)
    rec.mark(f"committed:{STEP2}")


def delete_step1(rec: RecordingFS) -> None:
    delete_checkpoint(rec.root, STEP1)
    rec.mark(f"deleted:{STEP1}")


@pytest.fixture
def run(tmp_path):
    run = str(tmp_path / "run")
    os.mkdir(run)
    save_checkpoint(run, 1)
    return run


# ------------------------------------------------------------------ enumerated power cuts


def test_every_crash_state_of_a_save_recovers(run, tmp_path):
    model = CrashModel(run)
    ops = record(run, save_step2)
    assert [o[0] for o in ops].count("fsync") == 3 and ops[-2] == ("fsync_dir", ".")
    stats = enumerate_crashes(model, ops, Expectations({STEP1}, {STEP2}), str(tmp_path / "state"))
    report("save over a committed checkpoint", stats)
    assert not stats.failures, "\n".join(stats.failures)
    assert stats.prefixes == len(ops) + 1
    assert stats.states >= 150 and stats.distinct >= 50, stats


def test_every_crash_state_of_a_retention_delete_recovers(run, tmp_path):
    save_checkpoint(run, 2)
    model = CrashModel(run)
    ops = record(run, delete_step1)
    stats = enumerate_crashes(model, ops, Expectations({STEP1, STEP2}, set()), str(tmp_path / "state"))
    report("retention delete after a save", stats)
    assert not stats.failures, "\n".join(stats.failures)
    assert stats.states >= 40 and stats.distinct >= 15, stats


def test_every_crash_state_of_save_then_retention_recovers(run, tmp_path):
    # Leftovers of an earlier crash must be ignored by readers and removed by clean_stale.
    os.makedirs(os.path.join(run, ".tmp-step-000000002-999-dead"))
    with open(os.path.join(run, ".tmp-step-000000002-999-dead", "tensors.safetensors"), "wb") as f:
        f.write(b"\0" * 100)
    os.makedirs(os.path.join(run, ".trash-step-000000000-dead"))
    model = CrashModel(run)

    def action(rec: RecordingFS) -> None:
        clean_stale(rec.root)
        save_step2(rec)
        delete_step1(rec)

    ops = record(run, action)
    stats = enumerate_crashes(model, ops, Expectations({STEP1}, {STEP2}), str(tmp_path / "state"))
    report("clean_stale + save + retention delete", stats)
    assert not stats.failures, "\n".join(stats.failures)
    assert stats.states >= 1400 and stats.distinct >= 300, stats


def _drop(ops: list[tuple], pred) -> list[tuple]:
    idx = max(i for i, op in enumerate(ops) if pred(op))
    return ops[:idx] + ops[idx + 1 :]


MUTANTS = {
    # A writer that never fsyncs a data file publishes a checkpoint that can be garbage.
    "no fsync of tensors file": lambda op: op[0] == "fsync" and op[1].endswith("tensors.safetensors"),
    # A writer that skips fsync of the temp dir can publish a dir with missing entries.
    "no fsync of the temp dir": lambda op: op[0] == "fsync_dir" and op[1].startswith(".tmp-"),
    # A writer that skips the parent fsync (LazyFS would not notice) loses an acknowledged save.
    "no fsync of the run dir after rename": lambda op: op == ("fsync_dir", "."),
}


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_enumeration_catches_a_broken_protocol(mutant, run, tmp_path):
    model = CrashModel(run)
    ops = _drop(record(run, save_step2), MUTANTS[mutant])
    stats = enumerate_crashes(model, ops, Expectations({STEP1}, {STEP2}), str(tmp_path / "state"))
    report(f"mutant '{mutant}'", stats)
    assert stats.failures, f"the crash-state checker did not notice: {mutant}"


# ------------------------------------------------------------- named fault points (kill)

SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from fault_helpers import save_raw_checkpoint
from guardian.commit import delete_checkpoint
save_raw_checkpoint(sys.argv[1], 2)
delete_checkpoint(sys.argv[1], {step1!r})
"""

FAULTS = [p for p in POINTS if p.startswith(("save.", "retention."))]
FAULTS += ["save.file_written@2", "save.file_fsynced@2"]  # the second file (state.json)


def test_fault_point_list_is_covered():
    assert {f.split("@")[0] for f in FAULTS} == {p for p in POINTS if p.startswith(("save.", "retention."))}


@pytest.mark.parametrize("fault", FAULTS)
def test_killed_at_fault_point_recovers(fault, tmp_path):
    run = str(tmp_path / "run")
    os.mkdir(run)
    save_raw_checkpoint(run, 1)
    env = dict(os.environ, GUARDIAN_FAULT=fault)
    proc = subprocess.run(
        [PYTHON, "-c", SCRIPT.format(tests=os.path.join(REPO, "tests"), step1=STEP1), run],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == FAULT_EXIT_CODE, f"fault point {fault} never reached: {proc.stderr}"
    assert f"injected fault at {fault.split('@')[0]}" in proc.stderr

    seen = recover_in_fresh_process(run)
    assert all(not p for p in seen["listed"].values()), f"garbage after kill at {fault}: {seen}"
    entries = os.listdir(run)
    if fault.startswith("save.") and fault not in ("save.renamed", "save.parent_fsynced"):
        assert seen["newest"] == STEP1 and STEP2 not in entries
        assert any(e.startswith(".tmp-") for e in entries)  # a leftover the next writer removes
    elif fault.startswith("save."):
        assert seen["newest"] == STEP2 and set(seen["listed"]) == {STEP1, STEP2}
    else:
        assert seen["newest"] == STEP2 and set(seen["listed"]) == {STEP2}
        assert any(e.startswith(TRASH_PREFIX) for e in entries) == (fault == "retention.renamed")

    # The next writer cleans up and carries on.
    clean_stale(run)
    assert not [e for e in os.listdir(run) if e.startswith((".tmp-", TRASH_PREFIX))]
    save_raw_checkpoint(run, 3)
    best = newest_valid(run)
    assert best is not None and best.name == checkpoint_name(3)
    assert all(parse_checkpoint_name(i.name) and i.valid for i in list_checkpoints(run, verify=True))
    shutil.rmtree(run)
