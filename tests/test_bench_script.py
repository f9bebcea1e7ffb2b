"""`scripts/bench_checkpoint.py` is a contract (issue 4): its `--json` line carries the
ratios the issue names. A tiny run keeps the script from rotting; the figures
themselves are measured by running it for real, never asserted here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT

REQUIRED = (
    "stall_vs_torch_save",
    "effective_stall_vs_torch_save",
    "foreground_slowdown",
    "durable_vs_raw_disk",
    "save_speedup_vs_torch_save",
    "restore_cold_speedup_vs_torch_load",
    "restore_warm_speedup_vs_torch_load",
    "extra_rss_vs_state",
)


def run_json(script: str, *args: str) -> dict:
    """Run a benchmark script with ``--json``; its last line of output, parsed."""
    cmd = [sys.executable, os.path.join(ROOT, "scripts", script), *args, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_tiny_benchmark_prints_every_contract_field(tmp_path):
    summary = run_json(
        "bench_checkpoint.py",
        *(
            "--size-mb",
            "2",
            "--reps",
            "1",
            "--small-reps",
            "1",
            "--small-mb",
            "0.5",
            "--incremental-reps",
            "1",
        ),
        *("--dir", str(tmp_path / "bench")),
    )
    for key in REQUIRED:
        assert isinstance(summary[key], (int, float)) and summary[key] == summary[key], key  # not NaN
    assert summary["dcp"].startswith("ran"), summary["dcp"]  # the DCP child process worked
    assert "dcp_durable_vs_guardian_durable" in summary and "first_save_stall_s" in summary
    assert "overlap_stall_vs_torch_save_one_core_free" in summary  # overlap where a core is idle
    assert set(summary["targets_met"]) >= set(REQUIRED)
    assert not os.path.exists(tmp_path / "bench")  # the script cleans up after itself
    assert summary["staging_copy"]  # says which copy path the stall measured


def test_tiny_resume_benchmark_times_both_loads_in_fresh_processes(tmp_path):
    summary = run_json("bench_resume.py", "--size-mb", "2", "--reps", "1", "--dir", str(tmp_path / "resume"))
    assert summary["guardian_resume_warm_s"] > 0 and summary["torch_load_fresh_process_warm_s"] > 0
    assert len(summary["per_rep"]["guardian"]) == 1 and len(summary["per_rep"]["torch"]) == 1
    assert not os.path.exists(tmp_path / "resume")


@pytest.mark.slow
def test_tiny_integration_stall_scenario_prints_the_ratios(tmp_path):
    pytest.importorskip("lightning")
    pytest.importorskip("transformers")
    summary = run_json(
        "bench_checkpoint.py", "--integrations", "--size-mb", "1", "--reps", "1", "--dir", str(tmp_path / "b")
    )
    for key in ("plain_stall_s", "lightning_stall_s", "hf_stall_s", "lightning_vs_plain", "hf_vs_plain"):
        assert isinstance(summary[key], float) and summary[key] > 0, key
    assert set(summary["targets_met"]) == {"lightning_vs_plain", "hf_vs_plain"}
    assert not os.path.exists(tmp_path / "b")
