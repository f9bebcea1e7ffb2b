"""One read on restart: the resume checkpoint is verified while it loads.

Bytes read are counted with the kernel's own per-process counter, ``rchar`` in
/proc/self/io: every byte any thread of this process received from read/pread/preadv,
whether it came from disk or the page cache (``read_bytes`` there counts only disk
I/O and would see nothing on a warm cache).
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
from torch import nn

import guardian
from guardian.errors import CorruptCheckpointError
from guardian.format import reader, safetensors_io
from guardian.state import snapshot

TENSORS = "tensors.safetensors"


def _trainer(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(4)])  # 4 MiB of weights, 12 with Adam
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def _train(tmp_path, steps: int) -> list[reader.CheckpointInfo]:
    model, opt = _trainer(0)
    with guardian.protect(
        model=model, optimizer=opt, dir=str(tmp_path), every_steps=1, save_on_exit=False
    ) as g:
        for _ in range(steps):
            model(torch.randn(8, 512)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            g.step()
    return reader.list_checkpoints(str(tmp_path))


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def _flip_byte_in_model_weights(ckpt: str) -> None:
    """Corrupt one byte of a model tensor: the load writes it into a live parameter."""
    path = os.path.join(ckpt, TENSORS)
    layout = safetensors_io.read_layout(path)
    entry = next(e for e in layout.entries if e.key.startswith("model/") and e.nbytes > 100)
    with open(path, "r+b") as f:
        f.seek(layout.data_start + entry.begin + 37)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x10]))


def _state(model, opt) -> dict[str, torch.Tensor]:
    out = {f"model/{k}": v.clone() for k, v in model.state_dict().items()}
    for pid, st in opt.state_dict()["state"].items():
        out.update({f"opt/{pid}/{k}": torch.as_tensor(v).clone() for k, v in st.items()})
    return out


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(_bytes(a[k]), _bytes(b[k])), k


def _loaded_alone(ckpt: str) -> dict[str, torch.Tensor]:
    """What an uninterrupted resume from ``ckpt`` gives a freshly built trainer."""
    model, opt = _trainer(1)
    guardian.load(ckpt, model=model, optimizer=opt)
    return _state(model, opt)


def test_resume_reads_the_checkpoint_once(tmp_path):
    infos = _train(tmp_path, 2)
    size = os.path.getsize(os.path.join(infos[-1].path, TENSORS))
    model, opt = _trainer(1)
    before = _rchar()
    with guardian.protect(model=model, optimizer=opt, dir=str(tmp_path), save_on_exit=False) as g:
        read = _rchar() - before
        assert g.global_step == 2
    # Once: the tensor file's bytes, plus manifests, state files and header reads.
    assert size <= read < 1.25 * size, (read, size)


@pytest.mark.parametrize("streams", [1, 2])
def test_corrupt_newest_falls_back_bitwise_as_if_loaded_alone(tmp_path, monkeypatch, caplog, streams):
    if streams == 2:  # a small file then takes the two-stream read that large ones take
        monkeypatch.setattr(snapshot, "PARALLEL_READ_MIN", 0)
    older, newest = _train(tmp_path, 2)
    expected = _loaded_alone(older.path)
    _flip_byte_in_model_weights(newest.path)
    assert reader.inspect_checkpoint(newest.path, verify=False).valid  # only the hash can tell
    model, opt = _trainer(1)
    with caplog.at_level(logging.ERROR, logger="guardian.resume"):
        with guardian.protect(model=model, optimizer=opt, dir=str(tmp_path), save_on_exit=False) as g:
            assert g.global_step == older.manifest.step
            _assert_bitwise_equal(_state(model, opt), expected)
    line = next(r.getMessage() for r in caplog.records if newest.name in r.getMessage())
    assert "set aside" in line and "content hash" in line and "(corrupted)" in line
    assert any(n.startswith(newest.name) for n in os.listdir(tmp_path / "set-aside"))
    assert [i.name for i in reader.list_checkpoints(str(tmp_path))] == [older.name]


def test_truncated_newest_falls_back_without_reading_it(tmp_path, caplog):
    older, newest = _train(tmp_path, 2)
    expected = _loaded_alone(older.path)
    path = os.path.join(newest.path, TENSORS)
    os.truncate(path, os.path.getsize(path) - 4096)
    model, opt = _trainer(1)
    with caplog.at_level(logging.ERROR, logger="guardian.resume"):
        with guardian.protect(model=model, optimizer=opt, dir=str(tmp_path), save_on_exit=False) as g:
            assert g.global_step == older.manifest.step
            _assert_bitwise_equal(_state(model, opt), expected)
    assert any("truncated" in r.getMessage() and newest.name in r.getMessage() for r in caplog.records)


def test_a_refused_load_with_nothing_to_fall_back_to_says_the_model_was_overwritten(tmp_path):
    (only,) = _train(tmp_path, 1)
    _flip_byte_in_model_weights(only.path)
    model, opt = _trainer(1)
    with pytest.raises(CorruptCheckpointError, match="partly overwritten") as err:
        with guardian.protect(model=model, optimizer=opt, dir=str(tmp_path), save_on_exit=False):
            pass
    assert "content hash" in " ".join(err.value.problems)
    assert os.path.isdir(only.path)  # nothing set aside when nothing could be restored


def test_verify_still_reads_and_hashes_everything(tmp_path):
    older, newest = _train(tmp_path, 2)
    _flip_byte_in_model_weights(newest.path)
    checked = reader.inspect_checkpoint(newest.path, verify=True)
    assert not checked.valid and "content hash" in checked.problems[0]
    assert reader.inspect_checkpoint(older.path, verify=True).valid


def test_the_daemon_starts_a_resume_without_reading_the_checkpoint(tmp_path):
    """The daemon's loop thread records the resume point from the manifest and sizes
    (the library verifies while loading): its process reads far less than the file."""
    import signal
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from daemon_jobs.harness import Daemon, cli, env_with, events, kill_job_session, wait_for

    run, home = str(tmp_path / "run"), str(tmp_path / "home")
    model = nn.Linear(4096, 8192)  # 128 MiB of weights
    with guardian.protect(model=model, dir=run, save_on_exit=False) as g:
        g.save("big")
    (ckpt,) = reader.list_checkpoints(run)
    size = os.path.getsize(os.path.join(ckpt.path, TENSORS))
    job = [sys.executable, "-c", "import time; time.sleep(120)"]
    cli(home, "run", "--name", "big", "--dir", run, "--", *job, env=env_with())
    d = Daemon(home).start()
    try:
        start = wait_for(
            lambda: next((e for e in events(home, "big") if e["event"] == "start"), None), 60, "the start"
        )
        with open(f"/proc/{d.proc.pid}/io") as f:
            daemon_read = next(int(line.split()[1]) for line in f if line.startswith("rchar:"))
        kill_job_session(home, "big")
    finally:
        d.stop(signal.SIGTERM)
    assert start["resume_from"] == ckpt.name
    assert daemon_read < size / 2, (daemon_read, size)


@pytest.mark.parametrize("streams", [1, 2])
def test_read_tensors_names_what_a_refused_read_overwrote(tmp_path, monkeypatch, streams):
    if streams == 2:
        monkeypatch.setattr(snapshot, "PARALLEL_READ_MIN", 0)
    (ckpt,) = _train(tmp_path, 1)
    path = os.path.join(ckpt.path, TENSORS)
    good = ckpt.manifest.files[TENSORS].hash
    model, opt = _trainer(1)
    live = snapshot.capture({"model": ("module", model.state_dict())}).tensors
    overwrote: set[str] = set()
    with pytest.raises(CorruptCheckpointError, match="does not match the manifest's 0{32}"):
        snapshot.read_tensors(path, into=live, expect_hash="0" * 32, overwrites=overwrote)
    assert overwrote == set(live)  # every live tensor matched and was written into
    out = snapshot.read_tensors(path, into=live, expect_hash=good)
    plain = snapshot.read_tensors(path)
    assert out.keys() == plain.keys()
    assert all(torch.equal(_bytes(out[k]), _bytes(plain[k])) for k in out)
    assert all(out[k] is not plain[k] and out[k].data_ptr() == live[k].data_ptr() for k in live)


def test_tiny_restart_benchmark_reports_the_verified_restart(tmp_path):
    import json
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts", "bench_resume.py")
    cmd = [sys.executable, script, "--size-mb", "2", "--reps", "1", "--dir", str(tmp_path / "r"), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["guardian_restart_verified_s"] > 0 and summary["restart_speedup_vs_torch_load"] > 0
    assert len(summary["per_rep"]["restart"]) == 1
    assert set(summary["targets_met"]) == {"restart_speedup_vs_torch_load"}
    assert not os.path.exists(tmp_path / "r")
