"""One rank of the multi-process sharded-state tests (tests/test_sharded.py).

    python sharded_worker.py save|load RANK WORLD INIT_FILE RUN_DIR

``save``: DTensors (even, uneven, column-sharded, replicated, int, bf16) and an FSDP2
model + Adam after one step, written per rank through guardian's own writer path
(Encoder with ``dtensor.encode_ext`` → Snapshot → CheckpointTxn/write_files), one
checkpoint ``ckpt-rR`` per rank. Rank 0 also writes ``expected.safetensors`` (the
full tensors, gathered with DTensor.full_tensor) for the checker.

``load``: reloads the 2-rank checkpoint into *different* live placements and a fresh
FSDP2 model/optimizer, and the world-size-1 checkpoint ``ckpt-plain`` (written by
the test after restoring at world size 1) into FSDP2 as well; asserts everything
equals ``expected.safetensors`` bit for bit. Exit code 0 plus the "done" line means
every check passed.
"""

from __future__ import annotations

import os
import sys

import safetensors.torch
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

from guardian.commit import CheckpointTxn
from guardian.errors import UnsupportedStateError
from guardian.format.layout import rank_prefix
from guardian.format.manifest import Manifest
from guardian.format.reader import inspect_checkpoint
from guardian.format.tree import Encoder
from guardian.state import dtensor, sharded, snapshot
from guardian.state.components import ModuleState, OptimizerState

# name → (global shape, dtype, saved placement, placement the load asks for)
TENSORS = {
    "even": ((8, 4), torch.float32, Shard(0), Replicate()),
    "uneven": ((7, 5), torch.float32, Shard(0), Shard(1)),
    "tiny": ((3, 2), torch.float32, Shard(0), Shard(0)),
    "one_row": ((1, 3), torch.float32, Shard(0), Shard(0)),  # rank 1 holds an empty shard
    "cols": ((4, 7), torch.float32, Shard(1), Shard(0)),
    "rep": ((5,), torch.float32, Replicate(), Shard(0)),
    "ints": ((11,), torch.int64, Shard(0), Shard(0)),
    "half": ((9, 3), torch.bfloat16, Shard(0), Shard(0)),
}


def full_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    out = {}
    for name, (shape, dtype, _, _) in TENSORS.items():
        if dtype.is_floating_point:
            out[name] = torch.randn(shape, generator=gen).to(dtype)
        else:
            out[name] = torch.randint(-(2**40), 2**40, shape, generator=gen, dtype=dtype)
    return out


def make_model(seed: int, mesh=None) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    if mesh is not None:
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(6, 5, generator=gen)
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


def adapters(model, opt) -> tuple[ModuleState, OptimizerState]:
    names = {id(p): n for n, p in model.named_parameters()}
    return ModuleState(model), OptimizerState(opt, names)


def capture(states: dict[str, tuple[str, object]]) -> snapshot.Snapshot:
    """``snapshot.capture`` with the two callbacks the lead swaps in:
    ``dtensor.is_plain_tensor`` and ``dtensor.encode_ext``."""
    snap = snapshot.Snapshot()

    def put(component: str):
        def _put(parts, tensor):
            key = "/".join([component, *parts])
            assert key not in snap.tensors, key
            snap.tensors[key] = tensor.detach()
            return key

        return _put

    for name, (kind, tree) in states.items():
        encoder = Encoder(dtensor.is_plain_tensor, put(name), dtensor.encode_ext)
        snap.components[name] = {"kind": kind, "state": encoder.encode(tree, (), name)}
    return snap


def write_checkpoint(run_dir: str, name: str, snap: snapshot.Snapshot, prefix: str) -> str:
    with CheckpointTxn(run_dir, name) as txn:
        snapshot.write_files(txn, snap, prefix=prefix)
        path = txn.commit(Manifest(name=name, step=1, epoch=0, seq=1, files={}))
    info = inspect_checkpoint(path, verify=True)
    assert info.valid, info.problems
    return path


def full(value) -> torch.Tensor:
    return value.full_tensor() if isinstance(value, DTensor) else value


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (torch.equal would call -0.0 == 0.0 equal and NaN unequal)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    flat = lambda t: t.detach().contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
    return torch.equal(flat(a), flat(b))


