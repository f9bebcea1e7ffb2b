"""The on-disk format: tagged JSON trees, our safetensors layout, the manifest."""

from __future__ import annotations

import math
import os
import pickle  # only to *build* hostile payloads; guardian itself never imports it

import pytest
import safetensors.torch
import torch

from guardian.errors import CorruptCheckpointError, UnsafeCheckpointError, UnsupportedStateError
from guardian.format import manifest as manifest_mod
from guardian.format import safetensors_io
from guardian.format.tree import Decoder, Encoder
from guardian.state import fileread, snapshot
from guardian.state.tensors import decode_ext, encode_ext, is_tensor


def _roundtrip(tree):
    store = {}

    def put(parts, t):
        key = "/".join(parts) or "root"
        store[key] = t
        return key

    enc = Encoder(is_tensor, put, encode_ext).encode(tree)
    from guardian.format import strictjson

    enc = strictjson.loads(strictjson.dumps(enc), what="test")
    return Decoder(store.__getitem__, decode_ext).decode(enc)


def test_tree_roundtrip_of_torch_state_shapes():
    tree = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2)}},
        "betas": (0.9, 0.999),
        "best": float("inf"),
        "worst": float("-inf"),
        "nan": float("nan"),
        "none": None,
        "bytes": b"\x00\xff",
        "dtype": torch.bfloat16,
        "__tensor__": "not a reference",  # a key that looks like a tag
        (1, "a"): "tuple key",
    }
    out = _roundtrip(tree)
    assert out["betas"] == (0.9, 0.999) and isinstance(out["betas"], tuple)
    assert out["best"] == math.inf and out["worst"] == -math.inf and math.isnan(out["nan"])
    assert out["bytes"] == b"\x00\xff" and out["dtype"] is torch.bfloat16
    assert out["__tensor__"] == "not a reference" and out[(1, "a")] == "tuple key"
    assert torch.equal(out["state"][0]["exp_avg"], tree["state"][0]["exp_avg"])


def test_unsupported_object_names_its_path():
    class Opaque:
        pass

    with pytest.raises(UnsupportedStateError, match=r"at sched\['fn'\]"):
        Encoder(is_tensor, lambda p, t: "k", encode_ext).encode({"fn": Opaque()}, (), "sched")


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool, torch.uint8]
)
def test_our_files_are_standard_safetensors(tmp_path, dtype):
    from guardian.commit import CheckpointTxn

    tensors = {
        "a": (torch.randn(3, 5) * 10).to(dtype),
        "b": torch.zeros(0, dtype=dtype),
        "c": torch.tensor(7).to(dtype),
    }
    snap = snapshot.capture({"model": ("module", tensors)})
    with CheckpointTxn(str(tmp_path), "x") as txn:
        snapshot.write_files(txn, snap)
        txn.commit(manifest_mod.Manifest(name="x", step=0, epoch=0, seq=1, files={}))
    path = os.path.join(tmp_path, "x", "tensors.safetensors")
    theirs = safetensors.torch.load_file(path)  # the reference implementation reads it
    ours = snapshot.read_tensors(path)
    for k, t in tensors.items():
        assert torch.equal(theirs[f"model/{k}"], t) and torch.equal(ours[f"model/{k}"], t)


