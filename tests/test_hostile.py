"""Hostile checkpoints: nothing is unpickled, nothing escapes the checkpoint directory,
no parser crashes on absurd input, and every refusal is a ``GuardianError`` that says why.
"""

from __future__ import annotations

import base64
import json
import math
import os
import pickle
import re
import shutil
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardian.errors import CorruptCheckpointError, GuardianError, UnsafeCheckpointError
from guardian.format import manifest as manifest_mod
from guardian.format import safetensors_io, strictjson
from guardian.format.hashing import hash_file
from guardian.format.layout import MANIFEST_FILE, STATE_FILE, TENSORS_FILE, checkpoint_name
from guardian.format.reader import inspect_checkpoint, newest_valid
from guardian.format.tree import TAGS, Decoder, Encoder

STEP1, STEP2 = checkpoint_name(1), checkpoint_name(2)


def _rewrite_manifest(ckpt: str, edit) -> None:
    path = os.path.join(ckpt, MANIFEST_FILE)
    with open(path) as f:
        obj = json.load(f)
    edit(obj)
    obj["manifest_hash"] = manifest_mod.self_hash(obj)  # a hostile writer re-signs too
    with open(path, "w") as f:
        json.dump(obj, f)


def _list_file(ckpt: str, rel: str) -> None:
    """Make the manifest vouch for ``rel`` (size and hash match): the hostile case."""
    digest, size = hash_file(os.path.join(ckpt, rel))
    _rewrite_manifest(ckpt, lambda o: o["files"].__setitem__(rel, {"bytes": size, "hash": digest}))


def _falls_back(run: str) -> None:
    best = newest_valid(run)
    assert best is not None and best.name == STEP1


# ---------------------------------------------------------------------------- pickle


