"""Sharded state (guardian/state/sharded.py): DTensor regions, resharding, real ranks.

The single-process tests simulate N saved ranks by cutting a full tensor with an
oracle built on ``torch.chunk`` (what DTensor does), independent of the module's own
``shard_region``; every target shard must equal the oracle's slice bit for bit. The
slow tests run real gloo ranks, FSDP2 ``fully_shard`` included, through guardian's
writer (tests/sharded_worker.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from guardian.errors import CorruptCheckpointError, GuardianError, StateMismatchError
from guardian.state import dtensor, sharded, snapshot
from guardian.state.dtensor import ShardRecord, shard_region
from guardian.state.sharded import assemble_full, assemble_region

TESTS = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(TESTS, "sharded_worker.py")


# ---------------------------------------------------------------------------- helpers


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    flat = lambda t: t.detach().contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
    return torch.equal(flat(a), flat(b))


def oracle_shard(full: torch.Tensor, mesh_shape, placements, coordinate) -> torch.Tensor:
    """DTensor's cut, written with torch.chunk: missing trailing chunks are empty."""
    piece = full
    for code, n, c in zip(placements, mesh_shape, coordinate):
        if code == "R":
            continue
        dim = int(code[1:])
        chunks = torch.chunk(piece, n, dim=dim)
        piece = chunks[c] if c < len(chunks) else piece.narrow(dim, piece.shape[dim], 0)
    return piece


def coordinates(mesh_shape):
    return list(itertools.product(*(range(n) for n in mesh_shape)))


def payload(full: torch.Tensor, mesh_shape, placements, coordinate) -> dict:
    """What ``encode_dtensor`` writes for one rank (before the Encoder stores ``local``)."""
    offsets, local_shape = shard_region(tuple(full.shape), mesh_shape, placements, coordinate)
    local = oracle_shard(full, mesh_shape, placements, coordinate).contiguous()
    return {
        "global_shape": list(full.shape),
        "dtype": str(full.dtype).removeprefix("torch."),
        "mesh_shape": list(mesh_shape),
        "placements": list(placements),
        "coordinate": list(coordinate),
        "offsets": list(offsets),
        "local_shape": list(local_shape),
        "local": local if dtensor.owns_data(placements, coordinate) else None,
    }


def simulate(full: torch.Tensor, mesh_shape, placements) -> list[ShardRecord]:
    """Every saved rank's record, through the real decoder (and its validation)."""
    return [dtensor.decode_dtensor(payload(full, mesh_shape, placements, c)) for c in coordinates(mesh_shape)]


def reshard_everywhere(records, full, mesh_shape, placements) -> None:
    for coord in coordinates(mesh_shape):
        box = shard_region(tuple(full.shape), mesh_shape, placements, coord)
        got = assemble_region(records, box, "w")
        want = oracle_shard(full, mesh_shape, placements, coord)
        assert same_bits(got, want), (mesh_shape, placements, coord)


def random_tensor(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(-1000, 1000, shape, generator=gen, dtype=dtype)


# ---------------------------------------------------------------------------- regions


@pytest.mark.parametrize(
    "shape,mesh,placements",
    [
        ((7, 5), (2,), ["S0"]),
        ((5, 3), (4,), ["S0"]),
        ((1, 3), (3,), ["S0"]),
        ((4, 7), (3,), ["S1"]),
        ((7, 5), (2, 3), ["S0", "S0"]),
        ((7, 5), (2, 3), ["S1", "S0"]),
        ((9, 4), (2, 2), ["S0", "R"]),
        ((9, 4), (2, 2), ["R", "S1"]),
        ((0, 4), (2,), ["S0"]),
    ],
)
def test_shard_region_matches_dtensor(shape, mesh, placements):
    """Our offsets are DTensor's: compared with torch's own (private) helper."""
    utils = pytest.importorskip("torch.distributed.tensor._utils")
    from torch.distributed.tensor import Replicate, Shard

    objs = [Replicate() if p == "R" else Shard(int(p[1:])) for p in placements]
    for coord in coordinates(mesh):
        theirs = utils._compute_local_shape_and_global_offset(shape, mesh, list(coord), objs)
        offsets, local = shard_region(shape, mesh, placements, coord)
        assert (tuple(local), tuple(offsets)) == (tuple(theirs[0]), tuple(theirs[1])), coord
        assert tuple(oracle_shard(torch.empty(shape), mesh, placements, coord).shape) == local


# ---------------------------------------------------------------------------- resharding


RESHARD_PAIRS = [(2, 1), (1, 2), (2, 3), (3, 2), (4, 2)]


@pytest.mark.parametrize("saved,target", RESHARD_PAIRS)
@pytest.mark.parametrize("shape", [(8, 6), (7, 5), (5, 3), (1, 4)])
@pytest.mark.parametrize("placement", ["S0", "S1", "R"])
def test_reshard_1d(saved, target, shape, placement):
    full = random_tensor(shape)
    records = simulate(full, (saved,), [placement])
    for target_placement in ("S0", "S1", "R"):
        reshard_everywhere(records, full, (target,), [target_placement])
    assert same_bits(assemble_full(records), full)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int64, torch.float64, torch.bool])
