"""``guardian run --nproc-per-node N``: the daemon supervises a torchrun group.

Real ``guardian watch``, real torchrun, two gloo ranks on CPU. What is checked: one
rank SIGKILLed → the whole group (ranks and their child processes) is torn down and
restarted as a crash; every rank exiting 75 → torchrun exits 1, the daemon requeues
without using the budget; ``guardian status`` shows nproc.
"""

from __future__ import annotations

import os
import sys

import psutil
import pytest
from daemon_jobs.harness import HERE, Daemon, cli, env_with, events, status, wait_for

DDP = os.path.join(HERE, "ddp_job.py")

pytest.importorskip("torch.distributed")


@pytest.fixture
def home(tmp_path) -> str:
    return str(tmp_path / "home")


def register(home: str, name: str, run_dir: str, nproc: int, *argv: str, **env: str) -> None:
    cli(
        home,
        "run",
        "--name",
        name,
        "--dir",
        run_dir,
        "--nproc-per-node",
        str(nproc),
        "--",
        *argv,
        env=env_with(**env),
    )


def run_to_end(home: str, name: str, timeout: float = 120) -> dict:
    d = Daemon(home).start()
    try:
        return wait_for(
            lambda: (s := status(home, name))["state"] in ("done", "failed", "incomplete", "held") and s,
            timeout,
            f"job {name} to end",
            interval=0.3,
        )
    finally:
        d.stop()


def exits(home: str, name: str) -> list[dict]:
    return [e for e in events(home, name) if e["event"] == "exit"]


def test_run_records_nproc_and_the_torchrun_command(home, tmp_path):
    run = str(tmp_path / "run")
    register(home, "spec", run, 3, "python", DDP, "--flag", "x")
    s = status(home, "spec")
    assert s["nproc"] == 3
    python, *rest = s["argv"]
    assert os.path.dirname(python) == os.path.dirname(sys.executable)  # the venv's interpreter
    assert rest == [
        "-m", "torch.distributed.run", "--standalone",
        "--nproc-per-node", "3", "--max-restarts=0", DDP, "--flag", "x",
    ]  # fmt: skip
    assert "nproc=3" in cli(home, "status").stdout
    bad = cli(home, "run", "--name", "bad", "--nproc-per-node", "0", "--", DDP, check=False)
    assert bad.returncode == 2 and "nproc-per-node" in bad.stderr


@pytest.mark.slow
def test_a_rank_killed_restarts_the_whole_group(home, tmp_path):
    run = str(tmp_path / "run")
    register(home, "ddp", run, 2, DDP, DDP_MODE="kill", DDP_WORKERS="1")
    final = run_to_end(home, "ddp")
    assert final["state"] == "done", final
    assert final["attempts"] == 2 and final["nproc"] == 2
    ex = exits(home, "ddp")
    assert [e["classification"] for e in ex] == ["crash", "done"]
    assert "rank 1 killed by signal 9" in ex[0]["reason"], ex[0]
    # every rank of attempt 1 and every "DataLoader worker" they started is gone
    for rank in (0, 1):
        with open(os.path.join(run, f"workers-a1-r{rank}.pid")) as f:
            pid = int(f.read())
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    for rank in (0, 1):
        with open(os.path.join(run, f"progress-r{rank}.txt")) as f:
            assert f.read() == "40"


@pytest.mark.slow
def test_all_ranks_exiting_75_is_a_requeue(home, tmp_path):
    run = str(tmp_path / "run")
    register(home, "rq", run, 2, DDP, DDP_MODE="requeue")
    final = run_to_end(home, "rq")
    assert final["state"] == "done", final
    ex = exits(home, "rq")
    assert [e["classification"] for e in ex] == ["requeue", "done"]
    assert ex[0]["exit_code"] == 1  # torchrun's own code; the ranks said 75
    assert final["failures_without_progress"] == 0


# ---------------------------------------------------------------------------- units: torchrun's exit

SUMMARY = """Traceback (most recent call last):
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
w.py FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-22_02:06:13
  rank      : 0 (local_rank: 0)
  exitcode  : {r0} (pid: 6538)
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  rank      : 1 (local_rank: 1)
  exitcode  : {r1} (pid: 6539)
============================================================"""


def facts(r0: int, r1: int, run_state: str | None = None):
    from guardian.daemon import launch, policy

    lines = SUMMARY.format(r0=r0, r1=r1).splitlines()
    return policy.ExitFacts(
        exit_code=1, signal=None, run_state=run_state, error_type=policy.error_type_from_stderr(lines),
        made_progress=True, nproc=2, rank_exits=launch.rank_exits(lines),
    )  # fmt: skip


def test_rank_exits_put_the_root_cause_first():
    from guardian.daemon import launch

    assert list(launch.rank_exits(SUMMARY.format(r0=-15, r1=-9).splitlines()).items()) == [(1, -9), (0, -15)]
    assert launch.rank_exits(["no summary here"]) == {}


@pytest.mark.parametrize(
    ("r0", "r1", "run_state", "expected", "why"),
    [
        (75, 75, "preempted", "requeue", "all 2 failed rank(s) exited 75"),
        (75, -9, "preempted", "crash", "rank 1 killed by signal 9"),  # survivors checkpointed: still a crash
        (1, 1, "failed", "crash", "rank 1 exit 1"),
    ],
)
def test_torchrun_exit_is_classified_by_its_ranks(r0, r1, run_state, expected, why):
    from guardian.daemon import policy

    v = policy.classify(facts(r0, r1, run_state))
    assert v.classification == expected and why in v.reason
    assert v.uses_budget is (expected == "crash")


def test_no_summary_falls_back_to_run_json():
    from guardian.daemon import policy

    f = policy.ExitFacts(1, None, "preempted", None, False, nproc=2, rank_exits={})
    assert policy.classify(f).classification == "requeue"
    f = policy.ExitFacts(1, None, "running", None, False, nproc=2, rank_exits={})
    assert policy.classify(f).classification == "crash"


def test_the_ranks_error_not_torchruns_decides_permanence():
    from guardian.daemon import policy

    lines = [
        "Traceback (most recent call last):",
        "ImportError: no module x",
        *SUMMARY.format(r0=1, r1=1).splitlines(),
    ]
    assert policy.error_type_from_stderr(lines) == "ImportError"


@pytest.mark.parametrize(
    ("command", "tail"),
    [
        (["train.py", "-x"], ["train.py", "-x"]),
        (["python3", "-m", "pkg.train"], ["-m", "pkg.train"]),
        (["./run.sh", "a"], ["--no-python", "./run.sh", "a"]),
    ],
)
def test_torchrun_argv(command, tail):
    from guardian.daemon import launch

    argv = launch.torchrun_argv(2, command, python="/py")
    assert argv == [
        "/py",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "--max-restarts=0",
        *tail,
    ]