def test_non_contiguous_and_shared_tensors(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    tree = {"t": base.t(), "tied_a": base, "tied_b": base}
    snap = snapshot.capture({"m": ("module", tree)})
    layout = snap.layout()
    data = b"".join(bytes(c) for c in snapshot.tensor_chunks(snap, layout))
    p = tmp_path / "f.safetensors"
    p.write_bytes(data)
    out = snapshot.read_tensors(str(p))
    assert torch.equal(out["m/t"], base.t()) and torch.equal(out["m/tied_b"], base)


def test_two_stream_restore_into_live_tensors_is_exact(tmp_path, monkeypatch):
    """Large files are read as two streams (snapshot._read_in_two_streams); forced on
    for a small file here: every byte lands in the live tensor it belongs to, and a
    file that shrinks under the reader is still reported as truncated."""
    monkeypatch.setattr(snapshot, "PARALLEL_READ_MIN", 1)
    monkeypatch.setattr(snapshot, "READ_BATCH", 4096)  # many batches, split between the streams
    tensors = {f"w{i}": torch.randn(257 + 300 * i) for i in range(12)}
    tensors["h"] = torch.randn(999, dtype=torch.bfloat16)
    snap = snapshot.capture({"m": ("module", tensors)})
    p = tmp_path / "f.safetensors"
    p.write_bytes(b"".join(bytes(c) for c in snapshot.tensor_chunks(snap, snap.layout())))
    live = {f"m/{k}": torch.zeros_like(t) for k, t in tensors.items()}
    out = snapshot.read_tensors(str(p), into=live)
    for k, t in tensors.items():
        assert out[f"m/{k}"] is not None and torch.equal(live[f"m/{k}"], t)
        assert out[f"m/{k}"].data_ptr() == live[f"m/{k}"].data_ptr()  # no second copy

    class Shrinking:  # the reader validated the header, then the file lost its tail
        def __init__(self):
            self.real = snapshot.preadv_exactly

        def __call__(self, fd, views, offset, path):
            with open(path, "r+b") as f:
                f.truncate(5000)
            return self.real(fd, views, offset, path)

    monkeypatch.setattr(snapshot, "preadv_exactly", Shrinking())
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        snapshot.read_tensors(str(p), into=live)


def _tensor_file(p, tensors: dict[str, torch.Tensor]):
    """``tensors`` (under component ``m``) written as one of guardian's tensor files."""
    snap = snapshot.capture({"m": ("module", tensors)})
    p.write_bytes(b"".join(bytes(c) for c in snapshot.tensor_chunks(snap, snap.layout())))
    return p


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux's /proc")
def test_new_destinations_are_populated_before_the_read(tmp_path):
    """A restart reads the optimizer's moments into new memory: its pages are faulted
    in ahead of the read (MADV_POPULATE_WRITE), and the bytes still land exactly."""
    if not fileread._populate_works:
        pytest.skip("this kernel has no MADV_POPULATE_WRITE (Linux < 5.14)")
    fresh = torch.empty(64 << 20, dtype=torch.uint8)  # untouched: not resident yet
    before = _resident_bytes()
    fileread.populate_for_write([(fresh.data_ptr(), fresh.numel())])
    assert _resident_bytes() - before >= 60 << 20
    assert fileread._populate_works

    tensors = {f"w{i}": torch.randn(70_000 + 13 * i) for i in range(6)}
    p = _tensor_file(tmp_path / "f.safetensors", tensors)
    out = snapshot.read_tensors(str(p))
    assert all(torch.equal(out[f"m/{k}"], t) for k, t in tensors.items())


def test_a_kernel_without_populate_is_read_as_before(tmp_path, monkeypatch):
    """An advice the kernel refuses (simulated: an unknown advice number stands in for
    a kernel older than 5.14, which answers EINVAL the same way) turns populating off
    for the process; the read faults the pages in itself and stays exact."""
    monkeypatch.setattr(fileread, "MADV_POPULATE_WRITE", 0x7FFF)
    monkeypatch.setattr(fileread, "_populate_works", True)
    tensors = {f"w{i}": torch.randn(70_000 + 13 * i) for i in range(6)}
    p = _tensor_file(tmp_path / "f.safetensors", tensors)
    out = snapshot.read_tensors(str(p), expect_hash=None)
    assert all(torch.equal(out[f"m/{k}"], t) for k, t in tensors.items())
    if fileread._madvise() is not None:
        assert not fileread._populate_works


def test_recent_layouts_are_reused_and_refusals_are_never_cached():
    """Every save of a run plans the same layout: it is planned once. A refused plan
    is refused again, and a layout with other shapes is planned anew."""
    specs = [("a", "F32", (2, 3)), ("b", "BF16", (5,))]
    first = safetensors_io.plan_layout(specs, {"format": "x"})
    assert safetensors_io.plan_layout(list(specs), {"format": "x"}) is first
    assert safetensors_io.plan_layout(specs, {"format": "y"}) is not first
    other = safetensors_io.plan_layout([("a", "F32", (3, 3)), ("b", "BF16", (5,))], {"format": "x"})
    assert other.entries[1].begin == 36 and first.entries[1].begin == 24
    for _ in range(2):
        with pytest.raises(UnsafeCheckpointError, match="twice"):
            safetensors_io.plan_layout([("a", "F32", (1,)), ("a", "F32", (1,))])
    assert safetensors_io.plan_layout([("a", "F32", [2])]).entries[0].shape == (2,)  # lists: uncached


def test_header_parser_rejects_holes_and_overlaps(tmp_path):
    good = safetensors_io.plan_layout([("a", "F32", (2,)), ("b", "F32", (2,))])
    p = tmp_path / "f"
    p.write_bytes(good.header + b"\0" * 16)
    assert len(safetensors_io.read_layout(p).entries) == 2
    p.write_bytes(good.header + b"\0" * 17)
    with pytest.raises(CorruptCheckpointError, match="truncated or padded"):
        safetensors_io.read_layout(p)
    import json
    import struct

    hdr = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    body = json.dumps(hdr).encode()
    p.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * 12)
    with pytest.raises(UnsafeCheckpointError, match="no holes or overlaps"):
        safetensors_io.read_layout(p)


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    """A checkpoint whose tensor file is a pickle (with a matching manifest hash, as an
    attacker would write it) is refused; the payload would create a marker file."""
    import guardian
    from guardian.format.hashing import hash_file

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    model = torch.nn.Linear(2, 2)
    run = tmp_path / "run"
    with guardian.protect(model=model, dir=str(run)):
        pass
    ckpt = run / "step-000000000"
    evil = pickle.dumps({"model/weight": Payload()})
    (ckpt / "tensors.safetensors").write_bytes(evil)
    man = (ckpt / "manifest.json").read_text()
    import json

    m = json.loads(man)
    digest, size = hash_file(ckpt / "tensors.safetensors")
    m["files"]["tensors.safetensors"] = {"bytes": size, "hash": digest}
    m["manifest_hash"] = manifest_mod.self_hash(m)  # the attacker re-signs the manifest too
    (ckpt / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(guardian.GuardianError) as e:
        with guardian.protect(model=model, dir=str(run), resume=str(ckpt)):
            pass
    assert "safetensors" in str(e.value) or "header" in str(e.value)
    assert not marker.exists()
    # auto-resume refuses to start over silently: the only checkpoint cannot be restored
    with pytest.raises(guardian.CorruptCheckpointError, match="none can be restored.*step-000000000"):
        with guardian.protect(model=model, dir=str(run)):
            pass
    assert not marker.exists() and not (run / "set-aside").exists()
    # a fresh start, when asked for, sets it aside (never deletes it)
    with guardian.protect(model=model, dir=str(run), resume=False) as g:
        assert g.resumed_from is None
    assert not marker.exists()
    assert os.listdir(run / "set-aside")


def test_manifest_rejects_path_traversal():
    import json

    m = manifest_mod.Manifest(name="x", step=1, epoch=0, seq=1, files={}).to_json()
    for bad in ["../x", "/etc/passwd", "a/../../b", "manifest.json", "a\\b"]:
        m["files"] = {bad: {"bytes": 1, "hash": "0"}}
        m["manifest_hash"] = manifest_mod.self_hash(m)
        with pytest.raises(UnsafeCheckpointError, match="outside the checkpoint"):
            manifest_mod.parse(json.dumps(m).encode(), "m")