def test_reshard_dtypes(dtype):
    full = random_tensor((7, 3), dtype) if dtype != torch.bool else random_tensor((7, 3)) > 0
    reshard_everywhere(simulate(full, (3,), ["S0"]), full, (2,), ["S0"])


@pytest.mark.parametrize(
    "saved_mesh,saved_pl,target_mesh,target_pl",
    [
        ((2, 2), ["S0", "R"], (3,), ["S0"]),  # HSDP-like → FSDP on 3 ranks
        ((3,), ["S0"], (2, 2), ["S0", "R"]),
        ((2, 3), ["S0", "S1"], (2, 2), ["R", "S0"]),
        ((2, 3), ["S0", "S0"], (1,), ["R"]),
        ((2, 2), ["R", "S1"], (2, 3), ["S1", "S0"]),
    ],
)
def test_reshard_2d_mesh(saved_mesh, saved_pl, target_mesh, target_pl):
    full = random_tensor((7, 5))
    records = simulate(full, saved_mesh, saved_pl)
    reshard_everywhere(records, full, target_mesh, target_pl)


def test_replicas_store_data_once():
    """Only coordinate 0 along replicated mesh dims writes bytes; the rest tile exactly."""
    records = simulate(random_tensor((9, 4)), (2, 2), ["S0", "R"])
    holding = [r.coordinate for r in records if r.data is not None]
    assert holding == [(0, 0), (1, 0)]
    assert len([r for r in simulate(random_tensor((5,)), (4,), ["R"]) if r.data is not None]) == 1


def test_scalar_and_empty_tensors():
    scalar = torch.tensor(2.5)
    records = simulate(scalar, (3,), ["R"])
    assert same_bits(assemble_full(records), scalar)
    empty = torch.empty(0, 4)
    assert assemble_full(simulate(empty, (2,), ["S0"])).shape == (0, 4)


# ---------------------------------------------------------------------------- lazy reads


def write_shards(tmp_path, records: list[ShardRecord]) -> list[ShardRecord]:
    """Each record's shard into its own safetensors file, then re-pointed at it lazily."""
    out = []
    for i, rec in enumerate(records):
        snap = snapshot.Snapshot(tensors={"w/local": rec.data} if rec.data is not None else {})
        path = str(tmp_path / f"rank{i}.safetensors")
        with open(path, "wb") as f:
            for chunk in snapshot.tensor_chunks(snap, snap.layout()):
                f.write(chunk)
        data = sharded.lazy_tensors(path).get("w/local")
        out.append(dataclasses.replace(rec, data=data))
    return out


@pytest.mark.parametrize("saved,target", RESHARD_PAIRS)
def test_lazy_records_read_only_the_rows_needed(tmp_path, monkeypatch, saved, target):
    full = random_tensor((11, 6))
    lazy = write_shards(tmp_path, simulate(full, (saved,), ["S0"]))
    read = []
    real_preadv = os.preadv

    def counting_preadv(fd, buffers, offset):
        n = real_preadv(fd, buffers, offset)
        read.append(n)
        return n

    monkeypatch.setattr(os, "preadv", counting_preadv)
    for coord in coordinates((target,)):
        read.clear()
        box = shard_region((11, 6), (target,), ["S0"], coord)
        got = assemble_region(lazy, box, "w")
        assert same_bits(got, oracle_shard(full, (target,), ["S0"], coord))
        assert sum(read) == got.numel() * got.element_size()  # not one byte of another row


def test_lazy_column_regions(tmp_path):
    full = random_tensor((5, 9))
    lazy = write_shards(tmp_path, simulate(full, (2,), ["S0"]))
    reshard_everywhere(lazy, full, (3,), ["S1"])


# ---------------------------------------------------------------------------- corrupt records


def test_missing_rank_is_an_error_naming_the_tensor():
    records = simulate(random_tensor((7, 5)), (3,), ["S0"])
    with pytest.raises(CorruptCheckpointError, match=r"sharded tensor at model\['w'\].*cover 20 of 35"):
        assemble_full(records[:1] + records[2:], "model['w']")


