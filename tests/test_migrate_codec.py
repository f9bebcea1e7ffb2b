"""migrate's one door to checkpoint files (state/codec.py), the registration order it
keeps, and the caller's RNG that migrate must leave alone."""

from __future__ import annotations

import ast
import pathlib

import torch
from test_migrate_support import NewNet, OldNet, trained, write_ckpt
from torch import nn

import guardian.migrate as M
from guardian.migrate.sources import load_source
from guardian.state import codec

MIGRATE_DIR = pathlib.Path(M.__file__).parent


class Unsorted(nn.Module):
    """Registered in an order that sorting would change."""

    def __init__(self) -> None:
        super().__init__()
        self.zeta = nn.Linear(3, 3)
        self.alpha = nn.Linear(3, 2)
        self.mid = nn.BatchNorm1d(2)


def test_guardian_checkpoints_keep_registration_order(tmp_path):
    model = Unsorted()
    path = write_ckpt(str(tmp_path / "ck"), {"model": model})
    assert list(load_source(path).model) == list(model.state_dict())
    stored = codec.read_components(path)
    assert list(stored.components["model"][1]) == list(model.state_dict()) and stored.ordered == {"model"}
    assert load_source(path).describe()["ordered"] is True
    assert list(model.state_dict()) != sorted(model.state_dict())  # the test means something


def test_an_order_list_that_does_not_fit_the_keys_is_ignored():
    tree = {"b": 1, "a": 2}
    assert codec._fits(tree, ["a", "b"], "m")
    assert not codec._fits(tree, ["a", "c"], "m")
    assert not codec._fits(tree, ["a", "b", "b"], "m")


def test_a_checkpoint_without_an_order_is_not_trusted_for_order(tmp_path):
    """Written before the order was recorded: keys come back sorted, and matching must
    treat them like a .safetensors file (no order evidence), not as registration order."""
    from guardian.commit import CheckpointTxn
    from guardian.format.manifest import Manifest
    from guardian.state import snapshot

    model = Unsorted()
    snap = snapshot.capture({"model": ("module", model.state_dict())})
    del snap.components["model"]["order"]  # what an older guardian wrote
    with CheckpointTxn(str(tmp_path), "old") as txn:
        snapshot.write_files(txn, snap)
        path = txn.commit(
            Manifest(name="old", step=1, epoch=0, seq=1, files={}, components={"model": {"kind": "module"}})
        )
    src = load_source(path)
    assert list(src.model) == sorted(model.state_dict()) and src.ordered is False
    assert codec.read_components(path).ordered == set()


def test_migrate_reads_and_writes_checkpoints_only_through_the_codec():
    """One narrow entry point: no migrate module imports snapshot/tensors/components."""
    offenders = []
    for f in sorted(MIGRATE_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level:
                names = [a.name for a in node.names]
                full = [node.module] if node.module != "state" else [f"state.{n}" for n in names]
                if any(m.startswith("state.") and m != "state.codec" for m in full):
                    offenders.append(f"{f.name}: from {'.' * node.level}{node.module} import {names}")
    assert offenders == []


def test_apply_leaves_the_callers_global_rng_alone(tmp_path):
    """expect_missing with init = "model" builds the new model with a fixed seed; that seed
    must not leak into the caller's training (regression: it called torch.manual_seed(0))."""
    model, opt = trained(steps=1)
    src = write_ckpt(str(tmp_path / "ck"), {"model": model, "optimizer": opt})
    rules = {
        "rules": [
            {"from": "conv1.{p}", "to": "embed_1.{p}"},
            {"from": "conv2.{p}", "to": "embed_2.{p}"},
            {"from": "fc2.{p}", "drop": "replaced by a fresh head"},
        ],
        "expect_missing": [{"pattern": "fc2.{p}", "init": "model", "why": "fresh head"}],
    }
    torch.manual_seed(1234)
    torch.rand(3)
    before = torch.get_rng_state()
    p = M.plan(src, "test_migrate_support:NewNet", rules)
    M.apply(src, p, str(tmp_path / "out"))
    assert torch.equal(torch.get_rng_state(), before)


def test_numeric_verification_leaves_the_callers_global_rng_alone():
    old = OldNet()
    new_sd = {k.replace("conv", "embed_"): v for k, v in old.state_dict().items()}
    torch.manual_seed(99)
    before = torch.get_rng_state()
    diff = M.verify_numeric(OldNet, old.state_dict(), NewNet, new_sd, (2, 1, 28, 28))
    assert diff == 0.0
    assert torch.equal(torch.get_rng_state(), before)
