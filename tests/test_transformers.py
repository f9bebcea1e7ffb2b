"""Hugging Face's Trainer.train under guardian: killed twice mid-epoch, re-run, bit-exact.

As a script (the training program of the kill test):
``python tests/test_transformers.py RUN_DIR [KILL_AT_STEP]`` trains a tiny BERT built
from a config (nothing downloaded) with AdamW, a linear warm-up schedule, dropout and
a shuffling loader with two workers; KILL_AT_STEP makes the process SIGKILL itself
right after that optimizer step.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers") if __name__ != "__main__" else __import__("transformers")

from guardian.integrations.transformers import GuardianCallback  # noqa: E402

EPOCHS, SAMPLES, BATCH, SEQ = 3, 64, 8, 12  # 8 steps an epoch, 24 in all


def tiny_bert(layers: int = 2) -> transformers.PreTrainedModel:
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=SEQ,
        hidden_dropout_prob=0.2,
        attention_probs_dropout_prob=0.1,
        num_labels=2,
    )
    return transformers.BertForSequenceClassification(config)


class TokenDataset(torch.utils.data.Dataset):
    """Already tokenized: what a tokenizer would hand the Trainer, nothing random per item."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(1, 50, (SAMPLES, SEQ), generator=g)
        self.labels = torch.randint(0, 2, (SAMPLES,), generator=g)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(SEQ, dtype=torch.long),
            "labels": self.labels[i],
        }


class KillAt(transformers.TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kw) -> None:
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def make_trainer(
    run: str, *extra, model=None, guardian_kw=None, eval_dataset=None, **kw
) -> transformers.Trainer:
    transformers.set_seed(0)
    options = dict(
        output_dir=os.path.join(os.path.dirname(run), "hf-out"),
        per_device_train_batch_size=BATCH,
        num_train_epochs=EPOCHS,
        learning_rate=5e-3,
        weight_decay=0.01,
        lr_scheduler_type="linear",
        warmup_steps=3,
        optim="adamw_torch",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=4,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
    )
    options.update(kw)
    callback = GuardianCallback(run, **(guardian_kw or {"every_n_steps": 3}))
    return transformers.Trainer(
        model=model if model is not None else tiny_bert(),
        args=transformers.TrainingArguments(**options),
        train_dataset=TokenDataset(),
        eval_dataset=eval_dataset,
        callbacks=[callback, *extra],
    )


def main(run: str, kill_at: int | None) -> None:
    trainer = make_trainer(run, *([KillAt(kill_at)] if kill_at else []), dataloader_num_workers=2)
    trainer.train()


# ---------------------------------------------------------------------------- the tests


def train_in_subprocess(run: str, kill_at: int | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, os.path.abspath(__file__), run] + ([str(kill_at)] if kill_at else [])
    env = {**os.environ, "GUARDIAN_QUIET": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)


def final_state(run: str) -> dict[str, object]:
    import guardian

    with guardian.open(run) as ckpt:
        assert ckpt.step == EPOCHS * SAMPLES // BATCH  # the end of train()
        state = {c: ckpt.state(c) for c in ("model", "optimizer", "scheduler")}
        trainer_state = ckpt.state("transformers")["trainer_state"]
        state["resumed_from"] = ckpt.manifest.extra.get("resumed_from") or ""
    state["logs"] = [e for e in trainer_state["log_history"] if "loss" in e]
    return state


def assert_no_pickle(*dirs: str) -> None:
    for top in dirs:
        for root, _, files in os.walk(top):
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    head = f.read(2)
                assert not head.startswith(b"\x80"), f"{name} looks like a pickle"
                assert not name.endswith((".ckpt", ".pt", ".pth", ".pkl", ".bin")), name


