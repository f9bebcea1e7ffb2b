"""The space of generated training programs and kills, drawn from one seed.

A program is ``{"seed": S, "shape": {...}, "kills": [...]}``: ``draw_program(S)``
always draws the same one, so a failure is reproduced from its seed alone (and kept
as a regression case by writing its dict down, which does not depend on this file
staying the same).

Shape keys (read by loopshape_program.py):
  batches, partial, batch_size, epochs — data and loop length (``partial``: a last
      batch of half size);
  workers, eval_workers, loader_gen ("none" | "loader" | "sampler": the DataLoader's
      or the sampler's own ``torch.Generator``), augment (random noise per sample);
  dropout, batchnorm, optimizer, scheduler, sched_at ("batch" | "epoch");
  accumulate, carry_accumulation (an accumulation runs across the epoch end instead
      of stepping at the last batch), explicit_boundary (``g.step(boundary=...)``);
  eval_mode ("train": dropout and BatchNorm statistics active in evaluation),
      eval_rng (draws from numpy / python / torch / an own generator in evaluation);
  report_mid (report the training loss right after every k-th ``g.step()``),
      report_before_step (report it before every k-th ``g.step()``),
      epoch_ops (the epoch body in order: eval, report, sched, plateau, extra, save, stop);
  monitor, patience, restore_best, extra (``g.extra`` counters), manual_save
      ("mid": ``g.save()`` after every 4th step), every_steps, every_epochs,
      async_save, keep_last.

Kill keys: how ("sigkill" | "sigterm" at a point of the loop; "fault": the
``GUARDIAN_FAULT`` point ``point@nth``; "moment": SIGKILL to the process group after
``fraction`` of the uninterrupted run's wall time), where / step / epoch, target
("self" | "group").
"""

from __future__ import annotations

import random
from typing import Any

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "adadelta")
SCHEDULERS = ("none", "step", "exponential", "cosine", "cyclic", "onecycle", "plateau", "warmup")
SAVE_FAULTS = (
    "save.tmpdir_created",
    "save.file_written",
    "save.before_manifest",
    "save.manifest_written",
    "save.renamed",
    "save.parent_fsynced",  # right after a commit: "between two commits of the same step"
    "save.parent_fsynced",
)