def test_missing_replica_owner_is_an_error():
    records = simulate(random_tensor((8, 4)), (2, 2), ["S0", "R"])
    with pytest.raises(CorruptCheckpointError, match="missing"):
        assemble_full([r for r in records if r.coordinate != (1, 0)], "w")


def test_overlapping_shards_are_an_error():
    records = simulate(random_tensor((8, 4)), (2,), ["S0"])
    dup = dataclasses.replace(records[0], coordinate=(1,))
    with pytest.raises(CorruptCheckpointError, match=r"sharded tensor at opt\['m'\].*overlap"):
        assemble_full([records[0], dup, records[1]], "opt['m']")


def test_ranks_from_different_saves_are_an_error():
    a = simulate(random_tensor((8, 4)), (2,), ["S0"])
    b = simulate(random_tensor((6, 4)), (2,), ["S0"])
    with pytest.raises(CorruptCheckpointError, match="disagree on shape"):
        assemble_full([a[0], b[1]], "w")


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("offsets", [3, 0], "disagrees with placements"),
        ("local_shape", [3, 4], "disagrees with placements"),
        ("placements", ["P"], "malformed"),
        ("placements", ["S2"], "malformed"),
        ("coordinate", [2], "malformed"),
        ("dtype", "Tensor", "malformed"),
        ("global_shape", [8, -4], "malformed"),
        ("local", None, "should hold data"),
        ("local", "x", "malformed"),
        ("dtype", "float64", "stored shard is torch.float32"),
    ],
)
def test_decode_rejects_inconsistent_payloads(field, value, message):
    p = payload(random_tensor((8, 4)), (2,), ["S0"], (1,))
    p[field] = value
    with pytest.raises(CorruptCheckpointError, match=message):
        dtensor.decode_dtensor(p)


def test_decode_rejects_non_dict_payload():
    with pytest.raises(CorruptCheckpointError, match="malformed"):
        dtensor.decode_ext("dtensor", [1, 2])
    assert dtensor.decode_ext("torch.dtype", "float16") is torch.float16  # falls through


# ---------------------------------------------------------------------------- trees


def test_walk_pairs_plain_targets_get_full_tensors():
    full = random_tensor((7, 3))
    recs = simulate(full, (2,), ["S0"])
    trees = [{"w": rec, "lr": 0.1, "t": (rec, i)} for i, rec in enumerate(recs)]
    got = sharded.walk_pairs(trees, {"w": torch.zeros(7, 3)}, rank=1)
    assert same_bits(got["w"], full) and same_bits(got["t"][0], full)
    assert got["lr"] == 0.1 and got["t"][1] == 1  # non-sharded leaves: this rank's own tree
    assert sharded.walk_pairs(trees, None, rank=5)["t"][1] == 0  # a rank new since the save: rank 0's


def test_walk_pairs_names_a_rank_without_the_record():
    recs = simulate(random_tensor((4, 2)), (2,), ["S0"])
    with pytest.raises(CorruptCheckpointError, match=r"at 'opt'\['m'\]: saved rank 1 has no shard"):
        sharded.walk_pairs([{"opt": {"m": recs[0]}}, {"opt": {}}], None)


def test_walk_pairs_reads_lazy_plain_leaves(tmp_path):
    lazy = write_shards(tmp_path, simulate(random_tensor((3, 2)), (1,), ["R"]))[0].data
    assert isinstance(sharded.walk_pairs([{"x": lazy}], None)["x"], torch.Tensor)


def test_contains_dtensor_and_records():
    rec = simulate(random_tensor((2,)), (1,), ["R"])[0]
    assert not dtensor.contains_dtensor({"a": [torch.ones(2), (1, "x")]})
    assert dtensor.contains_records({"a": [1, (rec,)]}) and not dtensor.contains_records({"a": 1})
    assert not dtensor.is_plain_tensor(3) and dtensor.is_plain_tensor(torch.ones(1))


def test_global_meta_shapes():
    rec = simulate(random_tensor((7, 3)), (2,), ["S0"])[1]
    meta = dtensor.global_meta({"w": rec, "k": [1]})
    assert meta["w"].shape == (7, 3) and meta["w"].is_meta and meta["k"] == [1]


def test_errors_are_guardian_errors():
    assert issubclass(CorruptCheckpointError, GuardianError)
    assert issubclass(StateMismatchError, GuardianError)


# ---------------------------------------------------------------------------- real ranks