@pytest.mark.slow
def test_killed_twice_mid_epoch_resumes_bit_exact(tmp_path):
    from guardian.format import reader

    ref = str(tmp_path / "ref" / "run")
    proc = train_in_subprocess(ref)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = str(tmp_path / "killed" / "run")
    for kill_at in (5, 13):  # both inside an epoch of 8 steps, after saves at 3 and 12
        proc = train_in_subprocess(run, kill_at)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    proc = train_in_subprocess(run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected, got = final_state(ref), final_state(run)
    resumed_at = int(os.path.basename(got["resumed_from"]).split("-")[1])
    assert resumed_at in (9, 12), got["resumed_from"]  # inside the second epoch (12's save may be in flight)
    assert expected["logs"] == got["logs"]  # what HF logged (loss, grad norm, lr) as well
    for component in ("model", "optimizer", "scheduler"):
        flat_e, flat_g = _flatten(expected[component]), _flatten(got[component])
        assert flat_e.keys() == flat_g.keys()
        for key in flat_e:
            assert _equal(flat_e[key], flat_g[key]), f"{component}{key} differs after resume"
    infos = reader.list_checkpoints(run, verify=True)
    assert infos and all(i.valid for i in infos), [i.problems for i in infos]
    assert_no_pickle(run, str(tmp_path / "killed" / "hf-out"))


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


def _hashes(top: str) -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(top):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, top)] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_own_save_strategy_too_warns_and_guardian_resumes(tmp_path, caplog):
    run = str(tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="guardian"):
        make_trainer(run, num_train_epochs=1, save_strategy="steps", save_steps=4).train()
    assert "also saves its own checkpoints" in caplog.text and "save_strategy='no'" in caplog.text
    hf_ckpt = str(tmp_path / "hf-out" / "checkpoint-4")
    before = _hashes(hf_ckpt)
    assert before
    caplog.clear()
    trainer = make_trainer(run, num_train_epochs=2)
    with caplog.at_level(logging.WARNING, logger="guardian"):
        trainer.train(resume_from_checkpoint=hf_ckpt)
    assert "guardian resumed from" in caplog.text and "ignored" in caplog.text
    assert _hashes(hf_ckpt) == before  # nothing of HF's checkpoint overwritten
    assert trainer.state.global_step == 16  # from guardian's step 8, not HF's step 4


def test_a_checkpoint_of_another_model_class_is_refused_naming_keys(tmp_path):
    import guardian

    run = str(tmp_path / "run")
    make_trainer(run, num_train_epochs=1).train()
    with pytest.raises(guardian.StateMismatchError) as e:
        make_trainer(run, model=tiny_bert(layers=1), num_train_epochs=2).train()
    assert "bert.encoder.layer.1" in str(e.value)


def test_best_checkpoint_and_from_pretrained_export(tmp_path):
    import guardian

    run = str(tmp_path / "run")
    trainer = make_trainer(
        run,
        num_train_epochs=2,
        eval_strategy="epoch",
        guardian_kw={"monitor": "eval_loss", "every_n_epochs": None},
        eval_dataset=TokenDataset(),
    )
    trainer.train()
    cb = next(c for c in trainer.callback_handler.callbacks if isinstance(c, GuardianCallback))
    assert cb.best_checkpoint and os.path.isdir(cb.best_checkpoint)
    with guardian.open(cb.best_checkpoint) as ckpt:
        assert "best" in ckpt.manifest.reason
        assert abs(ckpt.metrics["eval_loss"] - cb.best_score) < 1e-6
        weights = ckpt.state("model")
    out = guardian.export_weights(cb.best_checkpoint, tmp_path / "hf-model")
    model = transformers.BertForSequenceClassification.from_pretrained(out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name


def test_import_guardian_never_imports_transformers_and_a_missing_extra_says_what_to_install():
    check = (
        "import sys, guardian, guardian.readonly; assert 'transformers' not in sys.modules\n"
        "sys.modules['transformers'] = None\n"
        "try:\n    import guardian.integrations.transformers\nexcept ImportError as e:\n    print(e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'torch-guardian[transformers]'" in proc.stdout


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)
