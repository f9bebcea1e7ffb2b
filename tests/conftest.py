from __future__ import annotations

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


def pytest_collection_modifyitems(config, items):  # noqa: ARG001 - pytest's hook signature
    if soak():
        return
    skip = pytest.mark.skip(
        reason="soak test: run with GUARDIAN_SOAK=1 (its measured result is in the issue note)"
    )
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)