class _Boom:
    """Unpickling this creates the marker file: proof that something was unpickled."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _payloads(marker: str) -> dict[str, bytes]:
    _Boom.marker = marker
    import io

    import torch

    buf = io.BytesIO()
    torch.save({"w": _Boom()}, buf)  # torch's zip container around the same pickle
    return {"pickle": pickle.dumps(_Boom(), protocol=2), "torch.save": buf.getvalue()}


def _loaders():
    from guardian.state import snapshot

    return snapshot


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
@pytest.mark.parametrize("rel", [TENSORS_FILE, STATE_FILE, MANIFEST_FILE])
@pytest.mark.parametrize("vouched", [False, True])
def test_pickle_payload_is_refused_and_never_unpickled(kind, rel, vouched, run, tmp_path):
    marker = str(tmp_path / "UNPICKLED")
    ckpt = os.path.join(run, STEP2)
    target = os.path.join(ckpt, rel)
    with open(target, "wb") as f:
        f.write(_payloads(marker)[kind])
    if vouched and rel != MANIFEST_FILE:
        _list_file(ckpt, rel)
    info = inspect_checkpoint(ckpt, verify=True)
    assert not info.valid
    assert info.problems[0].startswith(target), info.problems
    if rel == TENSORS_FILE and vouched:
        assert "not a safetensors file" in info.problems[0] or "safetensors header" in info.problems[0]
    if rel != TENSORS_FILE and (vouched or rel == MANIFEST_FILE):
        assert "not valid JSON" in info.problems[0]
    _falls_back(run)
    snapshot = _loaders()
    with pytest.raises(GuardianError) as e:
        snapshot.load(ckpt) if rel != MANIFEST_FILE else manifest_mod.read(ckpt)
    assert target in str(e.value)
    assert not os.path.exists(marker), "a pickle was executed"


def test_unlisted_pt_file_is_refused(run, tmp_path):
    marker = str(tmp_path / "UNPICKLED")
    target = os.path.join(run, STEP2, "model.pt")
    with open(target, "wb") as f:
        f.write(_payloads(marker)["torch.save"])
    info = inspect_checkpoint(os.path.join(run, STEP2))
    assert info.problems == [f"{target}: not listed in the manifest (unexpected file)"]
    _falls_back(run)
    assert not os.path.exists(marker)


def test_listed_pt_file_is_refused(run, tmp_path):
    marker = str(tmp_path / "UNPICKLED")
    ckpt = os.path.join(run, STEP2)
    with open(os.path.join(ckpt, "model.pt"), "wb") as f:
        f.write(_payloads(marker)["torch.save"])
    _list_file(ckpt, "model.pt")
    try:
        assert not inspect_checkpoint(ckpt).valid
    finally:
        assert not os.path.exists(marker)


# -------------------------------------------------------------- escaping the checkpoint

TRAVERSAL = [
    "../x",
    "../step-000000001/state.json",
    "/etc/passwd",
    "a/../../x",
    "./state.json",
    "a//b",
    "a\\b",
    "x\x00y",
    "..",
    "",
    MANIFEST_FILE,
    "sub/../state.json",
]


@pytest.mark.parametrize("rel", TRAVERSAL)
def test_manifest_path_traversal_is_refused(rel, run):
    ckpt = os.path.join(run, STEP2)
    _rewrite_manifest(ckpt, lambda o: o["files"].__setitem__(rel, {"bytes": 1, "hash": "0" * 32}))
    with pytest.raises(UnsafeCheckpointError, match="outside the checkpoint") as e:
        manifest_mod.read(ckpt)
    assert repr(rel) in str(e.value) and MANIFEST_FILE in str(e.value)
    info = inspect_checkpoint(ckpt)
    assert not info.valid and "refusing file path" in info.problems[0]
    _falls_back(run)


def test_symlink_to_outside_file_is_refused(run, tmp_path):
    ckpt = os.path.join(run, STEP2)
    outside = str(tmp_path / "outside.json")
    shutil.copy(os.path.join(ckpt, STATE_FILE), outside)
    os.unlink(os.path.join(ckpt, STATE_FILE))
    os.symlink(outside, os.path.join(ckpt, STATE_FILE))
    info = inspect_checkpoint(ckpt)
    assert len(info.problems) == 1
    assert info.problems[0].startswith(
        f"{os.path.join(ckpt, STATE_FILE)}: not a regular file (symlinks and devices are refused"
    )
    _falls_back(run)


def test_symlinked_subdirectory_to_outside_is_refused(run, tmp_path):
    ckpt = os.path.join(run, STEP2)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(os.path.join(ckpt, STATE_FILE), outside / STATE_FILE)
    os.symlink(outside, os.path.join(ckpt, "sub"))
    _list_file(ckpt, f"sub/{STATE_FILE}")
    info = inspect_checkpoint(ckpt)
    assert not info.valid
    assert f"{os.path.join(ckpt, 'sub')}: not listed in the manifest (unexpected file)" in info.problems
    _falls_back(run)


# --------------------------------------------------------------- safetensors headers


def _st_file(tmp_path, header: bytes | dict, data: bytes = b"", length: int | None = None) -> str:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = str(tmp_path / "t.safetensors")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body) if length is None else length) + body + data)
    return path


def _t(dtype="U8", shape=(8,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


ABSURD = {
    "length 2**64-1": (b"{}", b"", 2**64 - 1, UnsafeCheckpointError, "header claims"),
    "length past EOF": (b"{}", b"", 1000, UnsafeCheckpointError, "header claims"),
    "length 101MB": (b"{}", b"", 101 * 1024 * 1024, UnsafeCheckpointError, "header claims"),
    "length 0": (b"{}", b"", 0, CorruptCheckpointError, "not valid JSON"),
    "not an object": (b"[1, 2]", b"", None, CorruptCheckpointError, "not a JSON object"),
    "huge end offset": (
        {"a": _t(offsets=(0, 2**63))},
        b"\0" * 8,
        None,
        CorruptCheckpointError,
        "needs 8 bytes",
    ),
    "huge shape": (
        {"a": _t(shape=(2**47, 2**47), offsets=(0, 2**94))},
        b"",
        None,
        CorruptCheckpointError,
        "invalid shape",
    ),
    "dim 2**48": (
        {"a": _t(shape=(2**48,), offsets=(0, 2**48))},
        b"",
        None,
        CorruptCheckpointError,
        "invalid shape",
    ),
    "overlap": (
        {"a": _t(offsets=(0, 8)), "b": _t(offsets=(4, 12))},
        b"\0" * 12,
        None,
        UnsafeCheckpointError,
        "no holes or overlaps",
    ),
    "hole": (
        {"a": _t(offsets=(0, 8)), "b": _t(offsets=(16, 24))},
        b"\0" * 24,
        None,
        UnsafeCheckpointError,
        "no holes or overlaps",
    ),
    "does not start at 0": (
        {"a": _t(offsets=(8, 16))},
        b"\0" * 16,
        None,
        UnsafeCheckpointError,
        "expected 0",
    ),
    "same range twice": (
        {"a": _t(), "b": _t()},
        b"\0" * 8,
        None,
        UnsafeCheckpointError,
        "no holes or overlaps",
    ),
    "negative offset": ({"a": _t(offsets=(-8, 0))}, b"", None, UnsafeCheckpointError, "invalid data_offsets"),
    "reversed offsets": ({"a": _t(offsets=(8, 0))}, b"", None, UnsafeCheckpointError, "invalid data_offsets"),
    "float offsets": (
        {"a": _t(offsets=(0.0, 8.0))},
        b"\0" * 8,
        None,
        UnsafeCheckpointError,
        "invalid data_offsets",
    ),
    "bool offsets": (
        {"a": _t(shape=(1,), offsets=(False, True))},
        b"\0",
        None,
        UnsafeCheckpointError,
        "invalid data_offsets",
    ),
    "three offsets": (
        {"a": _t(offsets=(0, 4, 8))},
        b"\0" * 8,
        None,
        UnsafeCheckpointError,
        "invalid data_offsets",
    ),
    "negative dim": ({"a": _t(shape=(-8,))}, b"\0" * 8, None, CorruptCheckpointError, "invalid shape"),
    "unknown dtype": ({"a": _t(dtype="PICKLE")}, b"\0" * 8, None, CorruptCheckpointError, "unknown dtype"),
    "padded data": ({"a": _t()}, b"\0" * 9, None, CorruptCheckpointError, "truncated or padded"),
    "short data": ({"a": _t()}, b"\0" * 7, None, CorruptCheckpointError, "truncated or padded"),
    "NUL in key": ({"a\x00b": _t()}, b"\0" * 8, None, UnsafeCheckpointError, "NUL/newline"),
    "newline in key": ({"a\nb": _t()}, b"\0" * 8, None, UnsafeCheckpointError, "NUL/newline"),
    "empty key": ({"": _t()}, b"\0" * 8, None, UnsafeCheckpointError, "empty"),
    "entry not an object": ({"a": [1]}, b"", None, CorruptCheckpointError, "is not an object"),
    "metadata not strings": ({"__metadata__": {"k": 1}}, b"", None, CorruptCheckpointError, "__metadata__"),
    "duplicate key": (
        b'{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},"a":{}}',
        b"\0" * 8,
        None,
        UnsafeCheckpointError,
        "duplicate JSON key 'a'",
    ),
    "NaN literal": (b'{"__metadata__":{"k":NaN}}', b"", None, UnsafeCheckpointError, "NaN"),
    "invalid utf-8": (b'{"\xff":1}', b"", None, CorruptCheckpointError, "not valid JSON"),
    "pickle as header": (pickle.dumps({"a": 1}), b"", None, CorruptCheckpointError, "not valid JSON"),
}


KEY_CASES = ["NUL in key", "newline in key", "empty key"]


@pytest.mark.parametrize("case", sorted(ABSURD))
def test_absurd_safetensors_headers_are_refused(case, tmp_path):
    header, data, length, exc, words = ABSURD[case]
    path = _st_file(tmp_path, header, data, length)
    with pytest.raises(exc) as e:
        safetensors_io.read_layout(path)
    assert words in str(e.value), str(e.value)
    assert str(e.value).startswith(path), str(e.value)


@pytest.mark.parametrize("case", KEY_CASES)
def test_bad_tensor_key_error_names_the_file(case, tmp_path):
    header, data, length, exc, _ = ABSURD[case]
    path = _st_file(tmp_path, header, data, length)
    with pytest.raises(exc) as e:
        safetensors_io.read_layout(path)
    assert str(e.value).startswith(path), str(e.value)


def test_file_shorter_than_length_prefix(tmp_path):
    for n in range(8):
        path = str(tmp_path / f"s{n}")
        with open(path, "wb") as f:
            f.write(b"\x01" * n)
        with pytest.raises(CorruptCheckpointError, match="too short for a safetensors file"):
            safetensors_io.read_layout(path)


# ----------------------------------------------------------------------------- JSON


def test_duplicate_keys_in_manifest_are_refused(run):
    ckpt = os.path.join(run, STEP2)
    path = os.path.join(ckpt, MANIFEST_FILE)
    with open(path, "rb") as f:
        text = f.read()
    with open(path, "wb") as f:
        f.write(text.replace(b'"step": 2,', b'"step": 2,\n "step": 1,', 1))
    with pytest.raises(UnsafeCheckpointError, match=r"duplicate JSON key 'step'"):
        manifest_mod.read(ckpt)
    info = inspect_checkpoint(ckpt)
    assert info.problems[0].startswith(path) and "duplicate JSON key 'step'" in info.problems[0]
    _falls_back(run)


def test_duplicate_keys_in_state_json_are_refused(run):
    ckpt = os.path.join(run, STEP2)
    path = os.path.join(ckpt, STATE_FILE)
    with open(path, "rb") as f:
        text = f.read()
    assert text.startswith(b"{")
    with open(path, "wb") as f:
        f.write(b'{"format":"x",' + text[1:])
    _list_file(ckpt, STATE_FILE)
    info = inspect_checkpoint(ckpt)
    assert info.problems == [f"{path}: duplicate JSON key 'format'"]
    _falls_back(run)


DEEP = 100_000
# shallow-but-long nesting is refused by depth; long files of nesting by their parse cost first
REFUSED_DEEP = "nested too deeply|tiny lists"


@pytest.mark.parametrize("shape", ["list", "object"])
def test_deeply_nested_json_is_refused_without_crashing(shape, run, tmp_path):
    body = (b"[" * DEEP + b"]" * DEEP) if shape == "list" else (b'{"a":' * DEEP + b"1" + b"}" * DEEP)
    with pytest.raises(UnsafeCheckpointError, match=REFUSED_DEEP):
        strictjson.loads(body, what="x")
    # ... through each reader that takes JSON from disk.
    with pytest.raises(UnsafeCheckpointError, match=REFUSED_DEEP):
        manifest_mod.parse(body, "m.json")
    path = _st_file(tmp_path, body, b"")
    with pytest.raises(UnsafeCheckpointError, match=REFUSED_DEEP):
        safetensors_io.read_layout(path)
    ckpt = os.path.join(run, STEP2)
    with open(os.path.join(ckpt, STATE_FILE), "wb") as f:
        f.write(body)
    _list_file(ckpt, STATE_FILE)
    info = inspect_checkpoint(ckpt)
    assert re.search(REFUSED_DEEP, info.problems[0])
    _falls_back(run)


def test_nesting_limit_boundary():
    ok = b"[" * strictjson.MAX_DEPTH + b"]" * strictjson.MAX_DEPTH
    assert strictjson.loads(ok, what="x") is not None
    too = b"[" * (strictjson.MAX_DEPTH + 1) + b"]" * (strictjson.MAX_DEPTH + 1)
    with pytest.raises(UnsafeCheckpointError, match=f"deeper than {strictjson.MAX_DEPTH}"):
        strictjson.loads(too, what="x")


def test_manifest_with_huge_number_does_not_break_recovery(run):
    ckpt = os.path.join(run, STEP2)
    path = os.path.join(ckpt, MANIFEST_FILE)
    with open(path, "rb") as f:
        text = f.read()
    with open(path, "wb") as f:
        f.write(text.replace(b'"created_unix": ', b'"created_unix": 1' + b"0" * 400 + b', "x": ', 1))
    info = inspect_checkpoint(ckpt)
    assert not info.valid and info.problems[0].startswith(path)
    _falls_back(run)


# ------------------------------------------------------------------- keys with NUL/newline


def test_state_keys_with_nul_newline_and_slashes_round_trip(tmp_path):
    import torch

    from guardian.commit import CheckpointTxn
    from guardian.format.manifest import Manifest
    from guardian.state.snapshot import capture, load, write_files

    keys = ["a\x00b", "c\nd", "e\rf", "g/h", "i%2Fj", "[k]", "__tensor__", "\u2603 snow", "l#1"]
    tree = {k: torch.full((2,), float(i)) for i, k in enumerate(keys)}
    tree["meta"] = {k: k for k in keys}
    run = str(tmp_path / "run")
    os.mkdir(run)
    with CheckpointTxn(run, STEP1) as txn:
        write_files(txn, capture({"m\n/x": ("module", tree)}))
        txn.commit(Manifest(name=STEP1, step=1, epoch=0, seq=1, files={}))
    assert inspect_checkpoint(os.path.join(run, STEP1)).valid
    ((kind, back),) = load(os.path.join(run, STEP1)).values()
    assert kind == "module" and set(back) == set(tree)
    for k in keys:
        assert torch.equal(back[k], tree[k])
    assert back["meta"] == tree["meta"]
    # no tensor key inside the safetensors file holds NUL or a newline
    layout = safetensors_io.read_layout(os.path.join(run, STEP1, TENSORS_FILE))
    assert all("\x00" not in e.key and "\n" not in e.key and "\r" not in e.key for e in layout.entries)


def test_plan_layout_refuses_nul_and_newline_keys():
    for key in ["a\x00", "b\n", "c\r", ""]:
        with pytest.raises(UnsafeCheckpointError, match="NUL/newline"):
            safetensors_io.plan_layout([(key, "U8", (1,))])


# -------------------------------------------------------------- the tree encoder (property)


class FakeTensor:
    def __init__(self, n: int) -> None:
        self.n = n


def same(a, b) -> bool:
    """Structural equality that also checks types (tuple vs list, bool vs int, -0.0, nan).

    The order of str-keyed dicts is not compared: strictjson writes sorted keys by design
    (canonical bytes); dicts stored as ``__dict__`` pairs keep their order."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        if len(a) != len(b):
            return False
        if all(isinstance(k, str) for k in a) and not (TAGS & a.keys()):
            return set(a) == set(b) and all(same(v, b[k]) for k, v in a.items())
        bk = list(b)
        for i, (k, v) in enumerate(a.items()):
            if not same(k, bk[i]) or not same(v, b[bk[i]]):
                return False
        return True
    if isinstance(a, FakeTensor):
        return a is b
    return a == b


