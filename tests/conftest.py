from __future__ import annotations

import json
import os
import shutil
import sys
import threading

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

os.environ.setdefault("GUARDIAN_QUIET", "1")


@pytest.fixture(autouse=True)
def no_thread_leaks():
    """watchdog's habit: every test must stop the threads it starts."""
    before = {t.ident for t in threading.enumerate()}
    yield
    leaked = [t for t in threading.enumerate() if t.ident not in before and t.is_alive() and not t.daemon]
    assert not leaked, f"threads leaked by this test: {leaked}"


@pytest.fixture
def python() -> str:
    return sys.executable


# ---------------------------------------------------------------- damaged-checkpoint tests
# test_corruption.py and test_hostile.py damage copies of the same small run.


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A run directory with two good checkpoints (steps 1 and 2), built once per module."""
    from fault_helpers import save_checkpoint

    run = str(tmp_path_factory.mktemp("template") / "run")
    os.mkdir(run)
    save_checkpoint(run, 1)
    save_checkpoint(run, 2)
    return run


@pytest.fixture
def run(template, tmp_path):
    """A private copy of ``template`` that a test may damage."""
    dest = str(tmp_path / "run")
    shutil.copytree(template, dest, symlinks=True)
    return dest


def soak() -> bool:
    """GUARDIAN_SOAK=1: run the soak tests at their full size (minutes each)."""
    return os.environ.get("GUARDIAN_SOAK", "") not in ("", "0")


# ---------------------------------------------------------------- test order
# scripts/test.sh runs the files on two xdist workers (--dist loadfile
# --no-loadscope-reorder), handing out files in collection order as workers free up.
# Longest first keeps one long file from starting last and running alone: the wall
# time is then close to half the total. The seconds per file come from a recorded run
# (GUARDIAN_RECORD_DURATIONS=1 rewrites the file); they only order, never select.

DURATIONS_FILE = os.path.join(TESTS, "durations.json")
_recorded: dict[str, float] = {}


def _longest_files_first(items) -> None:
    try:
        with open(DURATIONS_FILE) as f:
            seconds = {str(k): float(v) for k, v in json.load(f).items()}
    except (OSError, ValueError, AttributeError):
        return
    unknown = sorted(seconds.values())[len(seconds) // 2] if seconds else 0.0  # a new file: the median
    items.sort(key=lambda item: -seconds.get(item.nodeid.split("::")[0], unknown))  # stable: files stay whole


def pytest_runtest_logreport(report):
    if os.environ.get("GUARDIAN_RECORD_DURATIONS") == "1":
        path = report.nodeid.split("::")[0]
        _recorded[path] = _recorded.get(path, 0.0) + report.duration


def pytest_sessionfinish(session):
    if _recorded and not hasattr(session.config, "workerinput"):  # the controller writes it once
        with open(DURATIONS_FILE, "w") as f:
            json.dump({k: round(v, 1) for k, v in sorted(_recorded.items())}, f, indent=0)
            f.write("\n")


def pytest_collection_modifyitems(config, items):  # noqa: ARG001 - pytest's hook signature
    _longest_files_first(items)
    if soak():
        return
    skip = pytest.mark.skip(
        reason="soak test: run with GUARDIAN_SOAK=1 (its measured result is in the issue note)"
    )
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)
