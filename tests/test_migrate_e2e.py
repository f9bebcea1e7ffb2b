"""The seed case end to end, through protect(), the CLI and back (revert)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner
from test_migrate_support import NewNet, OldNet, batch, train_steps, trained, write_ckpt

import guardian.migrate as M
from guardian.cli import main
from guardian.state.snapshot import load

try:
    from guardian import protect

    protect.__name__  # noqa: B018 (the lazy attribute may point at a module not written yet)
except (ImportError, AttributeError, ModuleNotFoundError):
    from guardian import protect

FACTORY_NEW = "test_migrate_support:NewNet"
FACTORY_OLD = "test_migrate_support:OldNet"
SEED_TOML = (
    '[[rules]]\nfrom = "conv1.{p}"\nto = "embed_1.{p}"\n\n[[rules]]\nfrom = "conv2.{p}"\nto = "embed_2.{p}"\n'
)
TOTAL_STEPS = 4


def _protect(objects, run_dir, **kw):
    return protect(
        objects,
        dir=str(run_dir),
        every_steps=2,
        every_epochs=None,
        handle_signals=False,
        async_save=False,
        **kw,
    )


def _loop(model, opt, guard):
    for i in range(guard.global_step, TOTAL_STEPS):
        train_steps(model, opt, 1, start=i)
        guard.step()


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory):
    """An uninterrupted OldNet run (for the reference) and its step-2 checkpoint."""
    root = tmp_path_factory.mktemp("seed")
    torch.manual_seed(0)
    model = OldNet()
    opt = torch.optim.Adadelta(model.parameters(), lr=1.0)
    with _protect({"model": model, "optimizer": opt}, root / "run", resume=False) as g:
        _loop(model, opt, g)
    ckpt = os.path.join(root, "run", "step-000000002")
    assert os.path.isdir(ckpt)
    rules = root / "rules.toml"
    rules.write_text(SEED_TOML)
    return {
        "root": root,
        "ckpt": ckpt,
        "final": {k: v.clone() for k, v in model.state_dict().items()},
        "rules": str(rules),
    }


def test_seed_case_end_to_end(seed_run, tmp_path):
    before = sorted(os.listdir(seed_run["ckpt"]))
    out = str(tmp_path / "migrated")
    result = M.migrate(
        seed_run["ckpt"],
        out,
        FACTORY_NEW,
        seed_run["rules"],
        numeric={"old": FACTORY_OLD, "input_shape": (2, 1, 28, 28)},
    )
    assert result.numeric_diff == 0.0
    assert sorted(os.listdir(seed_run["ckpt"])) == before  # the input is untouched

    loaded = load(out)
    assert set(loaded) == {"model", "optimizer", "progress", "rng", "policy", "extra"}
    old = load(seed_run["ckpt"])
    for name in ("progress", "rng", "policy", "extra"):  # carried over untouched
        assert repr(loaded[name]) == repr(old[name])
    new = NewNet()
    new.load_state_dict(loaded["model"][1], strict=True)
    ref = OldNet()
    ref.load_state_dict(old["model"][1], strict=True)
    x, _ = batch(42)
    assert torch.equal(new.eval()(x), ref.eval()(x))
    # the Adadelta state moved with the weights
    ostate, nstate = old["optimizer"][1]["state"], loaded["optimizer"][1]["state"]
    for field in ("square_avg", "acc_delta", "step"):
        assert torch.equal(nstate["embed_1.weight"][field], ostate["conv1.weight"][field])
    assert loaded["optimizer"][1]["param_groups"][0]["params"][:2] == ["embed_1.weight", "embed_1.bias"]


def test_training_resumed_from_migrated_checkpoint_continues_exactly(seed_run, tmp_path):
    out = str(tmp_path / "migrated")
    M.migrate(seed_run["ckpt"], out, FACTORY_NEW, seed_run["rules"])
    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    model = NewNet()
    opt = torch.optim.Adadelta(model.parameters(), lr=1.0)
    with _protect({"model": model, "optimizer": opt}, tmp_path / "run2", resume=out) as g:
        assert g.global_step == 2
        _loop(model, opt, g)
    rename = {"embed_1": "conv1", "embed_2": "conv2"}
    final = {
        rename.get(k.split(".")[0], k.split(".")[0]) + "." + k.split(".", 1)[1]: v
        for k, v in model.state_dict().items()
    }
    assert final.keys() == seed_run["final"].keys()
    for k, v in seed_run["final"].items():
        assert torch.equal(final[k], v), k


def test_cli_seed_case_with_auto(seed_run, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["migrate", "plan", seed_run["ckpt"], "--to", FACTORY_NEW, "--json"])
    assert res.exit_code == M.EXIT_BLOCKED
    report = json.loads(res.output)
    assert report["schema"] == "guardian.migrate.report/1" and report["status"] == "blocked"
    assert sorted(s["from"] for s in report["suggestions"]) == ["conv1.{p}", "conv2.{p}"]
    assert all(s["confidence"] >= 0.99 for s in report["suggestions"])
    out = str(tmp_path / "auto")
    res = runner.invoke(
        main,
        ["migrate", seed_run["ckpt"], "-o", out, "--to", FACTORY_NEW, "--auto", "--numeric", FACTORY_OLD],
    )
    assert res.exit_code == 0, res.output
    assert "numeric check: max |old - new| = 0" in res.output
    NewNet().load_state_dict(load(out)["model"][1], strict=True)


def test_cli_plan_review_apply_revert(seed_run, tmp_path):
    runner = CliRunner()
    plan_file = str(tmp_path / "plan.json")
    res = runner.invoke(
        main,
        [
            "migrate",
            "plan",
            seed_run["ckpt"],
            "--to",
            FACTORY_NEW,
            "--rules",
            seed_run["rules"],
            "-o",
            plan_file,
        ],
    )
    assert res.exit_code == 0 and "CLEAN" in res.output
    out = str(tmp_path / "dst")
    res = runner.invoke(main, ["migrate", "apply", seed_run["ckpt"], "--plan", plan_file, "-o", out])
    assert res.exit_code == 0, res.output
    back = str(tmp_path / "back")
    res = runner.invoke(main, ["migrate", "revert", out, "-o", back])
    assert res.exit_code == 0, res.output
    from guardian.format import reader

    def digest(p):
        return reader.checkpoint_digest(reader.component_summaries(p, reader.inspect_checkpoint(p).manifest))

    assert digest(back) == digest(seed_run["ckpt"])  # every component, byte for byte
    # destination exists → refused with exit 12
    res = runner.invoke(main, ["migrate", "apply", seed_run["ckpt"], "--plan", plan_file, "-o", out])
    assert res.exit_code == M.EXIT_REJECTED and "already exists" in res.output
    res = runner.invoke(
        main, ["migrate", "apply", seed_run["ckpt"], "--plan", plan_file, "-o", out, "--force"]
    )
    assert res.exit_code == 0


def test_signature_target(seed_run, tmp_path):
    sig = str(tmp_path / "sig.json")
    res = CliRunner().invoke(main, ["migrate", "signature", FACTORY_NEW, "-o", sig])
    assert res.exit_code == 0
    assert json.load(open(sig))["format"] == "guardian.migrate.signature/1"
    p = M.plan(seed_run["ckpt"], sig, seed_run["rules"])
    assert not p.blocked


def test_wrapped_checkpoints_load_into_a_plain_model(tmp_path):
    model, opt = trained(steps=1)
    sd = model.state_dict()
    for prefix in ("module.", "_orig_mod."):
        from safetensors.torch import save_file

        path = str(tmp_path / f"{prefix.strip('.')}.safetensors")
        save_file({prefix + k: v for k, v in sd.items()}, path)
        out = str(tmp_path / f"out{prefix}")
        M.migrate(path, out, FACTORY_OLD)
        OldNet().load_state_dict(load(out)["model"][1], strict=True)
        pt = str(tmp_path / f"{prefix.strip('.')}.pt")
        torch.save({prefix + k: v for k, v in sd.items()}, pt)
        M.migrate(pt, out + "pt", FACTORY_OLD)


def test_multi_model_checkpoint_migrates_one_and_keeps_the_other(tmp_path):
    a, b = OldNet(), OldNet()
    opt = torch.optim.SGD(list(a.parameters()) + list(b.parameters()), lr=0.1, momentum=0.9)
    train_steps(a, opt, 1)
    src = write_ckpt(str(tmp_path / "src"), {"student": a, "teacher": b, "optimizer": opt})
    rules = {
        "rules": [{"from": "conv1.{p}", "to": "embed_1.{p}"}, {"from": "conv2.{p}", "to": "embed_2.{p}"}]
    }
    out = str(tmp_path / "out")
    M.migrate(src, out, FACTORY_NEW, rules, component="student")
    loaded = load(out)
    names = loaded["optimizer"][1]["param_groups"][0]["params"]
    assert "student.embed_1.weight" in names and "teacher.conv1.weight" in names
    assert "student.embed_1.weight" in loaded["optimizer"][1]["state"]
    M.revert(out, str(tmp_path / "back"))


def test_real_seed_net_from_the_example(tmp_path):
    """The example's own Net (~609k parameters) renamed conv1/conv2 → embed_1/embed_2."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "examples", "mnist_cnn.py")
    spec = importlib.util.spec_from_file_location("mnist_cnn_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    class Renamed(mod.Net):
        def __init__(self):
            super().__init__()
            self.embed_1, self.embed_2 = self.conv1, self.conv2
            del self.conv1, self.conv2
            self.conv1, self.conv2 = (lambda x: self.embed_1(x)), (lambda x: self.embed_2(x))

    torch.manual_seed(0)
    net = mod.Net()
    opt = torch.optim.Adadelta(net.parameters(), lr=1.0)
    x = torch.randn(4, 1, 28, 28)
    torch.nn.functional.nll_loss(net(x), torch.tensor([1, 2, 3, 4])).backward()
    opt.step()
    src = write_ckpt(str(tmp_path / "src"), {"model": net, "optimizer": opt})
    with torch.device("meta"):
        target = M.from_module(Renamed())
    assert len(target.specs) == 8 and "embed_1.weight" in target.specs
    p = M.plan(src, target, auto=True)
    assert [(a["from"], a["to"]) for a in p.applied] == [
        ("conv1.{p}", "embed_1.{p}"),
        ("conv2.{p}", "embed_2.{p}"),
    ]
    M.apply(src, p, str(tmp_path / "out"))
    loaded = load(str(tmp_path / "out"))
    new = Renamed()
    new.load_state_dict(loaded["model"][1], strict=True)
    assert torch.equal(new.eval()(x), net.eval()(x))
    assert torch.equal(
        loaded["optimizer"][1]["state"]["embed_2.weight"]["square_avg"],
        opt.state[net.conv2.weight]["square_avg"],
    )
