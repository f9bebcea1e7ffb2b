"""``guardian history``, ``guardian plot`` and the progress bar of ``guardian verify``,
through the real command line (a pseudo-terminal where a terminal matters)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest
from click.testing import CliRunner
from test_history_resume import run_job

from guardian.cli import main
from guardian.history.csvfile import HistoryFile

GUARDIAN = [sys.executable, "-m", "guardian.cli"]


@pytest.fixture
def small_run(tmp_path) -> str:
    run = str(tmp_path / "run")
    os.mkdir(run)
    f = HistoryFile(os.path.join(run, "history.csv"), [])
    for step in range(1, 5):
        f.append(step, 0, step, {"loss": 1.0 / step}, 1000.0 + step)
    f.append(4, 0, 5, {"val, loss": float("nan")}, 1005.0)
    f.close()
    with open(os.path.join(run, "history.csv"), "ab") as out:
        out.write(b"5,0,1006.0,6,0.2")  # torn last line
    return run


def test_history_table_json_csv_and_metric_choice(small_run):
    runner = CliRunner()
    table = runner.invoke(main, ["history", small_run])
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["STEP", "EPOCH", "loss", "val,", "loss"]  # "val, loss" is one column
    assert len(lines) == 6 and "nan" in lines[-1]
    assert "incomplete last line" in table.stderr

    out = json.loads(runner.invoke(main, ["history", small_run, "--json", "--metrics", "val, loss"]).stdout)
    assert out["metrics"] == ["val, loss"]
    assert [r["values"] for r in out["rows"]] == [{"val, loss": "nan"}]
    assert out["skipped"] and "line 7" in out["skipped"][0]

    csv_out = runner.invoke(main, ["history", small_run, "--csv", "--metrics", "loss"]).stdout
    assert csv_out.splitlines()[0] == "step,epoch,wall_time,tick,loss"
    assert csv_out.splitlines()[1] == "1,0,1001.000,1,1.0"


def test_unknown_metric_suggests_the_close_one(small_run):
    result = CliRunner().invoke(main, ["history", small_run, "--metrics", "los"])
    assert result.exit_code == 2
    assert "no metric 'los'" in result.stderr and "did you mean 'loss'?" in result.stderr


def test_no_history_is_exit_4(tmp_path):
    result = CliRunner().invoke(main, ["history", str(tmp_path)])
    assert result.exit_code == 4 and "no history.csv" in result.stderr


def test_plot_of_a_killed_and_resumed_run(tmp_path):
    """The PNG of a run killed mid-epoch and resumed: one panel per metric, restart,
    checkpoint and best marks (the picture is in the report; here, its structure)."""
    pytest.importorskip("matplotlib")
    run = str(tmp_path / "run")
    assert run_job(run, KILL_AT_STEP="17").returncode == -signal.SIGKILL
    assert run_job(run).returncode == 0
    png = str(tmp_path / "curves.png")
    result = CliRunner().invoke(main, ["plot", run, "-m", "loss", "-m", "val_loss", "-o", png])
    assert result.exit_code == 0, result.output
    import matplotlib.image

    height, width = matplotlib.image.imread(png).shape[:2]
    assert width == 1200 and height > 600  # two panels at 120 dpi
    events = [json.loads(line) for line in open(os.path.join(run, "history-events.jsonl"))]
    assert [e["step"] for e in events if e["event"] == "restart"] == [16]
    assert any("best" in e["reasons"] for e in events if e["event"] == "checkpoint")


# ---------------------------------------------------------------------------- progress


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory) -> str:
    """A valid checkpoint of just over 1 GiB (one float32 tensor of 2**28 elements)."""
    from fault_helpers import save_checkpoint

    run = str(tmp_path_factory.mktemp("big") / "run")
    os.mkdir(run)
    return save_checkpoint(run, 1, numel=2**28)


def run_in_pty(args: list[str], timeout: float = 300) -> str:
    """Run ``args`` with stdout and stderr on a pseudo-terminal; everything it drew."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))  # a 100-column terminal
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if not ready:
            if proc.poll() is not None:
                break
            continue
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        out += data
    os.close(master)
    assert proc.wait(timeout=max(deadline - time.monotonic(), 1)) == 0, out.decode(errors="replace")
    return out.decode(errors="replace")


@pytest.mark.slow
def test_verify_of_a_1gb_checkpoint_draws_a_bar_on_a_terminal_only(big_checkpoint):
    drawn = run_in_pty([*GUARDIAN, "verify", big_checkpoint])
    assert re.search(r"verifying:\s+\d+%\|", drawn), drawn
    # the bar knows the size it hashes (1.00G); a rate is drawn only if hashing outlasts
    # tqdm's redraw interval, which a warm page cache may not
    assert re.search(r"/1\.0+G", drawn) or "GiB" in drawn or "MiB" in drawn, drawn
    assert "1 of 1 checkpoint(s) valid" in drawn

    as_json = run_in_pty([*GUARDIAN, "verify", big_checkpoint, "--json"])
    assert "verifying" not in as_json and "%|" not in as_json
    assert json.loads(as_json)["valid"] is True

    piped = subprocess.run([*GUARDIAN, "verify", big_checkpoint], capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0
    assert "verifying" not in piped.stderr + piped.stdout and "%|" not in piped.stderr
    assert piped.stdout.splitlines()[-1] == "1 of 1 checkpoint(s) valid"
