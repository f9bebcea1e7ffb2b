#!/usr/bin/env python3
"""Checkpoint benchmark: guardian against the disk and against torch, in one process.

    python scripts/bench_checkpoint.py --size-mb 1024 --reps 5 --json

``--size-mb`` is the model's parameter bytes (float32); Adam adds two moments, so
the state is ~3x that. Every repetition runs every method, interleaved, and the
report uses medians, with ratios against baselines measured in the same run. One
uncounted warm-up repetition runs first (``--warmup``): every method's first writes warm
the file system. guardian's staging arena is reserved in the background at start-up, as
``protect()`` does at the first training step; the warm-up's guardian save, which finds
it ready (or waits for the rest), is reported alone as ``first_save_stall_s``:

  raw disk      write+fsync of the same byte count, buffered and O_DIRECT
  torch         torch.save + fsync; torch.load(weights_only=True) cold and warm
  DCP           torch.distributed.checkpoint.async_save (one rank), if it runs; in a
                child process with the same state (see DcpWorker for why)
  guardian      blocking stall (capture + copy into the staging arena), time to
                durable (commit done), restore into the live tensors (cold, warm),
                slowdown of a foreground compute loop while a save persists, and
                peak extra RSS during a save

Cold tests drop the page cache (``echo 3 > /proc/sys/vm/drop_caches``, root only);
the report says whether that worked. A small state (fsync/rename dominated) is
measured too. With ``--json`` the last line of output is one JSON object.

``--integrations`` measures instead the save stall of each integration against the
plain loop for the same state (one model of ``--size-mb`` and its AdamW): the time
the training step is blocked by the guardian call that takes the save (``Guard.step``,
which every integration's step hook calls) in a real training run of each,
median of ``--reps`` saves after a warm-up one, each starting with no save in flight.
It prints ``lightning_vs_plain`` and ``hf_vs_plain`` (target: at most 1.2).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from guardian.async_writer import AsyncWriter
from guardian.format import manifest as manifest_mod
from guardian.staging import copy_implementation
from guardian.state import snapshot as snap_mod
from guardian.state.components import OptimizerState
from guardian.writer import SyncWriter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_incremental  # noqa: E402 - issue 18 part 2: the LoRA-like incremental case
import benchlib  # noqa: E402
from benchlib import fsync_dir, manifest_for, timed, torch_save  # noqa: E402 - bench_resume uses torch_save from here

MiB = 1 << 20
CHUNK = 64 * MiB
HIDDEN = 2048  # one Linear(2048, 2048) = 16 MiB of float32 weights


# ------------------------------------------------------------------ state


def build_state(param_mb: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model of ~param_mb MB of float32 parameters and a stepped Adam (moments exist)."""
    per_layer = HIDDEN * HIDDEN * 4
    n = max(1, round(param_mb * MiB / per_layer))
    if param_mb * MiB < per_layer:
        width = max(8, int((param_mb * MiB / 4) ** 0.5))
        model = nn.Sequential(nn.Linear(width, width))
    else:
        model = nn.Sequential(*[nn.Linear(HIDDEN, HIDDEN) for _ in range(n)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def guardian_states(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, tuple[str, Any]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        "model": ("module", model.state_dict()),
        "optimizer": ("optimizer", OptimizerState(opt, names).state_dict()),
    }


# ------------------------------------------------------------------ system helpers


def drop_caches() -> bool:
    """Flush and drop the page cache; False when not permitted (not root, container)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def rss_bytes(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5\n")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------ baselines


def raw_write(path: str, buf: memoryview, direct: bool) -> None:
    """Write ``buf`` (page-aligned when direct) in CHUNK pieces, then fsync."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags, 0o644)
    try:
        n = len(buf) - (len(buf) % 4096 if direct else 0)
        for off in range(0, n, CHUNK):
            pwrite_all(fd, buf[off : min(off + CHUNK, n)], off)
        if n < len(buf):  # the unaligned tail goes through the page cache
            tail = os.open(path, os.O_WRONLY)
            pwrite_all(tail, buf[n:], n)
            os.fsync(tail)
            os.close(tail)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(os.path.dirname(path))


def pwrite_all(fd: int, piece: memoryview, off: int) -> None:
    while piece:
        k = os.pwrite(fd, piece, off)
        piece, off = piece[k:], off + k


def torch_load(path: str) -> None:
    obj = torch.load(path, weights_only=True)
    del obj


def dcp_setup() -> str | None:
    """Initialise a one-process gloo group for DCP; returns an error string or None."""
    try:
        import torch.distributed as dist

        if not dist.is_initialized():
            store = dist.HashStore()
            dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        return None
    except Exception as e:  # noqa: BLE001 — report, do not fail the benchmark
        return f"{type(e).__name__}: {e}"


def dcp_async_save(path: str, model: nn.Module, opt: torch.optim.Optimizer) -> tuple[float, float]:
    """(stall, time to durable) of DCP async_save."""
    import torch.distributed.checkpoint as dcp

    t0 = time.perf_counter()
    fut = dcp.async_save({"model": model.state_dict(), "optimizer": opt.state_dict()}, checkpoint_id=path)
    stall = time.perf_counter() - t0
    fut.result()
    return stall, time.perf_counter() - t0


class DcpWorker:
    """DCP ``async_save`` measured in a child process that holds an identical state.

    Why not in this process: DCP copies tensors on a thread of its own pool, and
    that thread keeps an OpenMP team alive. With two live OpenMP teams on 2 vCPUs,
    libgomp stops spin-waiting between parallel regions (more managed threads than
    CPUs), so the foreground loop leaves idle gaps — and every later guardian
    measurement in the process ran in that other regime (durable under load 4-7 s ->
    ~1 s, foreground slowdown 0.04 -> 0.3, the absolute time lost about the same).
    Reproduced without DCP by one ``copy_`` on a ThreadPoolExecutor thread. A child
    process keeps DCP's figures (stall, durable) and leaves the parent's alone; the
    order of methods inside every repetition is unchanged. One child per repetition,
    gone before the next method runs: a long-lived one held ~2x the state in memory
    and slowed the page-cache-bound baselines (torch.save median 2.0 -> 3.3 s).
    """

    def __init__(self, size_mb: float) -> None:
        cmd = [sys.executable, os.path.abspath(__file__), "--dcp-worker", "--size-mb", str(size_mb)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.error: str | None = self._reply().get("error")

    def _reply(self) -> dict[str, Any]:
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        return json.loads(line) if line else {"error": f"DCP worker exited ({self.proc.wait()})"}

    def save(self, path: str) -> tuple[float, float]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(os.path.abspath(path) + "\n")
        self.proc.stdin.flush()
        reply = self._reply()
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply["stall"], reply["durable"]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=120)


def dcp_worker_main(size_mb: float) -> int:
    """The child side of ``DcpWorker``: one JSON line per request on stdout."""
    model, opt = build_state(size_mb)
    error = dcp_setup()
    print(json.dumps({"error": error} if error else {"ready": True}), flush=True)
    for line in sys.stdin:
        try:
            stall, durable = dcp_async_save(line.strip(), model, opt)
            print(json.dumps({"stall": stall, "durable": durable}), flush=True)
        except Exception as e:  # noqa: BLE001 — reported by the parent
            print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
    return 0


# ------------------------------------------------------------------ remote tier


def start_moto() -> tuple[str, subprocess.Popen]:
    """moto's S3 server on 127.0.0.1 (a local stand-in for an object store), with a bucket."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # the server stands in for another machine: at nice 19 its CPU is taken only
        # from idle time, so the slowdown measured is the client's, not the server's
        preexec_fn=lambda: os.nice(19),
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=2).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.1)
    os.environ.update(
        {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_ENDPOINT_URL": endpoint}
    )
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).mkdir("guardian-bench")
    return "s3://guardian-bench/run", proc


def remote_case(target: str, d: str, reps: int, mb: float) -> dict[str, Any]:
    """Replicate a committed checkpoint while a compute loop runs: the loop's slowdown
    against its own speed just before, and local commit → remote manifest written."""
    from guardian.policies import Retention
    from guardian.remote.store import RemoteStore
    from guardian.remote.upload import Replicator

    proc = None
    if target == "moto":
        target, proc = start_moto()
    run = os.path.join(d, "remote-run")
    os.makedirs(run, exist_ok=True)
    model, opt = build_state(mb)
    writer = SyncWriter()
    fg = Foreground()
    replicator = Replicator(RemoteStore(target), run, Retention(2, 1, None), None)
    slowdowns, durable = [], []
    try:
        for r in range(reps):
            snap = snap_mod.capture(guardian_states(model, opt))
            name = f"step-{r + 1:09d}"
            path = writer.submit(run, snap, manifest_for(name, snap), lambda p, m: None)
            man = manifest_mod.read(path)
            base = fg.iteration_time(1.0)
            replicator.committed(path, man)
            n, t0 = 0, time.perf_counter()
            while replicator._busy or replicator._pending is not None or n == 0:
                fg.step()
                n += 1
            during = (time.perf_counter() - t0) / n
            if replicator.durable is None or replicator.durable.name != name:
                raise RuntimeError(f"upload of {name} did not become durable (see the log)")
            slowdowns.append(during / base - 1)
            durable.append(replicator.durable.seconds_after_commit)
    finally:
        replicator.close(timeout=60)
        if proc is not None:
            proc.terminate()
            proc.wait(10)
    return {
        "target": "moto server on 127.0.0.1" if proc is not None else target,
        "checkpoint_bytes": man.total_bytes,
        "fg_slowdown_while_uploading_pct": round(100 * statistics.median(slowdowns), 2),
        "time_to_remote_durable_s": round(statistics.median(durable), 3),
        "reps": reps,
    }


# ------------------------------------------------------------------ guardian


class Foreground:
    """A compute-bound training stand-in: fixed-size matmuls, as a loop would run them."""

    def __init__(self) -> None:
        self.a = torch.randn(512, 512)
        self.b = torch.randn(512, 512)

    def step(self) -> None:
        self.a = torch.tanh(self.a @ self.b) * 0.5

    def iteration_time(self, seconds: float = 1.0) -> float:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            self.step()
            n += 1
        return (time.perf_counter() - t0) / n


def guardian_save(
    writer: AsyncWriter, run_dir: str, name: str, states_fn: Callable, fg: Foreground | None, t_iter: float
) -> dict[str, float]:
    """One async save: stall; then either idle wait (durable time) or a foreground loop."""
    t0 = time.perf_counter()
    snap = snap_mod.capture(states_fn())
    writer.submit(run_dir, snap, manifest_for(name, snap), lambda *a: None)
    stall = time.perf_counter() - t0
    del snap
    out = {"stall": stall}
    if fg is None:
        writer.wait()
        out["durable"] = time.perf_counter() - t0
        return out
    n, t1 = 0, time.perf_counter()
    while writer.busy:
        fg.step()
        n += 1
    loop = time.perf_counter() - t1
    writer.wait()
    out["durable_under_load"] = time.perf_counter() - t0
    expected = max(n, 1) * t_iter
    out["slowdown"] = loop / expected - 1 if n else 0.0
    out["lost"] = max(0.0, loop - n * t_iter)
    return out


def guardian_restore(path: str, live: dict[str, torch.Tensor]) -> None:
    snap_mod.load(path, into=live)


# ------------------------------------------------------------------ the run


def aligned_buffer(n: int) -> memoryview:
    """The raw-disk baseline's source buffer, built like guardian's arena (page-aligned,
    transparent huge pages where allowed, pre-faulted), so that the baseline measures
    the disk and not 4 KiB page pinning."""
    mm = mmap.mmap(-1, max(n, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    view = memoryview(mm)
    for off in range(0, n, mmap.PAGESIZE):
        view[off] = 1
    return view[:n]


def one_rep(tag: str, ctx: dict[str, Any], res: dict[str, list[float]], notes: dict[str, Any]) -> None:
    d, model, opt = ctx["dir"], ctx["model"], ctx["opt"]
    writer, fg, live = ctx["writer"], ctx["fg"], ctx["live"]
    drop_caches()
    res["raw_buffered"].append(timed(lambda: raw_write(f"{d}/raw.bin", ctx["buf"], False)))
    os.unlink(f"{d}/raw.bin")
    res["raw_direct"].append(timed(lambda: raw_write(f"{d}/raw.bin", ctx["buf"], True)))
    os.unlink(f"{d}/raw.bin")
    res["torch_save"].append(timed(lambda: torch_save(f"{d}/model.pt", model, opt)))

    arena_before = writer._arena.capacity
    rss0, peak_ok = rss_bytes(), reset_peak_rss()
    g = guardian_save(writer, d, f"ckpt-{tag}", ctx["states"], None, 0.0)
    res["g_stall"].append(g["stall"])
    res["g_durable"].append(g["durable"])
    if peak_ok:
        res["extra_rss"].append(rss_bytes("VmHWM") - (rss0 - arena_before))
    t_iter = fg.iteration_time(1.0)
    res["fg_iter"].append(t_iter)
    g2 = guardian_save(writer, d, f"ckpt-{tag}-fg", ctx["states"], fg, t_iter)
    for k in ("slowdown", "lost", "durable_under_load"):
        res[f"g_{k}"].append(g2[k])
    res["g_effective_stall"].append(g2["stall"] + g2["lost"])
    shutil.rmtree(f"{d}/ckpt-{tag}-fg")

    if ctx.get("dcp_error") is None:
        worker = DcpWorker(ctx["size_mb"])
        try:
            if worker.error:
                raise RuntimeError(worker.error)
            stall, durable = worker.save(f"{d}/dcp-{tag}")
            res["dcp_stall"].append(stall)
            res["dcp_durable"].append(durable)
        except Exception as e:  # noqa: BLE001
            ctx["dcp_error"] = f"{type(e).__name__}: {e}"
        finally:
            worker.close()
        shutil.rmtree(f"{d}/dcp-{tag}", ignore_errors=True)

    notes["drop_caches_worked"] = drop_caches() and notes.get("drop_caches_worked", True)
    res["torch_load_cold"].append(timed(lambda: torch_load(f"{d}/model.pt")))
    res["torch_load_warm"].append(timed(lambda: torch_load(f"{d}/model.pt")))
    drop_caches()
    res["g_restore_cold"].append(timed(lambda: guardian_restore(f"{d}/ckpt-{tag}", live)))
    res["g_restore_warm"].append(timed(lambda: guardian_restore(f"{d}/ckpt-{tag}", live)))
    os.unlink(f"{d}/model.pt")
    shutil.rmtree(f"{d}/ckpt-{tag}")


def small_case(d: str, reps: int, mb: float) -> dict[str, float]:
    """A few MB: fsync and rename dominate; medians of ``reps``."""
    model, opt = build_state(mb)

    def states() -> dict[str, tuple[str, Any]]:
        return guardian_states(model, opt)

    res: dict[str, list[float]] = defaultdict(list)
    writer = AsyncWriter()
    for r in range(reps):
        res["torch_save"].append(timed(lambda: torch_save(f"{d}/small.pt", model, opt)))
        snap = snap_mod.capture(states())
        res["g_sync"].append(
            timed(
                lambda snap=snap, r=r: SyncWriter().submit(
                    d, snap, manifest_for(f"s-{r}", snap), lambda *a: None
                )
            )
        )
        g = guardian_save(writer, d, f"a-{r}", states, None, 0.0)
        res["g_stall"].append(g["stall"])
        res["g_durable"].append(g["durable"])
        shutil.rmtree(f"{d}/s-{r}")
        shutil.rmtree(f"{d}/a-{r}")
    writer.close()
    os.unlink(f"{d}/small.pt")
    snap = snap_mod.capture(states())
    m = {k: statistics.median(v) for k, v in res.items()}
    return {
        "state_bytes": snap.tensor_bytes,
        "torch_save_s": m["torch_save"],
        "guardian_sync_s": m["g_sync"],
        "guardian_stall_s": m["g_stall"],
        "guardian_durable_s": m["g_durable"],
        "stall_vs_torch_save": m["g_stall"] / m["torch_save"],
        "sync_speedup_vs_torch_save": m["torch_save"] / m["g_sync"],
    }


def summarize(res: dict[str, list[float]], state_bytes: int) -> dict[str, Any]:
    m = {k: statistics.median(v) for k, v in res.items() if v}
    out: dict[str, Any] = {
        f"median_{k}_s": round(v, 4) for k, v in m.items() if k not in ("extra_rss", "g_slowdown")
    }
    ratios = {
        "stall_vs_torch_save": m["g_stall"] / m["torch_save"],
        "effective_stall_vs_torch_save": m["g_effective_stall"] / m["torch_save"],
        "foreground_slowdown": m["g_slowdown"],
        "durable_vs_raw_disk": m["g_durable"] / m["raw_buffered"],
        "durable_vs_raw_direct": m["g_durable"] / m["raw_direct"],
        "save_speedup_vs_torch_save": m["torch_save"] / m["g_durable"],
        "restore_cold_speedup_vs_torch_load": m["torch_load_cold"] / m["g_restore_cold"],
        "restore_warm_speedup_vs_torch_load": m["torch_load_warm"] / m["g_restore_warm"],
        "extra_rss_vs_state": max(res["extra_rss"]) / state_bytes if res.get("extra_rss") else None,
    }
    if "dcp_durable" in m:
        ratios["dcp_stall_vs_guardian_stall"] = m["dcp_stall"] / m["g_stall"]
        ratios["dcp_durable_vs_guardian_durable"] = m["dcp_durable"] / m["g_durable"]
    out.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in ratios.items()})
    return out


TARGETS = {
    "stall_vs_torch_save": ("<=", 0.10),
    "effective_stall_vs_torch_save": ("<=", 0.15),
    "foreground_slowdown": ("<=", 0.10),
    "durable_vs_raw_disk": ("<=", 1.05),
    "save_speedup_vs_torch_save": (">=", 2.3),
    "restore_cold_speedup_vs_torch_load": (">=", 1.25),
    "restore_warm_speedup_vs_torch_load": (">=", 8.0),
    "extra_rss_vs_state": ("<=", 1.05),
    "dcp_durable_vs_guardian_durable": (">=", 1.0),
    **bench_incremental.TARGETS,
}


def check_targets(summary: dict[str, Any]) -> dict[str, bool]:
    return benchlib.check_targets(summary, TARGETS)


# ------------------------------------------------------------------ integrations


class _Net(nn.Module):
    """The benchmark's layers as a model every framework trains (HF wants a loss out)."""

    def __init__(self, size_mb: float) -> None:
        super().__init__()
        self.net = build_state(size_mb)[0]
        self.width = self.net[0].in_features

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {"loss": (self.net(x) - x).pow(2).mean()}


class _Batches(torch.utils.data.Dataset):
    def __init__(self, width: int, n: int) -> None:
        self.x = torch.randn(n, width)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i]}


