"""Every refusal: its exit code and its message, through the CLI."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from test_migrate_support import trained, write_ckpt

import guardian.migrate as M
from guardian.cli import main

NEW, OLD = "test_migrate_support:NewNet", "test_migrate_support:OldNet"
SEED_TOML = (
    '[[rules]]\nfrom = "conv1.{p}"\nto = "embed_1.{p}"\n[[rules]]\nfrom = "conv2.{p}"\nto = "embed_2.{p}"\n'
)


def run(*args):
    return CliRunner().invoke(main, ["migrate", *args])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("rej")
    model, opt = trained(steps=1)
    path = write_ckpt(str(root / "src"), {"model": model, "optimizer": opt})
    (root / "rules.toml").write_text(SEED_TOML)
    return {"root": root, "path": path, "rules": str(root / "rules.toml"), "model": model}


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/guardian-migrate-pwned",))


def _raw_safetensors(path, header: bytes, data: bytes = b"") -> str:
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + data)
    return str(path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_is_refused_and_never_executed(tmp_path):
    path = str(tmp_path / "evil.pt")
    with open(path, "wb") as f:
        pickle.dump({"w": Evil()}, f)
    res = run("plan", path, "--to", OLD)
    assert res.exit_code == M.EXIT_REJECTED
    assert "torch.load(weights_only=True)" in res.output and "never fully unpickles" in res.output
    assert not os.path.exists("/tmp/guardian-migrate-pwned")


def test_pt_without_state_dict_is_refused(tmp_path):
    path = str(tmp_path / "x.pt")
    torch.save({"epoch": 3}, path)
    res = run("plan", path, "--to", OLD)
    assert res.exit_code == M.EXIT_REJECTED and "no state dict found" in res.output


def test_pt_key_with_newline_is_refused(tmp_path):
    path = str(tmp_path / "nl.pt")
    torch.save({"conv1.weight\nfake": torch.zeros(1)}, path)
    res = run("plan", path, "--to", OLD)
    assert res.exit_code == M.EXIT_REJECTED and "NUL/newline" in res.output


def test_safetensors_duplicate_keys_refused(tmp_path):
    entry = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    path = _raw_safetensors(tmp_path / "dup.safetensors", f'{{"a":{entry},"a":{entry}}}'.encode(), b"\0" * 4)
    res = run("plan", path, "--to", OLD)
    assert res.exit_code == M.EXIT_REJECTED and "duplicate JSON key 'a'" in res.output


def test_safetensors_nul_key_refused(tmp_path):
    header = json.dumps({"a\u0000b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path = _raw_safetensors(tmp_path / "nul.safetensors", header, b"\0" * 4)
    res = run("plan", path, "--to", OLD)
    assert res.exit_code == M.EXIT_REJECTED and "NUL/newline" in res.output


def test_safetensors_oversized_header_refused(tmp_path):
    path = tmp_path / "big.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    res = run("plan", str(path), "--to", OLD)
    assert res.exit_code == M.EXIT_REJECTED and "header claims" in res.output


def test_bad_rules_file_refused(ckpt, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rules]]\nfrom = "conv1.{p}"\nto = "embed_1.{q}"\n')
    res = run("plan", ckpt["path"], "--to", NEW, "--rules", str(bad))
    assert res.exit_code == M.EXIT_REJECTED and "must use the same placeholders" in res.output


def test_one_shot_refuses_when_unresolved(ckpt, tmp_path):
    out = tmp_path / "out"
    res = run(ckpt["path"], "-o", str(out), "--to", NEW)
    assert res.exit_code == M.EXIT_BLOCKED
    assert "migration blocked" in res.output and "SUGGESTED" in res.output
    assert not out.exists()


def test_apply_refuses_blocked_plan(ckpt, tmp_path):
    plan_file = str(tmp_path / "p.json")
    assert run("plan", ckpt["path"], "--to", NEW, "-o", plan_file).exit_code == M.EXIT_BLOCKED
    res = run("apply", ckpt["path"], "--plan", plan_file, "-o", str(tmp_path / "out"))
    assert res.exit_code == M.EXIT_BLOCKED and "the plan is blocked" in res.output


def test_stale_plan_refused(ckpt, tmp_path):
    plan_file = str(tmp_path / "p.json")
    assert run("plan", ckpt["path"], "--to", NEW, "--rules", ckpt["rules"], "-o", plan_file).exit_code == 0
    model, opt = trained(seed=5, steps=1)
    other = write_ckpt(str(tmp_path / "other"), {"model": model, "optimizer": opt})
    res = run("apply", other, "--plan", plan_file, "-o", str(tmp_path / "out"))
    assert res.exit_code == M.EXIT_REJECTED and "changed since the plan was made" in res.output


def test_tampered_plan_refused(ckpt, tmp_path):
    plan_file = tmp_path / "p.json"
    plan_file.write_text('{"format": "guardian.migrate.plan/1", "format": "x"}')
    res = run("apply", ckpt["path"], "--plan", str(plan_file), "-o", str(tmp_path / "out"))
    assert res.exit_code == M.EXIT_REJECTED and "duplicate JSON key 'format'" in res.output


def test_destination_inside_source_refused(ckpt):
    res = run(ckpt["path"], "-o", os.path.join(ckpt["path"], "x"), "--to", NEW, "--rules", ckpt["rules"])
    assert res.exit_code == M.EXIT_REJECTED and "the input is never modified" in res.output


def test_existing_destination_refused(ckpt, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    res = run(ckpt["path"], "-o", str(out), "--to", NEW, "--rules", ckpt["rules"])
    assert res.exit_code == M.EXIT_REJECTED and "already exists" in res.output and "--force" in res.output


def test_lossy_revert_refused_unless_forced(ckpt, tmp_path):
    rules = tmp_path / "lossy.toml"
    rules.write_text(
        SEED_TOML + '[[rules]]\nfrom = "fc2.{p}"\ndrop = "replaced head"\n'
        '[[expect_missing]]\npattern = "fc2.{p}"\n'
    )
    out = str(tmp_path / "out")
    res = run(ckpt["path"], "-o", out, "--to", NEW, "--rules", str(rules))
    assert res.exit_code == 0, res.output
    res = run("revert", out, "-o", str(tmp_path / "back"))
    assert (
        res.exit_code == M.EXIT_REJECTED
        and "the migration was lossy" in res.output
        and "--force-lossy" in res.output
    )
    res = run("revert", out, "-o", str(tmp_path / "back"), "--force-lossy")
    assert res.exit_code == 0, res.output


def test_revert_of_unmigrated_checkpoint_refused(ckpt, tmp_path):
    res = run("revert", ckpt["path"], "-o", str(tmp_path / "back"))
    assert res.exit_code == M.EXIT_REJECTED and "not written by guardian migrate" in res.output


def test_numeric_verification_failure(ckpt, tmp_path):
    res = run(
        ckpt["path"],
        "-o",
        str(tmp_path / "out"),
        "--to",
        NEW,
        "--rules",
        ckpt["rules"],
        "--numeric",
        "test_migrate_support:DoubledOldNet",
        "--json",
    )
    assert res.exit_code == M.EXIT_VERIFY_FAILED
    assert "numeric check failed" in res.output


def test_bad_targets_refused(ckpt, tmp_path):
    res = run("plan", ckpt["path"], "--to", "no_such_module_xyz:Net")
    assert res.exit_code == M.EXIT_REJECTED and "cannot import it" in res.output
    sig = tmp_path / "sig.json"
    sig.write_text('{"format": "something-else"}')
    res = run("plan", ckpt["path"], "--to", str(sig))
    assert res.exit_code == M.EXIT_REJECTED and "not a guardian signature file" in res.output
    res = run("plan", str(tmp_path / "missing"), "--to", NEW)
    assert res.exit_code == M.EXIT_REJECTED and "no such checkpoint or file" in res.output


def test_corrupt_source_checkpoint_refused(ckpt, tmp_path):
    import shutil

    bad = str(tmp_path / "corrupt")
    shutil.copytree(ckpt["path"], bad)
    with open(os.path.join(bad, "tensors.safetensors"), "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\xff")
    res = run("plan", bad, "--to", OLD)
    assert res.exit_code == M.EXIT_REJECTED and "not a valid checkpoint" in res.output


def test_migrate_cli_import_stays_torch_free():
    code = (
        "import sys; from guardian.cli import main\n"
        "try:\n    main(['migrate', '--help'])\nexcept SystemExit:\n    pass\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]\n"
        "assert not bad, bad\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "plan" in res.stdout and "revert" in res.stdout
