"""The checkpoint commands: ls, verify, inspect (in-process with click's runner, and
one real subprocess to prove `guardian --help` never imports torch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import guardian
from guardian.cli import main


@pytest.fixture
def run_dir(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    with guardian.protect(model=model, optimizer=opt, dir=str(tmp_path), every_steps=1, monitor="loss") as g:
        for i in range(3):
            model(torch.randn(2, 3)).sum().backward()
            opt.step()
            g.step()
            g.report(loss=1.0 / (i + 1))
    return str(tmp_path)


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_ls_json_fields(run_dir):
    r = invoke("ls", run_dir, "--json")
    assert r.exit_code == 0
    rows = json.loads(r.output)
    assert rows and {"name", "step", "epoch", "metrics", "reason", "valid", "bytes"} <= set(rows[0])
    assert rows[-1]["metrics"]["loss"] == pytest.approx(1 / 3)
    assert all(r["valid"] for r in rows)


def test_ls_table_reads_well(run_dir):
    r = invoke("ls", run_dir)
    assert r.exit_code == 0
    lines = r.output.splitlines()
    assert lines[0].split()[:4] == ["NAME", "STEP", "EPOCH", "REASON"]
    assert "step-000000003" in r.output and "loss=0.3333" in r.output


def test_ls_missing_dir(tmp_path):
    r = CliRunner().invoke(main, ["ls", str(tmp_path / "nope")])
    assert r.exit_code == 4 and "no such directory" in r.output


def test_verify_ok_and_corrupt(run_dir):
    assert invoke("verify", run_dir).exit_code == 0
    newest = sorted(n for n in os.listdir(run_dir) if n.startswith("step-"))[-1]
    victim = os.path.join(run_dir, newest, "state.json")
    with open(victim, "r+b") as f:
        f.seek(5)
        f.write(b"#")
    r = CliRunner().invoke(main, ["verify", run_dir])
    assert r.exit_code == 3
    assert victim in r.output and "does not match" in r.output
    r = CliRunner().invoke(main, ["verify", os.path.join(run_dir, newest), "--json"])
    assert r.exit_code == 3 and json.loads(r.output)["valid"] is False


def test_inspect_json_digests(run_dir):
    r = invoke("inspect", run_dir, "--json")
    assert r.exit_code == 0
    out = json.loads(r.output)
    assert out["name"] == "step-000000003-1" or out["step"] == 3
    assert set(out["components"]) >= {"model", "optimizer", "rng", "progress", "policy"}
    assert all(len(c["digest"]) == 32 for c in out["components"].values())
    assert out["components"]["model"]["tensors"] == 2
    assert out["components"]["model"]["bytes"] == (6 + 2) * 4
    same = json.loads(invoke("inspect", out["path"], "--json").output)
    assert same["digest"] == out["digest"]


def test_help_does_not_import_torch():
    code = "import sys; from guardian.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_did_you_mean():
    r = CliRunner().invoke(main, ["verfy", "x"])
    assert r.exit_code == 2 and "Did you mean 'verify'" in r.output