@contextlib.contextmanager
def _timed_guard_steps(stalls: list[float]) -> Any:
    """Every ``Guard.step`` (where each integration takes its step saves) timed, with
    the previous save persisted first (outside the timing)."""
    from guardian.guard import Guard

    original = Guard.step

    def timed_step(self: Guard, **kw: Any) -> None:
        self.saver.wait_in_flight()
        t0 = time.perf_counter()
        original(self, **kw)
        stalls.append(time.perf_counter() - t0)

    Guard.step = timed_step  # type: ignore[method-assign]
    try:
        yield
    finally:
        Guard.step = original  # type: ignore[method-assign]


def integration_stalls(size_mb: float, reps: int, d: str) -> dict[str, Any]:
    import guardian

    steps = reps + 1  # the first save (staging arena reservation) is the warm-up
    out: dict[str, Any] = {}
    torch.manual_seed(0)
    model = _Net(size_mb)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    stalls: list[float] = []
    with (
        _timed_guard_steps(stalls),
        guardian.protect({"model": model, "optimizer": opt}, dir=f"{d}/plain", every_steps=1) as g,
    ):
        for x in torch.utils.data.DataLoader(_Batches(model.width, 2 * steps), batch_size=2):
            model(**x)["loss"].backward()
            opt.step()
            opt.zero_grad()
            g.step()
    out["plain_stall_s"] = statistics.median(stalls[1:])
    del model, opt, g  # the next runs build their own copy of the state: do not hold two
    gc.collect()
    for name, run in (("lightning", _lightning_run), ("hf", _hf_run)):
        stalls = []
        try:
            with _timed_guard_steps(stalls):
                run(size_mb, steps, f"{d}/{name}")
        except ImportError as e:
            out[f"{name}_stall_s"] = f"not installed: {e}"
            continue
        out[f"{name}_stall_s"] = statistics.median(stalls[1:])
        out[f"{name}_vs_plain"] = out[f"{name}_stall_s"] / out["plain_stall_s"]
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def _lightning_run(size_mb: float, steps: int, run: str) -> None:
    import lightning.pytorch as L

    from guardian.integrations.lightning import GuardianCallback

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _Net(size_mb)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.model(**batch)["loss"]

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    cb = GuardianCallback(run, every_n_train_steps=1, every_n_epochs=None)
    module = Module()
    trainer = L.Trainer(
        max_steps=steps, callbacks=[cb], enable_checkpointing=False, logger=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(_Batches(module.model.width, 2 * steps), batch_size=2))