def run_ranks(mode: str, world: int, run_dir: str, tmp_path, timeout: float = 90) -> None:
    init = str(tmp_path / f"init-{mode}-{os.getpid()}")
    env = {**os.environ, "GUARDIAN_QUIET": "1", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, mode, str(r), str(world), init, run_dir],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        for r in range(world)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0 and f"rank {r}: {mode} done" in out, f"rank {r} of {mode} failed:\n{out}"


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A checkpoint written by 2 real ranks: DTensors + FSDP2 model and Adam state."""
    tmp = tmp_path_factory.mktemp("sharded")
    run_dir = str(tmp / "run")
    os.mkdir(run_dir)
    run_ranks("save", 2, run_dir, tmp)
    return run_dir


def load_saved(run_dir: str) -> list[dict]:
    from guardian.format.layout import rank_prefix

    return [sharded.load_rank(os.path.join(run_dir, f"ckpt-r{r}"), rank_prefix(r, 2)) for r in range(2)]


@pytest.mark.slow
def test_two_ranks_saved_one_rank_loads_dtensors(saved_run):
    import sharded_worker as w

    expected = safetensors.torch.load_file(os.path.join(saved_run, "expected.safetensors"))
    trees = load_saved(saved_run)
    got = sharded.walk_pairs([t["tensors"][1] for t in trees], None)
    for name in w.TENSORS:
        assert same_bits(got[name], expected[f"tensors/{name}"]), name
    assert got["plain_step"].item() == 3


@pytest.fixture(scope="module")
def plain_restore(saved_run):
    """World size 2 (fully_shard) → 1: a plain nn.Sequential + Adam restored from the
    2-rank files, then saved again at world size 1 as ``ckpt-plain``."""
    import sharded_worker as w

    trees = load_saved(saved_run)
    model = w.make_model(7)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    mod, optim = w.adapters(model, opt)
    mod.load_state_dict(sharded.walk_pairs([t["model"][1] for t in trees], mod.state_dict()))
    optim.load_state_dict(sharded.walk_pairs([t["optimizer"][1] for t in trees], optim.state_dict()))
    states = {"model": ("module", mod.state_dict()), "optimizer": ("optimizer", optim.state_dict())}
    w.write_checkpoint(saved_run, "ckpt-plain", w.capture(states), "")
    return model, opt


@pytest.mark.slow
def test_fsdp2_saved_at_two_restores_into_plain_model(saved_run, plain_restore):
    import sharded_worker as w

    expected = safetensors.torch.load_file(os.path.join(saved_run, "expected.safetensors"))
    model, opt = plain_restore
    for k, v in model.state_dict().items():
        assert same_bits(v, expected[f"model/{k}"]), k
    _, optim = w.adapters(model, opt)
    for pname, st in optim.state_dict()["state"].items():
        for k, v in st.items():
            assert same_bits(v, expected[f"optimizer/{pname}/{k}"]), (pname, k)
    w.train_step(model, opt, 2)  # the restored moments drive the next step like the sharded run's
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, expected[f"after2/{k}"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_two_ranks_reload_into_new_placements_and_fsdp2(saved_run, plain_restore, tmp_path):
    """World size 2 → 2 with different placements, FSDP2 → FSDP2 (the next step bit-exact),
    and the world-size-1 checkpoint of the previous test back into FSDP2 at 2."""
    run_ranks("load", 2, saved_run, tmp_path)


def test_one_checkpoint_with_rank_dirs_verifies_and_loads(tmp_path):
    """The lead's layout: one commit, ``rank-0000R/`` files per rank, manifest last;
    guardian's verifier accepts it and ``load_all_ranks`` + ``walk_pairs`` rebuild it."""
    from guardian.commit import CheckpointTxn
    from guardian.format.layout import rank_prefix
    from guardian.format.manifest import Manifest
    from guardian.format.reader import inspect_checkpoint

    full = random_tensor((7, 5))
    with CheckpointTxn(str(tmp_path), "step-000000001") as txn:
        for rank in range(2):
            p = payload(full, (2,), ["S0"], (rank,))
            snap = snapshot.Snapshot(tensors={"m/w/local": p["local"]})
            state = {**p, "local": {"__tensor__": "m/w/local"}}
            snap.components["m"] = {"kind": "module", "state": {"w": {"__ext__": "dtensor", "v": state}}}
            snapshot.write_files(txn, snap, prefix=rank_prefix(rank, 2))
        path = txn.commit(Manifest(name="step-000000001", step=1, epoch=0, seq=1, files={}, world_size=2))
    info = inspect_checkpoint(path, verify=True)
    assert info.valid, info.problems
    trees = [t["m"][1] for t in sharded.load_all_ranks(path, 2)]
    assert isinstance(trees[1]["w"].data, dtensor.LazyTensor)
    assert same_bits(sharded.walk_pairs(trees, {"w": torch.zeros(7, 5)})["w"], full)
    meta = dtensor.global_meta(sharded.load_all_ranks(path, 2, lazy=False)[0]["m"][1])
    assert meta["w"].shape == (7, 5)