HOSTILE_TEXT = st.one_of(
    st.sampled_from(
        sorted(TAGS)
        + ["v", "[0]", "a/b", "../x", "%2F", "\u202e", "key\x00", "\n", "", "{}", "__tensor__ ", "__TUPLE__"]
    ),
    st.text(max_size=8),
)
KEYS = st.one_of(
    HOSTILE_TEXT,
    st.integers(min_value=-(2**70), max_value=2**70),
    st.booleans(),
    st.none(),
    st.binary(max_size=4),
    st.floats(allow_nan=False),
    st.tuples(st.integers(-3, 3), HOSTILE_TEXT),
)
LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(),
    HOSTILE_TEXT,
    st.binary(max_size=8),
    st.integers(0, 5).map(FakeTensor),
)
TREES = st.recursive(
    LEAVES,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4),
        st.lists(kids, max_size=4).map(tuple),
        st.dictionaries(KEYS, kids, max_size=4),
        st.dictionaries(st.sampled_from(sorted(TAGS) + ["v"]), kids, min_size=1, max_size=2),
    ),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(TREES)
def test_tree_round_trips_hostile_keys(tree):
    store: dict[str, FakeTensor] = {}

    def put(parts, t):
        key = f"t{len(store)}"
        store[key] = t
        return key

    encoded = Encoder(lambda v: isinstance(v, FakeTensor), put).encode(tree)
    on_disk = strictjson.dumps(encoded)
    back = Decoder(store.__getitem__).decode(strictjson.loads(on_disk, what="state.json"))
    assert same(tree, back), (tree, back)


