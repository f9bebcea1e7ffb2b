"""Shared helpers for the core tests: digests of runs and subprocess training."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from guardian.format import reader

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def final_digest(run_dir: str) -> tuple[str, dict[str, str]]:
    """(checkpoint digest, per-component digests) of the newest valid checkpoint."""
    info = reader.newest_valid(run_dir)
    assert info is not None, f"no valid checkpoint in {run_dir}"
    comps = reader.component_summaries(info.path, info.manifest)
    return reader.checkpoint_digest(comps), {k: v["digest"] for k, v in comps.items()}


def run_trainlib(
    run_dir: str, cfg: dict, env: dict | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "GUARDIAN_QUIET": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, os.path.join(TESTS, "trainlib.py"), run_dir, json.dumps(cfg)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )


def stderr_tails(results, n: int = 3000) -> str:
    """Each process's exit code and the end of its stderr, as one string: pytest prints
    a string message whole but shortens a list or tuple to one line, which once hid the
    only evidence of a failure seen on a loaded machine."""
    if isinstance(results, subprocess.CompletedProcess):
        results = [results]
    return "\n".join(f"--- process {i}: exit {r.returncode}\n{r.stderr[-n:]}" for i, r in enumerate(results))