def save(rank: int, world: int, run_dir: str) -> None:
    mesh = init_device_mesh("cpu", (world,))
    fulls = full_tensors()
    dts = {n: distribute_tensor(fulls[n], mesh, [spec[2]]) for n, spec in TENSORS.items()}
    check_partial_refused(mesh)
    model = make_model(0, mesh)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    train_step(model, opt, 1)
    mod, optim = adapters(model, opt)
    states = {
        "tensors": ("user", {**dts, "plain_step": torch.tensor(3)}),
        "model": ("module", mod.state_dict()),
        "optimizer": ("optimizer", optim.state_dict()),
    }
    assert dtensor.contains_dtensor(states["model"][1]) and dtensor.contains_dtensor(states["optimizer"][1])
    snap = capture(states)
    write_checkpoint(run_dir, f"ckpt-r{rank}", snap, rank_prefix(rank, world))
    expected = expected_tensors(fulls, mod.state_dict(), optim.state_dict())
    train_step(model, opt, 2)  # what the next step gives: the restored optimizer must agree
    expected.update({f"after2/{k}": full(v) for k, v in model.state_dict().items()})
    if rank == 0:
        safetensors.torch.save_file(expected, os.path.join(run_dir, "expected.safetensors"))


def check_partial_refused(mesh) -> None:
    partial = DTensor.from_local(torch.ones(2), mesh, [Partial()])
    try:
        dtensor.encode_dtensor(partial, "x")
    except UnsupportedStateError as e:
        assert "Partial" in str(e), e
    else:
        raise AssertionError("a Partial DTensor was encoded")


def expected_tensors(fulls, model_sd, optim_sd) -> dict[str, torch.Tensor]:
    out = {f"tensors/{k}": v for k, v in fulls.items()}
    out.update({f"model/{k}": full(v).clone() for k, v in model_sd.items()})
    for pname, st in optim_sd["state"].items():
        out.update({f"optimizer/{pname}/{k}": full(v).clone() for k, v in st.items()})  # step: live, in place
    return out


def load(rank: int, world: int, run_dir: str) -> None:
    mesh = init_device_mesh("cpu", (world,))
    expected = safetensors.torch.load_file(os.path.join(run_dir, "expected.safetensors"))
    trees = [sharded.load_rank(os.path.join(run_dir, f"ckpt-r{r}"), rank_prefix(r, 2)) for r in range(2)]
    check_tensors(trees, mesh, expected)
    check_fsdp(trees, mesh, expected, exact_next_step=True)
    plain = os.path.join(run_dir, "ckpt-plain")  # saved at world size 1 by the test: back to 2
    check_fsdp([sharded.load_rank(plain)], mesh, expected, exact_next_step=False)
    print(f"rank {rank}: all checks passed", flush=True)


def check_tensors(trees, mesh, expected) -> None:
    live = {n: distribute_tensor(torch.zeros(s, dtype=d), mesh, [p]) for n, (s, d, _, p) in TENSORS.items()}
    got = sharded.walk_pairs([t["tensors"][1] for t in trees], live)
    for name, (_, _, _, placement) in TENSORS.items():
        value = got[name]
        assert isinstance(value, DTensor) and value.placements == (placement,), (name, value)
        want = distribute_tensor(expected[f"tensors/{name}"], mesh, [placement]).to_local()
        assert same_bits(value.to_local(), want), name
        assert same_bits(value.full_tensor(), expected[f"tensors/{name}"]), name
    assert got["plain_step"].item() == 3


def check_fsdp(trees, mesh, expected, *, exact_next_step: bool) -> None:
    model = make_model(99, mesh)  # different init: every value must come from the checkpoint
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    mod, optim = adapters(model, opt)
    mod.load_state_dict(sharded.walk_pairs([t["model"][1] for t in trees], mod.state_dict()))
    targets = sharded.params_as_targets(dict(model.named_parameters()))
    optim_tree = sharded.walk_pairs(
        [t["optimizer"][1] for t in trees], optim.state_dict(), target_for=targets
    )
    optim.load_state_dict(optim_tree)
    for k, v in mod.state_dict().items():
        assert isinstance(v, DTensor) and same_bits(v.full_tensor(), expected[f"model/{k}"]), k
    for pname, st in optim.state_dict()["state"].items():
        for k, v in st.items():
            assert same_bits(full(v), expected[f"optimizer/{pname}/{k}"]), (pname, k)
            assert k == "step" or isinstance(v, DTensor), (pname, k, type(v))
    train_step(model, opt, 2)
    for k, v in model.state_dict().items():
        want = expected[f"after2/{k}"]
        ok = same_bits(v.full_tensor(), want) if exact_next_step else torch.allclose(v.full_tensor(), want)
        assert ok, f"after the next step {k} differs"


def main() -> None:
    mode, rank, world, init_file, run_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:]
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    {"save": save, "load": load}[mode](rank, world, run_dir)
    dist.barrier()
    print(f"rank {rank}: {mode} done", flush=True)
    # Skip destroy_process_group and interpreter teardown: under CPU contention gloo's
    # teardown here sometimes aborts ("terminate called without an active exception")
    # after all the work and the final barrier are done. A failure above still raises.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