def test_lone_surrogate_string_round_trips_or_is_refused_clearly():
    tree = {"data_path": os.fsdecode(b"/data/\xff.bin")}
    encoded = Encoder(lambda v: False, None).encode(tree)
    try:
        back = Decoder(None).decode(strictjson.loads(strictjson.dumps(encoded), what="s"))
    except GuardianError:
        return
    assert back == tree


HOSTILE_STATE = [
    pytest.param({"__bytes__": "!!not base64!!"}, id="bytes-not-base64"),
    pytest.param({"__bytes__": 5}, id="bytes-int"),
    pytest.param({"__tuple__": 5}, id="tuple-int"),
    pytest.param({"__dict__": 5}, id="dict-int"),
    pytest.param({"__dict__": [[[1], 2]]}, id="dict-unhashable-key"),
    pytest.param({"__float__": "NaN"}, id="float-bad-tag"),
    pytest.param({"__ext__": "x", "v": 1}, id="ext-without-decoder"),
]


@pytest.mark.parametrize("value", HOSTILE_STATE)
def test_decoder_hostile_tags_raise_guardian_error(value):
    with pytest.raises(GuardianError, match="state at"):
        Decoder(lambda k: k).decode({"x": value})


# ------------------------------------------------------------- parsers on random bytes


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_read_layout_on_random_bytes(tmp_path, data):
    path = str(tmp_path / "fuzz.safetensors")
    with open(path, "wb") as f:
        f.write(data)
    try:
        safetensors_io.read_layout(path)
    except GuardianError:
        pass


