"""Exactness for every loop shape: a sample of the loop-shape generator in CI.

scripts/loopshapes.py draws training programs (where the scheduler steps, where
``report()`` sits, evaluation with dropout and its own RNG draws, accumulation,
manual saves, ``g.extra`` updates, early stopping, loaders with their own generators
and workers, sync and async saves), kills each at random points — SIGKILL at a step
or in the epoch body, SIGTERM to the process or its group during evaluation, a crash
at a named point of a save — resumes it and compares it bit for bit with its
uninterrupted twin. Here: a fixed sample of generated programs, every failure the
generator has found kept as a named regression case, and the harness's own check
that it does notice an inexact resume.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT

SCRIPTS = os.path.join(ROOT, "scripts")
sys.path.insert(0, SCRIPTS)

from loopshape_space import draw_program  # noqa: E402
from loopshapes import compare, program_seeds  # noqa: E402

CI_PROGRAMS = 30
CI_SEED = 11


def run_loopshapes(*args: str, timeout: float = 900) -> dict:
    proc = subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, "loopshapes.py"), *args, "--json"],
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no output (exit {proc.returncode}): {proc.stderr[-3000:]}"
    return json.loads(lines[-1])


def _shape(**overrides) -> dict:
    """A plain program: SGD, no scheduler, no monitor, an epoch save every epoch;
    each regression case below changes only what its failure needs."""
    shape = {
        "seed": 7,
        "batch_size": 4,
        "batches": 3,
        "partial": False,
        "epochs": 2,
        "workers": 0,
        "eval_workers": False,
        "loader_gen": "none",
        "augment": False,
        "dropout": 0.0,
        "batchnorm": False,
        "optimizer": "sgd",
        "scheduler": "none",
        "sched_at": "batch",
        "accumulate": 1,
        "carry_accumulation": False,
        "explicit_boundary": False,
        "eval_mode": "eval",
        "eval_rng": [],
        "report_mid": None,
        "report_before_step": None,
        "monitor": None,
        "patience": None,
        "restore_best": False,
        "extra": False,
        "manual_save": None,
        "every_steps": None,
        "every_epochs": 1,
        "async_save": False,
        "keep_last": None,
        "epoch_ops": ["eval"],
    }
    return {**shape, **overrides}


# Every failure the generator found on main, shrunk by `--minimize` to what it needs.
# Each resumes inexactly (or crashes) before the library's fix and exactly after.
def _case(label: int, kills: list[dict], **shape: object) -> dict:
    return {"seed": label, "shape": _shape(**{"seed": label, **shape}), "kills": kills}


def _fault(point: str, nth: int) -> dict:
    return {"how": "fault", "point": point, "nth": nth}


def _kill(how: str, where: str, target: str = "self", **at: int) -> dict:
    return {"how": how, "where": where, "target": target, **at}


REGRESSIONS: dict[str, dict] = {
    # A sampler's own generator is saved only in mid-epoch checkpoints: resumed at an
    # epoch boundary it restarts from its seed and the next epoch shuffles differently.
    "sampler_generator_at_epoch_boundary": _case(
        101, [_kill("sigkill", "after_gstep", step=4)], loader_gen="sampler", epochs=3
    ),
    # The same with the DataLoader's own generator= (shuffle=True).
    "loader_generator_at_epoch_boundary": _case(
        102, [_kill("sigkill", "after_gstep", step=4)], loader_gen="loader", epochs=3
    ),
    # The example: a per-epoch scheduler before report(); the best checkpoint is
    # committed, the process dies before the epoch checkpoint of the same step, and the
    # resume re-runs evaluation and scheduler.step() (lr stepped twice).
    "best_at_report_replays_the_epoch_body": _case(
        103,
        [_fault("save.parent_fsynced", 1)],
        scheduler="step",
        sched_at="epoch",
        monitor="val_loss",
        epoch_ops=["eval", "sched", "report"],
    ),
    # SIGTERM during evaluation: the preemption checkpoint was taken inside report(),
    # and the resume re-ran evaluation and the per-epoch scheduler.
    "sigterm_during_eval_replays_the_epoch_body": _case(
        104,
        [_kill("sigterm", "eval", epoch=0)],
        scheduler="exponential",
        sched_at="epoch",
        epoch_ops=["eval", "sched", "report"],
    ),
    # A manual g.save() after evaluation: resumed from it, evaluation ran again (its
    # DataLoader draws a base seed from the torch RNG: the RNG moved twice).
    "manual_save_in_epoch_body_replays_evaluation": _case(
        105,
        [_fault("save.parent_fsynced", 1)],
        manual_save="epoch",
        every_epochs=None,
        epoch_ops=["eval", "save"],
    ),
    # report() of the training loss before g.step(): the best checkpoint was taken there,
    # before the optimizer step of that batch but counting the batch as done.
    "best_before_gstep_is_taken_at_gstep": _case(
        106,
        [_fault("save.parent_fsynced", 2)],
        monitor="train_loss",
        report_before_step=1,
        every_epochs=None,
    ),
    # An accumulation running across the epoch end: the epoch checkpoint was taken with
    # gradients pending (not an optimizer boundary) and the resume lost them.
    "epoch_save_inside_an_accumulation": _case(
        107,
        [_kill("sigkill", "after_gstep", step=5)],
        accumulate=2,
        carry_accumulation=True,
        epochs=3,
    ),
    # Resumed from the checkpoint after the last epoch, the DataLoader's own generator
    # is never restored (position.py restores it lazily, at the next g.batches()): the
    # model is exact, the generator is left at its construction seed.
    "loader_generator_after_the_last_epoch": _case(
        109, [_fault("save.parent_fsynced", 2)], loader_gen="loader", every_epochs=1
    ),
    # DataLoader workers prefetch index batches, so by a mid-epoch checkpoint the
    # sampler has already drawn its end-of-epoch randperm from its own generator;
    # restoring that generator after the skipped batches makes the draw happen twice
    # and the next epoch shuffles differently.
    "sampler_generator_with_workers_mid_epoch": _case(
        110,
        [_kill("sigkill", "fetched", step=5)],
        workers=2,
        loader_gen="sampler",
        epochs=3,
        every_steps=4,
        every_epochs=None,
    ),
    # A preemption noticed at g.step() exits there, before the report() that follows
    # g.step() in the same iteration; the resume starts at the next batch, so that
    # report never runs (here: the best metric it set is missing).
    "preempted_at_gstep_skips_the_report_after_it": _case(
        111,
        [_kill("sigterm", "after_gstep", step=2)],
        seed=4207145805,  # its training loss at step 3 is a new best
        dropout=0.5,
        monitor="train_loss",
        report_mid=3,
    ),
    # Early stopping on a metric reported mid-epoch: the epoch's last value was reported
    # before the checkpoint (step 3) and nothing is reported after it; resumed there,
    # the epoch ends with no value, is not counted, and the run stops two epochs later.
    "early_stopping_loses_the_epoch_value_at_a_resume": _case(
        112,
        [_kill("sigkill", "epoch_end", epoch=0)],
        seed=203,
        dropout=0.5,
        extra=True,
        monitor="train_loss",
        report_mid=2,
        patience=1,
        epochs=4,
        every_steps=3,
        every_epochs=None,
    ),
    # A kill between the two commits of step 6: the checkpoint taken at g.step() is
    # committed, the one with the best metric that report() found right after g.step()
    # is not. Resumed at the next batch, that report never runs again: the best value
    # (and the best checkpoint) are lost.
    "best_reported_after_gstep_lost_between_two_commits": _case(
        113,
        [_fault("save.parent_fsynced", 3)],
        seed=1824404093,
        batches=5,
        dropout=0.5,
        loader_gen="loader",
        eval_rng=["python", "torch"],
        monitor="train_loss",
        report_mid=3,
        every_steps=3,
        every_epochs=None,
    ),
    # SIGTERM to the whole process group (Slurm) while DataLoader workers run: the
    # workers die first and the run crashed with "DataLoader worker ... killed".
    "sigterm_to_the_group_with_workers": _case(
        108, [_kill("sigterm", "after_gstep", target="group", step=9)], workers=2, batches=6, epochs=2
    ),
}


def test_draws_are_reproducible():
    seeds = program_seeds(CI_SEED, 5)
    assert seeds == program_seeds(CI_SEED, 5)
    assert [draw_program(s) for s in seeds] == [draw_program(s) for s in seeds]
    assert len({json.dumps(draw_program(s), sort_keys=True) for s in seeds}) == 5


def test_compare_names_what_differs():
    twin = {
        "state": {"model/w": "a", "scheduler/last_epoch": "3"},
        "reports": [{"epoch": 1, "step": 6, "batch": 3, "values": {"val_loss": "0x1p-1"}}],
        "start": {"epoch": 0},
    }
    same = json.loads(json.dumps(twin))
    assert compare(twin, same) == []
    replayed = json.loads(json.dumps(twin))
    replayed["state"]["scheduler/last_epoch"] = "4"
    replayed["reports"].append(dict(twin["reports"][0]))
    diffs = compare(twin, replayed)
    assert any(d.startswith("scheduler/last_epoch: twin '3' resumed '4'") for d in diffs), diffs
    assert any("metrics reported after epoch 0 differ" in d for d in diffs), diffs


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_harness_notices_an_inexact_resume():
    """Noise from an unseeded RNG breaks rule 5: twin and resumed run must differ."""
    program = {
        "seed": 1,
        "shape": _shape(unseeded_noise=True),
        "kills": [{"how": "sigkill", "where": "after_gstep", "step": 4, "target": "self"}],
    }
    summary = run_loopshapes("--program", json.dumps(program))
    assert summary["programs"] == 1
    assert summary["kills"] == 1
    assert summary["inexact"] == 1, summary
    assert any(w.startswith("model/") for w in summary["failures"][0]["what"]), summary["failures"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_generated_programs_resume_exactly():
    summary = run_loopshapes("--programs", str(CI_PROGRAMS), "--seed", str(CI_SEED), "--jobs", "2")
    assert summary["programs"] == CI_PROGRAMS
    assert summary["kills"] >= CI_PROGRAMS // 2, summary
    assert summary["failures"] == [], json.dumps(summary["failures"], indent=1)[:8000]
    assert summary["inexact"] == 0


@pytest.fixture(scope="module")
def regression_results() -> dict[int, dict]:
    """All regression cases in one harness process (one torch import), by seed."""
    args = [arg for case in REGRESSIONS.values() for arg in ("--program", json.dumps(case))]
    summary = run_loopshapes(*args)
    failures = {f["seed"]: f for f in summary["failures"]}
    return {r["seed"]: {**r, "failure": failures.get(r["seed"])} for r in summary["results"]}


# Cases still open on main when this file was written, with where the cause lies.
# Strict: once the library is fixed the case passes, the xfail fails, and the entry
# must go — so this list can never silently hide a regression.
# Regression cases still inexact on main, each with its cause (strict: a fix turns it red
# until it is removed from here). All five found by the generator were fixed in 0.2.0.
OPEN: dict[str, str] = {}


def _params():
    for name in sorted(REGRESSIONS):
        marks = [pytest.mark.xfail(strict=True, reason=OPEN[name])] if name in OPEN else []
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", list(_params()))
def test_regression(name, regression_results):
    case = REGRESSIONS[name]
    result = regression_results[case["seed"]]
    assert result["failure"] is None, json.dumps(result["failure"], indent=1)[:6000]
    assert result["kills"] >= 1, f"{name}: the kill never happened, so nothing was tested"
