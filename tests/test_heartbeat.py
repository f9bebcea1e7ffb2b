"""The library's side of the supervisor contract: run.json and heartbeat.json."""

from __future__ import annotations

import torch

import guardian
from guardian.runfiles import read_heartbeat, read_status


def test_heartbeat_keeps_beating_after_saves(tmp_path, monkeypatch):
    """Regression: the first save used to freeze the heartbeat (its throttle was set to
    +inf), so a supervisor would have seen a healthy run go silent in phase 'save'."""
    monkeypatch.setenv("GUARDIAN_HEARTBEAT_INTERVAL", "0")
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    with guardian.protect(model=model, optimizer=opt, dir=str(tmp_path), every_steps=2) as g:
        for _ in range(6):
            model(torch.randn(3, 2)).sum().backward()
            opt.step()
            opt.zero_grad()
            g.step()
            hb = read_heartbeat(str(tmp_path))
            seen.append((hb["step"], hb["phase"]))
    assert [s for s, _ in seen] == [1, 2, 3, 4, 5, 6]
    assert all(phase == "train" for _, phase in seen)  # back to 'train' right after each save
    assert read_heartbeat(str(tmp_path))["phase"] == "done"
    status = read_status(str(tmp_path))
    assert status["state"] == "finished" and status["step"] == 6
    assert status["last_checkpoint"].endswith("step-000000006")


def test_run_dir_from_the_supervisor(tmp_path, monkeypatch):
    """Under `guardian run`, the job may omit dir=: GUARDIAN_RUN_DIR names it."""
    monkeypatch.setenv("GUARDIAN_RUN_DIR", str(tmp_path / "from-env"))
    model = torch.nn.Linear(2, 2)
    with guardian.protect(model=model) as g:
        assert g.run_dir == str(tmp_path / "from-env")
    assert (tmp_path / "from-env" / "run.json").exists()


def test_no_dir_anywhere_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("GUARDIAN_RUN_DIR", raising=False)
    import pytest

    with pytest.raises(ValueError, match="dir="):
        guardian.protect(model=torch.nn.Linear(2, 2))
