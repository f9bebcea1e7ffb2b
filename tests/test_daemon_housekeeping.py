"""Housekeeping: bounded logs and attempts, with real restarts of a real looping job."""

from __future__ import annotations

import os

import pytest
from daemon_jobs.harness import Daemon, cli, status, wait_for

from guardian.daemon import housekeeping
from guardian.daemon import registry as reg
from guardian.daemon.records import Attempt, JobState


def du(path: str) -> int:
    total = 0
    for root, dirs, files in os.walk(path):
        for name in files + dirs:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass  # removed while we walked
    return total


@pytest.mark.soak  # about 6 minutes: GUARDIAN_SOAK=1 runs it
@pytest.mark.timeout(2400)  # a thousand real attempts, each a real process
def test_a_job_exiting_75_a_thousand_times_keeps_the_daemon_directory_under_its_size(tmp_path):
    home = str(tmp_path / "home")
    n = int(os.environ.get("GUARDIAN_TEST_REQUEUES", "1000"))
    limit = 64 << 10  # log_max_bytes: each log, events.jsonl and daemon.log stay under twice this
    keep = 5
    d = Daemon(
        home,
        GUARDIAN_DAEMON_MAX_REQUEUES=str(n + 10),
        GUARDIAN_DAEMON_MAX_RESTARTS=str(n + 10),
        GUARDIAN_DAEMON_BACKOFF_BASE="0",
        GUARDIAN_DAEMON_BACKOFF_MAX="0",
        GUARDIAN_DAEMON_KEEP_ATTEMPTS=str(keep),
        GUARDIAN_DAEMON_LOG_MAX_BYTES=str(limit),
    ).start()
    try:
        line = f'echo "attempt $GUARDIAN_ATTEMPT: checkpointed, restart me"; [ "$GUARDIAN_ATTEMPT" -ge {n} ] || exit 75'
        cli(home, "run", "--name", "loop", "--dir", str(tmp_path / "run"), "--", "sh", "-c", line)
        biggest = 0

        def ended() -> JobState | None:
            nonlocal biggest
            biggest = max(biggest, du(home))  # sampled all along, not only at the end
            st = reg.load_state(reg.Home(home), "loop")
            return st if st is not None and st.state == "incomplete" else None

        st = wait_for(ended, 60 + 2.0 * n, f"{n} attempts", interval=1.0)
        s = status(home, "loop")
        assert s["state"] == "incomplete" and s["attempts"] == n  # the last one exits 0 without a marker
        budget = 6 * limit + 64 * 1024  # 3 rotated files × 2 + state, job and attempt files
        assert biggest < budget, f"the daemon's directory reached {biggest} bytes (budget {budget})"
        kept = sorted(os.listdir(os.path.join(home, "jobs", "loop", "attempts")))
        assert kept[0] == "0001" and len(kept) <= keep + 2, kept
        if n >= 300:  # enough decisions to pass the limit
            assert os.path.exists(os.path.join(home, "jobs", "loop", "events.jsonl.1")), (
                "events.jsonl rotated"
            )
        assert st.started == n
    finally:
        d.stop()


def attempt(n: int, cls: str) -> Attempt:
    return Attempt(n=n, boot_id="b", started=0.0, classification=cls)


def test_pruning_keeps_first_latest_failure_and_last_n(tmp_path):
    h = reg.Home(str(tmp_path / "home")).ensure()
    classes = ["crash", "requeue", "crash", *["requeue"] * 10]
    st = JobState(name="j", attempts=[attempt(i + 1, c) for i, c in enumerate(classes)])
    for a in st.attempts:
        os.makedirs(h.attempt_dir("j", a.n))
    removed = housekeeping.prune(h, st, keep=3, max_bytes=1 << 20)
    assert [a.n for a in st.attempts] == [1, 3, 11, 12, 13]
    assert sorted(os.listdir(os.path.join(h.job_dir("j"), "attempts"))) == [
        "0001",
        "0003",
        "0011",
        "0012",
        "0013",
    ]
    assert removed == 8


def test_rotation_of_a_log_still_being_appended(tmp_path):
    path = tmp_path / "stderr.log"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, b"x" * 2000)
    assert housekeeping.rotate(str(path), 1000, move=False)
    os.write(fd, b"after\n")
    os.close(fd)
    assert path.read_bytes() == b"after\n" and (tmp_path / "stderr.log.1").stat().st_size == 2000