JSONISH = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=6),
    ),
    lambda kids: st.one_of(
        st.lists(kids, max_size=3), st.dictionaries(st.text(max_size=4), kids, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.dictionaries(st.text(max_size=3), JSONISH, max_size=3),
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c"]),
            st.sampled_from(["U8", "F32", "BOOL", "X"]),
            st.lists(st.integers(-1, 4), max_size=3),
            st.lists(st.integers(-2, 40), max_size=3),
        ),
        max_size=4,
    ),
    st.integers(0, 64),
)
def test_read_layout_on_structured_garbage(tmp_path, extra, tensors, data_len):
    header = dict(extra)
    for key, dtype, shape, offsets in tensors:
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
    path = _st_file(tmp_path, json.dumps(header).encode(), b"\0" * data_len)
    try:
        layout = safetensors_io.read_layout(path)
    except GuardianError:
        return
    assert layout.total_bytes == os.path.getsize(path)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_manifest_parse_on_random_bytes(data):
    try:
        manifest_mod.parse(data, "m.json")
    except GuardianError:
        pass


MANIFEST_FIELDS = [
    "format",
    "version",
    "name",
    "step",
    "epoch",
    "seq",
    "files",
    "reason",
    "metrics",
    "components",
    "world_size",
    "batch_in_epoch",
    "created_unix",
    "guardian_version",
    "extra",
]


@settings(max_examples=500, deadline=None)
@given(
    st.dictionaries(st.sampled_from(MANIFEST_FIELDS), JSONISH, max_size=15),
    st.dictionaries(st.text(max_size=6), JSONISH, max_size=3),
)
def test_manifest_parse_on_structured_garbage(fields, files):
    obj = {
        "format": "guardian.checkpoint",
        "version": 1,
        "name": "n",
        "step": 1,
        "epoch": 0,
        "seq": 1,
        "files": files,
    }
    obj.update(fields)
    try:
        manifest_mod.parse(json.dumps(obj).encode(), "m.json")
    except GuardianError:
        pass


def test_base64_helper_sanity():
    assert base64.b64decode(Encoder(lambda v: False, None).encode(b"\x00\xff")["__bytes__"]) == b"\x00\xff"
