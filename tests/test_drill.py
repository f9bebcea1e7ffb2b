"""The kill drill, small: a few trials of scripts/drill.py inside the test suite.

The full drill (`python scripts/drill.py --trials 100 --json`) takes tens of minutes; its
figures are in the README. Here: one random kill and one kill timed to land inside a
save, with every check of the full drill.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT


@pytest.mark.slow
def test_drill_small(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "scripts", "drill.py"),
            "--trials",
            "2",
            "--seed",
            "5",
            "--ballast",
            "1024",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["trials"] == 2
    assert summary["failures"] == [], summary["failures"]
    assert summary["lost_checkpoints"] == 0
    assert summary["resumed_exact"] == 2
    assert proc.returncode == 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_drill_crashes_inside_saves_resume_exactly():
    """Deterministic trials: each run crashes at a named point of one of its saves
    (GUARDIAN_FAULT, drawn from the seed), then runs again to the end; every re-run
    must end bit-for-bit equal to the uninterrupted run and lose no committed
    checkpoint. Kills timed from outside (the test above) reach the same points only
    by chance; these reach them every time."""
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "scripts", "drill.py"),
            "--trials",
            "4",
            "--seed",
            "3",
            "--ballast",
            "256",
            "--faults",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["killed"] == 4, proc.stderr[-2000:]
    assert summary["failures"] == [], summary["failures"]
    assert summary["resumed_exact"] == 4
    assert proc.returncode == 0
