from __future__ import annotations

import os
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
