"""The remote tier (issue 16) against a real S3 endpoint: moto's server mode in a
subprocess on 127.0.0.1, reached through s3fs exactly as a user's run reaches S3
(credentials and endpoint from the environment: the standard provider chain).

``FreezableProxy`` sits between client and server and can stop answering (connections
stay open, no byte moves) to play an endpoint that hangs mid-upload.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class MotoServer:
    """``moto.server`` in its own process (its CPU is not the test's GIL)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_until(self._answers, 60, "moto's S3 server to answer")

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {self.proc.returncode}")
        try:
            with urllib.request.urlopen(self.url + "/moto-api/", timeout=2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class FreezableProxy:
    """A TCP proxy on 127.0.0.1; ``freeze()`` makes it stop moving bytes (the endpoint
    hangs without closing anything), ``thaw()`` resumes."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.running = threading.Event()
        self.running.set()
        self._stop = False
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.bytes_moved = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze(self) -> None:
        self.running.clear()

    def thaw(self) -> None:
        self.running.set()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                while not self.running.wait(0.1):
                    if self._stop:
                        return
                dst.sendall(data)
                self.bytes_moved += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self.running.set()
        self.sock.close()


def s3_env(endpoint: str) -> dict[str, str]:
    """What a user sets for an S3-compatible endpoint (fake keys: moto accepts any)."""
    return {
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-never-logged",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


def make_bucket(endpoint: str, bucket: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(
        key="testing-key-id",
        secret="testing-secret-never-logged",
        endpoint_url=endpoint,
        skip_instance_cache=True,
    )
    fs.mkdir(bucket)


def have_s3() -> str | None:
    """None if s3fs and moto's server are importable, else why the tests skip."""
    try:
        import moto.server  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError as e:
        return f"remote-tier tests need s3fs and moto[server] (pip install -e '.[test]'): {e}"
    return None


# ---------------------------------------------------------------- fixtures

pytestmark = pytest.mark.skipif(have_s3() is not None, reason=str(have_s3()))

BUCKET = "guardian-remote-tests"


@pytest.fixture(scope="module")
def moto():
    server = MotoServer()
    try:
        make_bucket(server.url, BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(moto, monkeypatch, request):
    """This test's own prefix in the bucket, with the provider-chain environment set."""
    for k, v in s3_env(moto.url).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("GUARDIAN_REMOTE_EXIT_WAIT", "120")
    return f"s3://{BUCKET}/{request.node.name}/run"


def s3fs_client(endpoint: str):
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, endpoint_url=endpoint)


# ---------------------------------------------------------------- a training script

JOB = r"""
import json, os, random, signal, sys, time
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import guardian
from safetensors.torch import save_file

run_dir, url, kill_at, out = sys.argv[1], sys.argv[2] or None, int(sys.argv[3]), sys.argv[4]
random.seed(0)  # a reproducible script seeds every RNG it has
np.random.seed(0)
torch.manual_seed(0)
x = torch.randn(96, 10, generator=torch.Generator().manual_seed(1))
y = (x[:, 0] > 0).long()
loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(2))
model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 2))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
with guardian.protect(model=model, optimizer=opt, loader=loader, dir=run_dir, replicate_to=url,
                      every_steps=4, keep_last=2) as g:
    for epoch in g.epochs(3):
        for xb, yb in g.batches(loader):
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            g.step()
            if g.global_step == kill_at:  # the node is lost once the newest save is remote-durable
                saved = kill_at - kill_at % 4  # every_steps=4: the newest save before the kill
                g.saver.wait_in_flight()  # its commit is handed to the replicator (as g.step() would)
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    try:
                        with open(os.path.join(run_dir, "remote.json")) as f:
                            if json.load(f)["step"] >= saved:
                                break
                    except (OSError, ValueError, KeyError):
                        pass
                    time.sleep(0.05)
                os.kill(os.getpid(), signal.SIGKILL)
    print("RESUMED_FROM", g.resumed_from)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)
"""


def run_job(tmp_path, run_dir: str, url: str | None, kill_at: int = -1, env: dict | None = None, name="out"):
    script = tmp_path / "job.py"
    script.write_text(JOB)
    out = str(tmp_path / f"{name}.safetensors")
    proc = subprocess.run(
        [sys.executable, str(script), run_dir, url or "", str(kill_at), out],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
        start_new_session=True,
    )
    return proc, out


def same_weights(a: str, b: str) -> bool:
    from safetensors.torch import load_file

    ta, tb = load_file(a), load_file(b)
    return ta.keys() == tb.keys() and all(ta[k].dtype == tb[k].dtype and ta[k].equal(tb[k]) for k in ta)


# ---------------------------------------------------------------- must show


@pytest.mark.slow
def test_node_lost_resumes_from_remote_bitwise(s3, moto, tmp_path):
    """Training replicates; the process is SIGKILLed and its run directory deleted (the
    node is lost); the same script on an empty directory resumes from the remote and
    ends bitwise equal to a run that was never interrupted."""
    twin, twin_out = run_job(tmp_path, str(tmp_path / "twin"), None, name="twin")
    assert twin.returncode == 0, twin.stderr

    node_a = str(tmp_path / "node-a")
    killed, _ = run_job(tmp_path, node_a, s3, kill_at=14, name="a")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    shutil.rmtree(node_a)  # node lost
    from guardian.remote.fetch import remote_checkpoints
    from guardian.remote.store import RemoteStore

    durable = [n for n, _m, p in remote_checkpoints(RemoteStore(s3)) if p is None]
    # step 12 ends epoch 0: its step save and its epoch save are one checkpoint
    assert durable and durable[-1].startswith("step-000000012"), durable

    node_b = str(tmp_path / "node-b")
    resumed, out = run_job(tmp_path, node_b, s3, name="b")
    assert resumed.returncode == 0, resumed.stderr
    resumed_from = resumed.stdout.split("RESUMED_FROM", 1)[1].split()[0]
    assert os.path.basename(resumed_from) == durable[-1], resumed.stdout  # the newest durable one
    assert same_weights(out, twin_out)

    from helpers import final_digest

    assert final_digest(node_b)[1] == final_digest(str(tmp_path / "twin"))[1]
    # the credentials never reach the run directory or the log
    for root, _dirs, files in os.walk(node_b):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                assert b"testing-secret-never-logged" not in fh.read()
    assert "testing-secret-never-logged" not in resumed.stdout + resumed.stderr


def test_upload_killed_midway_is_never_accepted(s3, moto, tmp_path):
    """SIGKILL-equivalent exit right after a checkpoint's first object is uploaded (a
    fault point, so the moment is exact): no reader lists or accepts that checkpoint,
    the previous remote one still verifies, and the next start cleans the leftovers."""
    from guardian.faults import FAULT_EXIT_CODE
    from guardian.remote.fetch import download, remote_checkpoints
    from guardian.remote.store import RemoteStore

    run_dir = str(tmp_path / "run")
    # hit 1-2: the first checkpoint's two files (then its manifest); hit 3: the next one's first
    proc, _ = run_job(tmp_path, run_dir, s3, env={"GUARDIAN_FAULT": "remote.file_uploaded@3"})
    assert proc.returncode == FAULT_EXIT_CODE, proc.stderr

    store = RemoteStore(s3)
    names = [n for n, m, problem in remote_checkpoints(store) if problem is None]
    half = [n for n in store.checkpoint_dirs() if n not in names]
    assert len(names) == 1 and len(half) == 1, (names, half)
    assert not store.exists(half[0], "manifest.json")
    scratch = str(tmp_path / "scratch")
    os.mkdir(scratch)
    from guardian.format import reader

    assert reader.inspect_checkpoint(download(store, names[0], scratch), verify=True).valid

    from guardian.policies import Retention
    from guardian.remote.upload import Replicator

    replicator = Replicator(store, scratch, Retention(3, 1, None), None)
    try:
        wait_until(
            lambda: not store.checkpoint_dirs() or half[0] not in store.checkpoint_dirs(),
            60,
            "the half-uploaded checkpoint to be cleaned",
        )
    finally:
        replicator.close(timeout=30)
    assert [n for n, _m, _p in remote_checkpoints(store)] == names


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "delete"])
def test_damaged_remote_object_skipped_for_older(s3, moto, tmp_path, damage, caplog):
    """A corrupted, truncated or missing object of the newest remote checkpoint is
    detected while downloading; that checkpoint is skipped and the next older used."""
    from guardian.remote.fetch import fetch_restorable, remote_checkpoints
    from guardian.remote.store import RemoteStore

    proc, _ = run_job(tmp_path, str(tmp_path / "a"), s3)
    assert proc.returncode == 0, proc.stderr
    store = RemoteStore(s3)
    names = [n for n, _m, _p in remote_checkpoints(store)]
    assert len(names) >= 2, names
    newest, older = names[-1], names[-2]
    fs = s3fs_client(moto.url)
    key = f"{s3[len('s3://') :]}/{newest}/tensors.safetensors"
    data = fs.cat_file(key)
    if damage == "corrupt":
        flipped = bytearray(data)
        flipped[len(flipped) // 2] ^= 0x40
        fs.pipe_file(key, bytes(flipped))
    elif damage == "truncate":
        fs.pipe_file(key, data[: len(data) // 2])
    else:
        fs.rm_file(key)

    fresh = str(tmp_path / "b")
    os.mkdir(fresh)
    with caplog.at_level("ERROR", logger="guardian.remote.fetch"):
        chosen = fetch_restorable(s3, fresh, lambda path: None)
    assert chosen is not None and os.path.basename(chosen) == older
    assert any(newest in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    assert not os.path.exists(os.path.join(fresh, newest))  # nothing half-downloaded is left
    assert [n for n in os.listdir(fresh) if n.startswith(".tmp")] == []


# ---------------------------------------------------------------- bad input


def tiny_objects():
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_missing_bucket_fails_at_protect_entry(s3, tmp_path):
    import guardian
    from guardian.errors import RemoteStoreError

    model, opt = tiny_objects()
    with pytest.raises(RemoteStoreError, match="no-such-guardian-bucket.*bucket exists"):
        guardian.protect(
            model=model,
            optimizer=opt,
            dir=str(tmp_path / "run"),
            replicate_to="s3://no-such-guardian-bucket/run",
        )
    assert not (tmp_path / "run").exists()  # refused before anything was created


def test_unwritable_shared_path_fails_at_protect_entry(tmp_path):
    """A shared-file-system target that cannot be written (here: below a regular file)."""
    import guardian
    from guardian.errors import RemoteStoreError

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    model, opt = tiny_objects()
    with pytest.raises(RemoteStoreError, match="cannot write"):
        guardian.protect(
            model=model, optimizer=opt, dir=str(tmp_path / "run"), replicate_to=str(blocker / "run")
        )


def test_shared_filesystem_target_round_trip(tmp_path):
    """A plain path (a shared file system) works like a bucket."""
    import guardian
    from guardian.remote.fetch import remote_checkpoints
    from guardian.remote.store import RemoteStore

    target = str(tmp_path / "shared" / "run")
    model, opt = tiny_objects()
    with guardian.protect(
        model=model, optimizer=opt, dir=str(tmp_path / "run"), replicate_to=target, every_epochs=1
    ) as g:
        for _ in g.epochs(2):
            pass
    assert [n for n, m, p in remote_checkpoints(RemoteStore(target)) if p is None]


@pytest.mark.slow
def test_endpoint_hangs_mid_upload_training_unaffected(moto, monkeypatch, tmp_path, caplog):
    """The endpoint stops answering during an upload: training steps on (the upload
    thread times out and retries with backoff), at most one checkpoint waits behind the
    one in flight and the newest wins; once the endpoint answers, the newest is durable."""
    from fault_helpers import save_checkpoint

    from guardian.format import manifest as manifest_mod
    from guardian.policies import Retention
    from guardian.remote.fetch import remote_checkpoints
    from guardian.remote.store import RemoteStore
    from guardian.remote.upload import Replicator

    proxy = FreezableProxy(moto.port)
    for k, v in s3_env(proxy.url).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("GUARDIAN_REMOTE_TIMEOUT", "2")
    url = f"s3://{BUCKET}/hang/run"
    run_dir = str(tmp_path / "run")
    os.mkdir(run_dir)
    store = RemoteStore(url)
    replicator = Replicator(store, run_dir, Retention(10, 1, None), None)
    try:
        paths = [save_checkpoint(run_dir, s, numel=300_000) for s in (1, 2, 3, 4)]
        mans = [manifest_mod.read(p) for p in paths]
        replicator.committed(paths[0], mans[0])
        assert replicator.wait_idle(120)  # the endpoint answers: the first one is durable
        proxy.freeze()
        replicator.committed(paths[1], mans[1])
        wait_until(lambda: replicator._busy, 30, "the upload to start")
        with caplog.at_level("WARNING", logger="guardian.remote.upload"):
            started = time.monotonic()
            for p, m in zip(paths[2:], mans[2:]):
                replicator.committed(p, m)  # the trainer's side: never blocks
            assert time.monotonic() - started < 1.0
            pending = replicator._pending
            assert pending is not None and pending[1].name == mans[3].name  # one waits: the newest
            wait_until(
                lambda: sum("retrying" in r.getMessage() for r in caplog.records) >= 2,
                120,
                "failed attempts to be retried",
            )
        proxy.thaw()
        assert replicator.wait_idle(180)
    finally:
        proxy.thaw()
        replicator.close(timeout=60)
        proxy.close()
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto.url)  # past the proxy, straight to the server
    names = [n for n, _m, p in remote_checkpoints(RemoteStore(url)) if p is None]
    assert mans[3].name in names  # the newest became durable
    assert mans[0].name in names
    assert mans[1].name not in names  # given up: a newer checkpoint was waiting
    assert mans[2].name not in names  # superseded while waiting
    assert replicator.durable is not None and replicator.durable.name == mans[3].name


def test_hostile_prefix_objects_are_refused(s3, moto, tmp_path):
    """A prefix holding garbage, forged manifests (paths out of the checkpoint, pickles,
    a manifest copied under another name) and a sibling prefix: the only checkpoint
    fetched is the genuine one, nothing outside the checkpoint is written locally."""
    from fault_helpers import save_checkpoint

    from guardian.format.manifest import FileEntry, Manifest
    from guardian.remote.fetch import fetch_restorable, remote_checkpoints
    from guardian.remote.store import RemoteStore

    fs = s3fs_client(moto.url)
    root = s3[len("s3://") :]
    local = str(tmp_path / "src")
    os.mkdir(local)
    good = save_checkpoint(local, 2)
    fs.put(good, f"{root}/step-000000002", recursive=True)
    sibling = save_checkpoint(local, 99)
    fs.put(sibling, f"{root}-other/step-000000099", recursive=True)  # another run: a sibling prefix

    def forged(name: str, files: dict, seq: int, manifest_name: str | None = None) -> None:
        man = Manifest(name=manifest_name or name, step=seq, epoch=0, seq=seq, files=files)
        fs.pipe_file(f"{root}/{name}/manifest.json", man.to_bytes())

    entry = FileEntry(bytes=4, hash="0" * 32)
    fs.pipe_file(f"{root}/step-000000009/manifest.json", b"\x80\x04garbage")
    forged("step-000000010", {"../../outside.json": entry}, 10)
    forged("step-000000011", {"model.pkl": entry}, 11)
    forged("step-000000012", {}, 12, manifest_name="step-000000002")
    fs.pipe_file(f"{root}/step-000000013/manifest.json", b"{" * 10_000_000 + b"}")  # parser bomb
    fs.pipe_file(f"{root}/not-a-checkpoint/manifest.json", b"{}")

    listed = {n: p for n, _m, p in remote_checkpoints(RemoteStore(s3))}
    assert "not-a-checkpoint" not in listed and "step-000000099" not in listed
    assert listed["step-000000002"] is None
    assert all(listed[f"step-0000000{i}"] for i in ("09", "10", "11", "12", "13")), listed

    fresh = str(tmp_path / "fresh")
    os.mkdir(fresh)
    chosen = fetch_restorable(s3, fresh, lambda path: None)
    assert chosen is not None and os.path.basename(chosen) == "step-000000002"
    assert sorted(os.listdir(fresh)) == ["step-000000002"]
    assert not (tmp_path / "outside.json").exists()


# ---------------------------------------------------------------- the command line


def test_cli_ls_and_verify_read_remote_prefixes(s3, moto, tmp_path):
    """`guardian ls/verify s3://…` list committed remote checkpoints and hash their
    objects; a corrupted object makes verify exit 3 naming it."""
    from click.testing import CliRunner
    from fault_helpers import save_checkpoint

    from guardian.cli import main

    fs = s3fs_client(moto.url)
    root = s3[len("s3://") :]
    local = str(tmp_path / "src")
    os.mkdir(local)
    for step in (1, 2):
        fs.put(save_checkpoint(local, step), f"{root}/step-00000000{step}", recursive=True)
    r = CliRunner().invoke(main, ["ls", "--json", s3])
    assert r.exit_code == 0, r.output
    assert [row["name"] for row in json.loads(r.output)] == ["step-000000001", "step-000000002"]
    r = CliRunner().invoke(main, ["verify", s3])
    assert r.exit_code == 0 and "2 of 2 checkpoint(s) valid" in r.output, r.output

    key = f"{root}/step-000000002/tensors.safetensors"
    data = bytearray(fs.cat_file(key))
    data[-1] ^= 1
    fs.pipe_file(key, bytes(data))
    r = CliRunner().invoke(main, ["verify", s3 + "/step-000000002"])
    assert r.exit_code == 3 and "hash" in r.output and "tensors.safetensors" in r.output, r.output


def test_cli_run_replicate_to_stores_the_url_not_credentials(s3, tmp_path):
    from click.testing import CliRunner

    from guardian.cli import main
    from guardian.daemon import registry as reg

    h = str(tmp_path / "h")
    r = CliRunner().invoke(main, ["run", "--home", h, "--name", "x", "--replicate-to", s3, "--", "true"])
    assert r.exit_code == 0, r.output
    env = reg.load_spec(reg.Home(h), "x").env
    assert env["GUARDIAN_REPLICATE_TO"] == s3
    assert "AWS_SECRET_ACCESS_KEY" not in env and "AWS_ACCESS_KEY_ID" not in env
    with open(reg.Home(h).job_file("x", "job.json")) as f:
        assert "testing-secret-never-logged" not in f.read()
    r = CliRunner().invoke(
        main, ["run", "--home", h, "--name", "y", "--replicate-to", "s3://user:pw@bucket/run", "--", "true"]
    )
    assert r.exit_code != 0 and "without credentials" in r.output


def test_upload_slower_than_local_retention_still_finishes(tmp_path, monkeypatch, caplog):
    """Uploads slower than ``keep_last`` local saves: the checkpoint uploading is kept
    from local retention until its upload ends, so it becomes durable instead of losing
    its files midway (found by CI on a loaded machine: with keep_last=2 the first upload
    lost its files, was given up, and the kill test's counts shifted). The slow network
    is a gate in ``put_chunks``, the one seam a checkpoint's bytes pass to the store."""
    import guardian
    from guardian.remote.fetch import remote_checkpoints
    from guardian.remote.store import RemoteStore

    gate, first_upload_began = threading.Event(), threading.Event()
    real_put = RemoteStore.put_chunks

    def slow_put(self, key, chunks):
        if "/" in key:  # a checkpoint's object (NAME/file); protect()'s write probe passes
            if key.startswith("step-000000001/"):
                first_upload_began.set()
            assert gate.wait(120), "the test never opened the gate"
        return real_put(self, key, chunks)

    monkeypatch.setattr(RemoteStore, "put_chunks", slow_put)
    target = str(tmp_path / "shared" / "run")
    model, opt = tiny_objects()
    with caplog.at_level("INFO", logger="guardian.remote.upload"):
        with guardian.protect(
            model=model,
            optimizer=opt,
            dir=str(tmp_path / "run"),
            replicate_to=target,
            every_steps=1,
            keep_last=1,
        ) as g:
            try:
                for step in range(1, 7):
                    opt.step()  # an optimizer step: g.step() is a boundary, so every_steps=1 saves
                    g.step()  # steps 2-5 commit (and run retention) while step 1 uploads
                    if step == 1:  # else, on a busy machine, step 2 may supersede it unstarted
                        g.saver.wait_in_flight()  # the commit, reaped, goes to the replicator
                        assert first_upload_began.wait(120), "step 1's upload never began"
            finally:
                gate.set()
    said = [r.getMessage() for r in caplog.records]
    assert any("step-000000001 is durable" in m for m in said), said
    assert not [m for m in said if "not uploaded" in m or "giving up" in m or "failed" in m], said
    durable = [n for n, _m, p in remote_checkpoints(RemoteStore(target)) if p is None]
    assert durable == ["step-000000006"], durable  # keep_last=1 mirrored
    assert RemoteStore(target).checkpoint_dirs() == durable