def _hf_run(size_mb: float, steps: int, run: str) -> None:
    import transformers

    from guardian.integrations.transformers import GuardianCallback

    cb = GuardianCallback(run, every_n_steps=1, every_n_epochs=None)
    model = _Net(size_mb)
    args = transformers.TrainingArguments(
        output_dir=f"{run}-hf-out", max_steps=steps, per_device_train_batch_size=2, save_strategy="no",
        report_to=[], disable_tqdm=True, use_cpu=True, optim="adamw_torch", learning_rate=1e-4,
        lr_scheduler_type="constant",
    )  # fmt: skip
    trainer = transformers.Trainer(
        model, args, train_dataset=_Batches(model.width, 2 * steps), callbacks=[cb]
    )
    trainer.train()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=float, default=1024, help="parameter MB (state is ~3x with Adam)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="uncounted repetitions first (the first writes of every method warm the file system)",
    )
    ap.add_argument("--small-mb", type=float, default=2, help="parameter MB of the small-state case")
    ap.add_argument("--small-reps", type=int, default=15)
    ap.add_argument("--dir", default="/tmp/guardian-bench")
    ap.add_argument("--no-dcp", action="store_true")
    ap.add_argument("--no-overlap", action="store_true", help="skip the overlap scenario (bench_overlap.py)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--no-dist-step", action="store_true", help="skip the 2-rank step overhead (bench_dist_step)"
    )
    ap.add_argument(
        "--remote",
        default=None,
        help="also measure replication to this fsspec URL ('moto': a local S3 server); adds 'remote'",
    )
    ap.add_argument("--remote-mb", type=float, default=64, help="parameter MB of the remote case")
    ap.add_argument("--remote-only", action="store_true", help="measure only the remote case")
    ap.add_argument("--dcp-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-incremental", action="store_true", help="skip the incremental (LoRA-like) case")
    bench_incremental.add_arguments(ap)
    ap.add_argument(
        "--integrations", action="store_true", help="the integrations' save stall vs the plain loop"
    )
    args = ap.parse_args()
    if args.dcp_worker:
        return dcp_worker_main(args.size_mb)
    if args.integrations:
        shutil.rmtree(args.dir, ignore_errors=True)
        stalls = integration_stalls(args.size_mb, args.reps, args.dir)
        stalls["targets_met"] = {
            k: stalls[k] <= 1.2 for k in ("lightning_vs_plain", "hf_vs_plain") if k in stalls
        }
        shutil.rmtree(args.dir, ignore_errors=True)
        print(json.dumps(stalls) if args.json else "\n".join(f"{k:24s} {v}" for k, v in stalls.items()))
        return 0

    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    if args.remote_only:
        remote = remote_case(args.remote or "moto", args.dir, args.reps, args.remote_mb)
        shutil.rmtree(args.dir, ignore_errors=True)
        print("remote:", json.dumps(remote))
        if args.json:
            print(json.dumps({"remote": remote}))
        return 0
    model, opt = build_state(args.size_mb)

    def states() -> dict[str, tuple[str, Any]]:
        return guardian_states(model, opt)

    state_bytes = snap_mod.capture(states()).tensor_bytes
    writer = AsyncWriter()
    writer.reserve(snap_mod.capture(states()))  # as protect() does at the first step
    ctx: dict[str, Any] = {
        "dir": args.dir,
        "model": model,
        "opt": opt,
        "states": states,
        "writer": writer,
        "fg": Foreground(),
        "live": snap_mod.capture(states()).tensors,
        "buf": aligned_buffer(snap_mod.capture(states()).layout().total_bytes),
        "size_mb": args.size_mb,
        "dcp_error": "disabled (--no-dcp)" if args.no_dcp else None,
    }
    res: dict[str, list[float]] = defaultdict(list)
    notes: dict[str, Any] = {}
    warm: dict[str, list[float]] = defaultdict(list)
    for r in range(-args.warmup, args.reps):
        into = warm if r < 0 else res  # warm-up repetitions: every method once, not counted
        one_rep(f"w{-r}" if r < 0 else str(r), ctx, into, notes)
        print(
            f"rep {r}{' (warm-up)' if r < 0 else ''}: "
            + ", ".join(f"{k}={v[-1]:.3f}" for k, v in into.items() if k != "extra_rss"),
            file=sys.stderr,
        )
    ctx["writer"].close()

    summary = summarize(res, state_bytes)
    if warm.get("g_stall"):  # the first save, after the background arena reservation
        summary["first_save_stall_s"] = round(warm["g_stall"][0], 4)
    summary["small"] = small_case(args.dir, args.small_reps, args.small_mb)
    if not args.no_incremental:
        summary.update(bench_incremental.run(args, os.path.join(args.dir, "incremental")))
    if not args.no_overlap:  # a save in a loop doing forward/backward work: alone, one core free, loaded
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench_overlap

        kw = {"param_mb": min(args.size_mb, 256), "reps": args.reps, "d": os.path.join(args.dir, "overlap")}
        summary.update(
            {
                **bench_overlap.measure(**kw),
                **bench_overlap.measure_one_core_free(**kw),
                **bench_overlap.measure_under_load(**kw),
            }
        )
        TARGETS.update(bench_overlap.TARGETS)
    summary.update(
        {
            "state_bytes": state_bytes,
            "param_mb": args.size_mb,
            "reps": args.reps,
            "drop_caches_worked": notes.get("drop_caches_worked", False),
            "dcp": ctx["dcp_error"] or "ran (in a child process, see DcpWorker)",
            "staging_copy": copy_implementation(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "dir": args.dir,
        }
    )
    if args.remote:
        summary["remote"] = remote_case(args.remote, args.dir, args.reps, args.remote_mb)
    if not args.no_dist_step:  # protect()'s step overhead on 2 gloo ranks, bare and beside cpuhog
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench_dist_step

        summary.update(bench_dist_step.run(under_load=True, rounds=min(6, args.reps + 1)))
        TARGETS.update(bench_dist_step.TARGETS)
    summary["targets_met"] = check_targets(summary)
    shutil.rmtree(args.dir, ignore_errors=True)
    for k, v in summary.items():
        if k not in ("targets_met", "small", "remote"):
            print(f"{k:42s} {v}")
    print("small:", json.dumps(summary["small"]))
    if "remote" in summary:
        print("remote:", json.dumps(summary["remote"]))
    print("targets:", json.dumps(summary["targets_met"]))
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
