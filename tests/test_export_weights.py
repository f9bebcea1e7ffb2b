"""Exported weights are the model's own state_dict, loadable anywhere without guardian."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_load import Net, train

import guardian
from guardian.format import reader


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("export") / "run")
    train(path)
    return path


def test_exported_file_loads_strictly_into_a_fresh_model(run, tmp_path):
    out = str(tmp_path / "model.safetensors")
    assert guardian.export_weights(run, out) == out
    weights = load_file(out)
    fresh = Net()
    fresh.load_state_dict(weights, strict=True)
    assert set(weights) == set(Net().state_dict())  # no optimizer/rng/progress keys
    with guardian.open(run) as ckpt:
        for key, value in fresh.state_dict().items():
            assert torch.equal(value, ckpt["model/" + key])
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no temp file left


def test_cli_exports_the_best_checkpoint(run, tmp_path):
    out = str(tmp_path / "best.safetensors")
    proc = subprocess.run(
        [sys.executable, "-m", "guardian.cli", "export-weights", run, "-o", out, "--best"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    best = next(i for i in reversed(reader.list_checkpoints(run)) if "best" in i.manifest.reason)
    with guardian.open(best.path) as ckpt:
        for key, value in load_file(out).items():
            assert torch.equal(value, ckpt["model/" + key])


def test_cli_names_the_models_when_the_component_is_wrong(run, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "guardian.cli",
            "export-weights",
            run,
            "-o",
            str(tmp_path / "x"),
            "--component",
            "optimizer",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "'optimizer' is not a model component; models: ['model']" in proc.stderr
    assert not os.path.exists(tmp_path / "x")


def test_hf_config_gives_the_directory_from_pretrained_reads(run, tmp_path):
    config = {"model_type": "tiny", "hidden_size": 8}
    out = str(tmp_path / "hf")
    guardian.export_weights(run, out, hf_config=config)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f) == config
    Net().load_state_dict(load_file(os.path.join(out, "model.safetensors")), strict=True)
