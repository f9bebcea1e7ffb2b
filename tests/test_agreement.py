"""Ranks agree on per-step flags without a blocking collective (guardian/agreement.py).

Real ranks (gloo on CPU). The worker at the bottom of this file counts every
collective the Python side issues — by wrapping ``torch.distributed``'s functions in
that worker: instrumentation of a real run, not a stand-in for anything — and writes
what it saw per rank. DDP's gradient all-reduce runs in C++ and is not counted.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import pytest
from helpers import final_digest, stderr_tails
from test_distributed import CFG, _env, _free_port, by_hand, torchrun

from guardian.agreement import LAG
from guardian.format import reader

pytestmark = pytest.mark.slow

STEPS_PER_EPOCH = 12  # ddp_job: 96 samples, 2 ranks, batches of 4
EPOCHS = CFG["epochs"]


def _two_ranks(*args: str, timeout: float = 240) -> list[subprocess.CompletedProcess]:
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(
                RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port
            ),
        )
        for r in range(2)
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def test_a_step_with_nothing_due_runs_no_blocking_collective(tmp_path):
    run, report = str(tmp_path / "run"), str(tmp_path / "calls")
    os.makedirs(report)
    results = _two_ranks("count", run, report)
    assert [r.returncode for r in results] == [0, 0], stderr_tails(results)
    for rank in range(2):
        with open(os.path.join(report, f"rank{rank}.json")) as f:
            seen = json.load(f)
        calls = seen["calls"]
        steps = seen["steps"]
        assert steps >= 20
        training = [c for c in calls if c["training_group"]]
        assert training == [], f"rank {rank}: blocking collectives on the training group: {training}"
        blocking = [c for c in calls if not c["async_op"]]
        assert blocking == [], f"rank {rank}: blocking collectives in steps: {blocking}"
        # at most one posted (asynchronous) agreement per step, on the private group
        posted = [c["step"] for c in calls]
        assert posted and posted == sorted(set(posted)), calls
        assert {c["op"] for c in calls} == {"all_reduce"}


def test_every_seconds_saves_are_taken_at_the_same_step_by_every_rank_and_not_repeated(tmp_path):
    """Only rank 1 is slow, so its clock says "due" first; both ranks must still save at
    the same step (a mismatch fails the commit protocol), and the flags posted before a
    save must not cause one more save right after it."""
    run, report = str(tmp_path / "run"), str(tmp_path / "calls")
    os.makedirs(report)
    results = _two_ranks("seconds", run, report)
    assert [r.returncode for r in results] == [0, 0], stderr_tails(results)
    infos = reader.list_checkpoints(run, verify=True)
    assert infos and all(i.valid for i in infos), [(i.name, i.problem) for i in infos]
    timed = sorted(i.manifest.step for i in infos if "seconds" in i.manifest.reason)
    assert len(timed) >= 2, [(i.name, i.manifest.reason) for i in infos]
    gaps = [b - a for a, b in zip(timed, timed[1:])]
    # every_seconds=0.4 at <= ~50 ms a step: >= 8 steps apart. A "due" posted before a
    # save and acted on after it (not dropped) would save again a period later.
    assert min(gaps) >= 8, timed


def _epoch_end(step: int) -> int:
    return -(-step // STEPS_PER_EPOCH) * STEPS_PER_EPOCH


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("agree") / "ref")
    proc = torchrun(run, CFG)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@pytest.mark.parametrize("case", range(2))
def test_sigterm_to_one_rank_at_a_random_step_checkpoints_both_at_one_step_and_resumes_bitwise(
    reference, tmp_path, case
):
    seed = int(os.environ.get("GUARDIAN_TEST_SEED", time.time_ns() % 100_000)) + case
    rng = random.Random(seed)
    term_rank, term_at = rng.randrange(2), rng.randrange(1, STEPS_PER_EPOCH * EPOCHS - LAG)
    why = f"seed {seed}: SIGTERM to rank {term_rank} at step {term_at}"
    run = str(tmp_path / "run")
    results = by_hand(run, CFG, TERM_RANK=str(term_rank), TERM_AT_STEP=str(term_at))
    assert [r.returncode for r in results] == [75, 75], f"{why}\n{stderr_tails(results)}"
    newest = reader.newest_valid(run)
    assert "preempt" in newest.manifest.reason, why
    # acted on a few steps later (agreement.py), at the latest where the epoch ends
    assert term_at <= newest.manifest.step <= _epoch_end(term_at), why
    assert all(i.valid for i in reader.list_checkpoints(run, verify=True)), why  # every rank's part
    proc = torchrun(run, CFG)
    assert proc.returncode == 0, f"{why}\n{stderr_tails(proc)}"
    assert final_digest(run) == final_digest(reference), why


# ---------------------------------------------------------------------- the worker


def _count_collectives(calls: list[dict], where: dict) -> None:
    import torch.distributed as dist

    for name in (
        "all_reduce",
        "broadcast",
        "all_gather",
        "all_gather_into_tensor",
        "reduce_scatter",
        "barrier",
    ):
        real = getattr(dist, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            if where["counting"]:
                group = kwargs.get("group")
                calls.append(
                    {
                        "op": _name,
                        "step": where["step"],
                        "training_group": group is None or group is dist.group.WORLD,
                        "async_op": bool(kwargs.get("async_op", False)),
                    }
                )
            return _real(*args, **kwargs)

        setattr(dist, name, counted)


def _worker(mode: str, run_dir: str, report: str) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    import guardian

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DDP(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls: list[dict] = []
    where = {"counting": False, "step": 0}
    _count_collectives(calls, where)
    # seconds: after a save the next post's flags are stale (dropped) and the one after
    # is acted on a period later, so saves are up to ~3 periods apart (a period is
    # ~0.25 s of steps): enough steps for several of them even when steps are fast
    steps = 24 if mode == "count" else 200
    options = {"every_steps": 10_000, "every_seconds": 3600.0, "save_on_exit": False}
    if mode == "seconds":
        options = {"every_seconds": 0.4, "save_on_exit": True, "keep_last": None}
    gen = torch.Generator().manual_seed(rank)
    with guardian.protect({"model": model, "optimizer": opt}, dir=run_dir, **options) as g:
        for step in range(1, steps + 1):
            x = torch.randn(4, 8, generator=gen)
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
            if mode == "seconds" and rank == 1:
                time.sleep(0.01 * (step % 5))  # rank 1's clock runs ahead of rank 0's view
            where["counting"], where["step"] = mode == "count", step
            g.step()
            where["counting"] = False
    with open(os.path.join(report, f"rank{rank}.json"), "w") as f:
        json.dump({"calls": calls, "steps": steps, "blocked_waits": g.agreement.blocked_waits}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(*sys.argv[1:4])
