"""Lightning's Trainer.fit under guardian: killed twice mid-epoch, re-run, bit-exact.

As a script (the training program of the kill tests):
``python tests/test_lightning.py RUN_DIR [KILL_AT_STEP]`` fits a tiny model with
AdamW, a OneCycle schedule, dropout and a shuffling loader with two workers;
KILL_AT_STEP makes the process SIGKILL itself right after that optimizer step.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = (
    pytest.importorskip("lightning.pytorch")
    if __name__ != "__main__"
    else __import__("lightning.pytorch").pytorch
)

from guardian.integrations.lightning import GuardianCallback  # noqa: E402

EPOCHS, SAMPLES, BATCH = 3, 64, 8  # 8 steps an epoch, 24 in all


class TinyModule(L.LightningModule):
    def __init__(self, lr: float = 0.01, workers: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=EPOCHS * SAMPLES // BATCH)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        data = TensorDataset(
            torch.randn(SAMPLES, 10, generator=g), torch.randint(0, 2, (SAMPLES,), generator=g)
        )
        return DataLoader(data, batch_size=BATCH, shuffle=True, num_workers=self.hparams.workers)


class OtherModule(TinyModule):
    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.net = nn.Sequential(nn.Linear(10, 4), nn.Linear(4, 2))


class KillAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def make_trainer(run: str, *extra, **kw) -> L.Trainer:
    options = dict(
        max_epochs=EPOCHS,
        default_root_dir=os.path.dirname(run),
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    options.update(kw)
    return L.Trainer(callbacks=[GuardianCallback(run, every_n_train_steps=3), *extra], **options)


def main(run: str, kill_at: int | None) -> None:
    L.seed_everything(0, verbose=False)
    trainer = make_trainer(run, *([KillAt(kill_at)] if kill_at else []))
    trainer.fit(TinyModule(workers=2))


# ---------------------------------------------------------------------------- the tests


def fit_in_subprocess(run: str, kill_at: int | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, os.path.abspath(__file__), run] + ([str(kill_at)] if kill_at else [])
    return subprocess.run(
        args, capture_output=True, text=True, timeout=300, env={**os.environ, "GUARDIAN_QUIET": "1"}
    )


def final_state(run: str) -> dict[str, dict[str, torch.Tensor]]:
    import guardian

    with guardian.open(run) as ckpt:
        assert ckpt.step == EPOCHS * SAMPLES // BATCH  # the end of fit
        return {c: ckpt.state(c) for c in ("model", "optimizer", "scheduler.0")}


def assert_no_pickle(run: str) -> None:
    for root, _, files in os.walk(run):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                head = f.read(2)
            assert not head.startswith(b"\x80"), f"{name} looks like a pickle"
            assert not name.endswith((".ckpt", ".pt", ".pth", ".pkl")), name


@pytest.mark.slow
def test_killed_twice_mid_epoch_resumes_bit_exact(tmp_path):
    from guardian.format import reader

    ref = str(tmp_path / "ref" / "run")
    proc = fit_in_subprocess(ref)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = str(tmp_path / "killed" / "run")
    for kill_at in (5, 13):  # both inside an epoch of 8 steps, after saves at 3 and 12
        proc = fit_in_subprocess(run, kill_at)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    proc = fit_in_subprocess(run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected, got = final_state(ref), final_state(run)
    for component in expected:
        flat_e, flat_g = _flatten(expected[component]), _flatten(got[component])
        assert flat_e.keys() == flat_g.keys()
        for key in flat_e:
            assert _equal(flat_e[key], flat_g[key]), f"{component}{key} differs after resume"
    infos = reader.list_checkpoints(run, verify=True)
    assert infos and all(i.valid for i in infos), [i.problems for i in infos]
    assert_no_pickle(run)


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}[{k!r}]"))
        return out
    if isinstance(tree, (list, tuple)):
        out = {}
        for i, v in enumerate(tree):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: tree}


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def fit_here(run: str, module=None, *extra, **kw) -> L.Trainer:
    L.seed_everything(0, verbose=False)
    trainer = make_trainer(run, *extra, **kw)
    trainer.fit(module or TinyModule())
    return trainer


def test_a_checkpoint_of_another_model_class_is_refused_naming_keys(tmp_path):
    import guardian

    run = str(tmp_path / "run")
    fit_here(run, max_epochs=1)
    with pytest.raises(guardian.StateMismatchError) as e:
        fit_here(run, OtherModule(), max_epochs=2)
    assert "net.3.weight" in str(e.value) and "net.1.weight" in str(e.value)


def test_own_model_checkpoint_too_warns_and_guardian_resumes(tmp_path, caplog):
    from lightning.pytorch.callbacks import ModelCheckpoint

    run, mc_dir = str(tmp_path / "run"), str(tmp_path / "mc")
    with caplog.at_level(logging.WARNING, logger="guardian"):
        fit_here(run, None, ModelCheckpoint(dirpath=mc_dir), max_epochs=1, enable_checkpointing=True)
    assert "also has Lightning's ModelCheckpoint" in caplog.text
    (ckpt,) = os.listdir(mc_dir)
    before = open(os.path.join(mc_dir, ckpt), "rb").read()
    caplog.clear()
    L.seed_everything(0, verbose=False)
    trainer = make_trainer(run, max_epochs=2)
    with caplog.at_level(logging.WARNING, logger="guardian"):
        trainer.fit(TinyModule(), ckpt_path=os.path.join(mc_dir, ckpt))
    assert "guardian resumed from" in caplog.text and "ignored" in caplog.text
    assert open(os.path.join(mc_dir, ckpt), "rb").read() == before  # nothing overwritten
    assert trainer.global_step == 16


def test_best_model_path_and_score(tmp_path):
    class Validated(TinyModule):
        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self.training_step(batch, batch_idx))

        def val_dataloader(self):
            return self.train_dataloader()

    run = str(tmp_path / "run")
    L.seed_everything(0, verbose=False)
    cb = GuardianCallback(run, monitor="val_loss")
    trainer = L.Trainer(
        max_epochs=2, callbacks=[cb], enable_checkpointing=False, logger=False, enable_progress_bar=False
    )
    trainer.fit(Validated())
    assert cb.best_model_path and os.path.isdir(cb.best_model_path)
    import guardian

    with guardian.open(cb.best_model_path) as ckpt:
        assert abs(ckpt.metrics["val_loss"] - cb.best_model_score.item()) < 1e-6


def test_unstorable_hyperparameters_are_refused_naming_the_key(tmp_path):
    import guardian

    class WithObject(TinyModule):
        def __init__(self) -> None:
            super().__init__()
            self.hparams["tokenizer"] = object()

    with pytest.raises(guardian.UnsupportedStateError, match=r"hyper_parameters'\]\['tokenizer'\]"):
        fit_here(str(tmp_path / "run"), WithObject(), max_epochs=1)


def test_import_guardian_never_imports_lightning_and_a_missing_extra_says_what_to_install():
    check = (
        "import sys, guardian, guardian.readonly; assert 'lightning' not in sys.modules\n"
        "sys.modules['lightning'] = None; sys.modules['pytorch_lightning'] = None\n"
        "try:\n    import guardian.integrations.lightning\nexcept ImportError as e:\n    print(e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'torch-guardian[lightning]'" in proc.stdout


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)