def draw_program(seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    shape = draw_shape(rng, seed)
    return {"seed": seed, "shape": shape, "kills": draw_kills(rng, shape)}


def draw_shape(rng: random.Random, seed: int) -> dict[str, Any]:
    s: dict[str, Any] = {"seed": seed, "batch_size": 4}
    s["batches"] = rng.randint(3, 6)
    s["partial"] = rng.random() < 0.3
    s["epochs"] = rng.randint(2, 4)
    s["workers"] = 2 if rng.random() < 0.25 else 0
    s["eval_workers"] = bool(s["workers"]) and rng.random() < 0.5
    s["loader_gen"] = rng.choice(("none", "none", "loader", "sampler"))
    s["augment"] = rng.random() < 0.5
    s["dropout"] = rng.choice((0.0, 0.2, 0.5))
    s["batchnorm"] = rng.random() < 0.5
    s["optimizer"] = rng.choice(OPTIMIZERS)
    s["scheduler"] = rng.choice(SCHEDULERS)
    if s["scheduler"] == "plateau":
        s["sched_at"] = "epoch"
    else:
        s["sched_at"] = rng.choice(("batch", "epoch"))
    s["accumulate"] = rng.choice((1, 1, 2, 3))
    s["carry_accumulation"] = s["accumulate"] > 1 and rng.random() < 0.3
    s["explicit_boundary"] = rng.random() < 0.3
    s["eval_mode"] = rng.choice(("train", "eval"))
    s["eval_rng"] = sorted(x for x in ("numpy", "python", "torch", "own_gen") if rng.random() < 0.4)
    s["report_mid"] = rng.choice((None, None, None, 2, 3))
    s["report_before_step"] = rng.choice((None, None, None, None, 2, 3))
    report_end = rng.random() < 0.8
    monitors: list[str | None] = [None]
    if report_end:
        monitors += ["val_loss", "val_loss"]
    if s["report_mid"] or s["report_before_step"]:
        monitors.append("train_loss")
    s["monitor"] = rng.choice(monitors)
    s["patience"] = rng.choice((None, 0, 1, 2)) if s["monitor"] else None
    s["restore_best"] = rng.random() < 0.7
    s["extra"] = rng.random() < 0.7
    s["manual_save"] = rng.choice((None, None, "epoch", "mid"))
    s["every_steps"] = rng.choice((None, 2, 3, 5))
    s["every_epochs"] = rng.choice((None, 1, 1, 2))
    s["async_save"] = rng.random() < 0.5
    s["keep_last"] = rng.choice((None, 2, 3))
    s["epoch_ops"] = draw_epoch_ops(rng, s, report_end)
    return s


def draw_epoch_ops(rng: random.Random, s: dict[str, Any], report_end: bool) -> list[str]:
    """The epoch body: evaluation first among the metric users; the per-epoch
    scheduler, ``g.extra`` updates and a manual save anywhere around them."""
    ops = ["eval"]
    if report_end:
        ops.append("report")
    if s["scheduler"] == "plateau":
        ops.insert(rng.randint(1, len(ops)), "plateau")
    elif s["scheduler"] != "none" and s["sched_at"] == "epoch":
        ops.insert(rng.randint(0, len(ops)), "sched")
    if s["extra"]:
        ops.insert(rng.randint(1, len(ops)), "extra")
    if s["manual_save"] == "epoch":
        ops.insert(rng.randint(0, len(ops)), "save")
    if s["patience"] is not None and rng.random() < 0.5:
        ops.append("stop")
    return ops


def draw_kills(rng: random.Random, shape: dict[str, Any]) -> list[dict[str, Any]]:
    """One to three kills in a row, at increasing points of the run where they are
    placed by step (a later kill may land before the resume point and not fire)."""
    per_epoch = shape["batches"] + (1 if shape["partial"] else 0)
    total = per_epoch * shape["epochs"]
    count = rng.choice((1, 1, 1, 2, 2, 3))
    steps = sorted(rng.randint(1, total) for _ in range(count))
    return [draw_kill(rng, shape, step, per_epoch) for step in steps]


def draw_kill(rng: random.Random, shape: dict[str, Any], step: int, per_epoch: int) -> dict[str, Any]:
    kind = rng.choices(
        ("step_kill", "epoch_kill", "term_eval", "term_step", "fault", "moment"),
        weights=(25, 10, 15, 10, 30, 10),
    )[0]
    epoch = min((step - 1) // per_epoch, shape["epochs"] - 1)
    target = rng.choice(("self", "group"))
    if kind == "step_kill":
        phases = ["fetched", "before_gstep", "after_gstep"] + (
            ["after_report"] if shape["report_mid"] else []
        )
        return {"how": "sigkill", "where": rng.choice(phases), "step": step, "target": target}
    if kind == "epoch_kill":
        return {
            "how": "sigkill",
            "where": rng.choice(("eval", "epoch_end")),
            "epoch": epoch,
            "target": target,
        }
    if kind == "term_eval":
        return {"how": "sigterm", "where": "eval", "epoch": epoch, "target": target}
    if kind == "term_step":
        phase = rng.choice(("fetched", "before_gstep", "after_gstep"))
        return {"how": "sigterm", "where": phase, "step": step, "target": target}
    if kind == "fault":
        return {"how": "fault", "point": rng.choice(SAVE_FAULTS), "nth": rng.randint(1, 4)}
    return {"how": "moment", "fraction": round(rng.uniform(0.15, 0.95), 3)}


def describe_kill(kill: dict[str, Any]) -> str:
    how = kill["how"]
    if how == "fault":
        return f"GUARDIAN_FAULT={kill['point']}@{kill['nth']}"
    if how == "moment":
        return f"SIGKILL to the group at {kill['fraction']:.0%} of the twin's time"
    at = f"step {kill['step']}" if "step" in kill else f"epoch {kill['epoch']}"
    return f"{how.upper()} to {kill.get('target', 'self')} at {kill['where']} of {at}"
