"""The asynchronous writer: same bytes as the sync path, exact resume, failures that
surface in the loop, durability at exit, and no loss under SIGKILL mid-persist."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from torch import nn

import guardian
from guardian import direct_io, fsops, threads
from guardian.async_writer import AsyncWriter
from guardian.errors import CheckpointWriteError
from guardian.format import reader
from guardian.format.manifest import Manifest
from guardian.state import snapshot as snap_mod
from guardian.writer import SyncWriter

sys.path.insert(0, os.path.dirname(__file__))
import trainlib  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def no_persist_thread_leaks():
    yield
    leaked = [t.name for t in threading.enumerate() if t.name.startswith("guardian-persist")]
    assert not leaked, f"persist threads still running: {leaked}"


def hostile_states() -> dict:
    """Odd sizes (unaligned tail, > one 4 KiB block), odd dtypes, hostile keys,
    a non-contiguous tensor and an empty one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 257), nn.Linear(257, 3))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 300)).sum().backward()
    opt.step()
    odd = {
        "we[ir]d/ke→y^": torch.arange(7, dtype=torch.int16),
        "flags": torch.tensor([True, False, True]),
        "half": torch.randn(5, dtype=torch.float16),
        "transposed": torch.arange(12.0).reshape(3, 4).t(),
        "empty": torch.empty(0, 5),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
    }
    return {
        "model": ("module", model.state_dict()),
        "optimizer": ("optimizer", opt.state_dict()),
        "odd": ("user", odd),
    }


def manifest_for(name: str, snap: snap_mod.Snapshot) -> Manifest:
    """A step-1 manifest describing ``snap``'s components."""
    return Manifest(
        name=name,
        step=1,
        epoch=0,
        seq=1,
        files={},
        reason=["test"],
        metrics={},
        batch_in_epoch=0,
        extra={},
        components={n: {"kind": c["kind"]} for n, c in snap.components.items()},
    )


def save_with(writer, run_dir: str, name: str, states: dict) -> str:
    snap = snap_mod.capture(states)
    man = manifest_for(name, snap)
    committed: list[str] = []
    writer.submit(run_dir, snap, man, lambda path, _m: committed.append(path))
    writer.wait()
    writer.close()
    assert len(committed) == 1
    return committed[0]


def digest(path: str) -> str:
    man = reader.inspect_checkpoint(path, verify=True).manifest
    return reader.checkpoint_digest(reader.component_summaries(path, man))


def assert_same_files(a: str, b: str) -> None:
    for rel in ("tensors.safetensors", "state.json"):
        with open(os.path.join(a, rel), "rb") as fa, open(os.path.join(b, rel), "rb") as fb:
            assert fa.read() == fb.read(), rel
    assert (
        reader.inspect_checkpoint(a, verify=True).manifest.files
        == reader.inspect_checkpoint(b).manifest.files
    )
    assert digest(a) == digest(b)


# ---------------------------------------------------------------- same bytes as sync


@pytest.mark.parametrize("base", ["tmp", "shm"])
def test_async_and_sync_write_identical_files_and_digests(tmp_path, base):
    if base == "shm":
        if not os.path.isdir("/dev/shm"):
            pytest.skip("no /dev/shm")
        import tempfile

        root = tempfile.mkdtemp(dir="/dev/shm")
    else:
        root = str(tmp_path)
    states = hostile_states()
    sync = save_with(SyncWriter(), root, "ckpt-sync", states)
    async_ = save_with(AsyncWriter(), root, "ckpt-async", states)
    assert_same_files(sync, async_)
    if base == "shm":
        import shutil

        shutil.rmtree(root)


def test_huge_page_arena_is_aligned_and_writes_identical_files(tmp_path):
    """Above 2 MiB the arena asks for transparent huge pages (staging._host_buffer);
    whether or not the kernel grants them, the buffer is O_DIRECT-aligned and the
    files equal the sync path's, byte for byte."""
    from guardian.staging import ALIGN, HUGE_PAGE, StagingArena

    arena = StagingArena()
    buf = arena.acquire(3 * HUGE_PAGE + 123)
    assert buf.data_ptr() % ALIGN == 0 and arena.capacity % ALIGN == 0
    assert int(buf.sum()) == 0  # pre-faulted anonymous memory is zeroed
    arena.release()
    states = hostile_states()
    states["odd"][1]["big"] = torch.randn(3 * HUGE_PAGE // 4 + 11)  # ~6 MiB, odd tail
    sync = save_with(SyncWriter(), str(tmp_path), "ckpt-sync", states)
    assert_same_files(sync, save_with(AsyncWriter(), str(tmp_path), "ckpt-async", states))


def test_buffered_fallback_when_o_direct_open_is_refused(tmp_path, monkeypatch):
    states = hostile_states()
    sync = save_with(SyncWriter(), str(tmp_path), "ckpt-sync", states)
    monkeypatch.setattr(direct_io, "_open_direct", lambda path: None)
    assert_same_files(sync, save_with(AsyncWriter(), str(tmp_path), "ckpt-async", states))


def test_buffered_fallback_when_o_direct_writes_fail_with_einval(tmp_path, monkeypatch):
    """Some file systems accept O_DIRECT at open and refuse the writes; a small chunk
    makes the refusal happen mid-file, after some direct writes succeeded."""
    states = hostile_states()
    sync = save_with(SyncWriter(), str(tmp_path), "ckpt-sync", states)
    real_pwrite, calls = os.pwrite, []

    def flaky_pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) > 2:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(direct_io.os, "pwrite", flaky_pwrite)
    monkeypatch.setattr(direct_io, "CHUNK", 4096)
    real_writer = direct_io.image_writer
    monkeypatch.setattr(
        "guardian.async_writer.image_writer",
        lambda path, direct=None: real_writer(path, chunk=4096, direct=True),
    )
    assert_same_files(sync, save_with(AsyncWriter(), str(tmp_path), "ckpt-async", states))
    assert len(calls) == 3


# ---------------------------------------------------------------- exact resume


def test_exact_resume_with_async_saves(tmp_path):
    cfg = {"epochs": 2, "every_steps": 2}
    straight = str(tmp_path / "straight")
    crashed = str(tmp_path / "crashed")
    trainlib.train(cfg, straight, async_save=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainlib.train(cfg, crashed, crash_at=7, async_save=True)
    trainlib.train(cfg, crashed, async_save=True)
    sync_run = str(tmp_path / "sync")
    trainlib.train(cfg, sync_run, async_save=False)
    final = [reader.newest_valid(d).path for d in (straight, crashed, sync_run)]
    assert digest(final[0]) == digest(final[1]) == digest(final[2])


def test_protect_defaults_to_async_and_env_turns_it_off(tmp_path, monkeypatch):
    model = nn.Linear(2, 2)
    with guardian.protect({"model": model}, dir=str(tmp_path / "a"), save_on_exit=False) as g:
        assert isinstance(g._writer, AsyncWriter)
    with guardian.protect(
        {"model": model}, dir=str(tmp_path / "b"), async_save=False, save_on_exit=False
    ) as g:
        assert isinstance(g._writer, SyncWriter)
    monkeypatch.setenv("GUARDIAN_ASYNC", "0")
    with guardian.protect({"model": model}, dir=str(tmp_path / "c"), save_on_exit=False) as g:
        assert isinstance(g._writer, SyncWriter)


def test_a_save_never_waits_for_a_starved_reservation_thread(monkeypatch):
    """The reservation touches the arena's pages at nice 19, which a busy trainer can
    starve. Simulated here by a background thread that never gets going: ``acquire``
    must touch the pages itself and return while that thread is still stuck."""
    from guardian.staging import HUGE_PAGE, StagingArena

    go = threading.Event()
    monkeypatch.setattr(threads, "lower_thread_priority", lambda: go.wait(60))
    arena = StagingArena()
    arena.reserve(20 * HUGE_PAGE + 5)
    stuck = arena._reserving
    buf = arena.acquire(20 * HUGE_PAGE + 5)
    try:
        assert stuck.is_alive()  # acquire did not wait for it
        assert len(buf) == 20 * HUGE_PAGE + 5 and int(buf.sum()) == 0
        buf[-1] = 7  # usable at once
    finally:
        go.set()
        stuck.join(10)
    assert not stuck.is_alive()  # it found no work left and ended
    arena.release()


def test_failed_background_reservation_is_raised_by_the_save_that_needs_it():
    """Pinned memory needs CUDA, which this machine lacks: the background allocation
    fails, reserve() stays quiet, and acquire() raises on the caller's thread."""
    from guardian.staging import StagingArena

    if torch.cuda.is_available():
        pytest.skip("pinned memory works here: nothing fails")
    arena = StagingArena()
    arena.reserve(4096, pinned=True)
    with pytest.raises(RuntimeError):
        arena.acquire(4096, pinned=True)


def protect_every(steps: int, trainer: dict, run_dir) -> guardian.Guard:
    """A guard that saves every ``steps`` steps and nothing else (no exit save, no signals)."""
    return guardian.protect(
        trainer,
        dir=str(run_dir),
        every_steps=steps,
        every_epochs=None,
        save_on_exit=False,
        handle_signals=False,
    )


def test_arena_is_reserved_at_the_first_step_and_reused_by_the_first_save(tmp_path):
    """The first save used to stall for the arena's allocation (2-4 s for 3.2 GB here):
    now it is allocated in the background at the first step, at the size the saves
    need (Adam's moments exist by then), and the first save copies into it."""
    model = nn.Linear(300, 300)
    opt = torch.optim.Adam(model.parameters())
    with protect_every(3, {"model": model, "optimizer": opt}, tmp_path) as g:
        arena = g._writer._arena
        for step in range(1, 4):
            model(torch.randn(2, 300)).sum().backward()
            opt.step()
            opt.zero_grad()
            g.step()
            if step == 1:
                arena._join_reservation()
                owner, capacity = arena._owner, arena.capacity
                assert capacity >= 3 * 300 * 301 * 4  # weights + bias, and both moments
        g._writer.wait()
        assert arena._owner is owner and arena.capacity == capacity  # not reallocated
    assert [c.manifest.step for c in reader.list_checkpoints(str(tmp_path))] == [3]


# ---------------------------------------------------------------- failures surface


class FsyncFailsInBackground(fsops.FS):
    """EIO on every fsync made by a thread other than the main one."""

    def fsync(self, fd: int) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise OSError(errno.EIO, "Input/output error")
        super().fsync(fd)


def test_background_error_surfaces_at_next_step(tmp_path):
    model = nn.Linear(4, 4)
    old = fsops.set_fs(FsyncFailsInBackground())
    try:
        with pytest.raises(CheckpointWriteError, match="Input/output error"):
            with protect_every(1, {"model": model}, tmp_path) as g:
                g.step()  # saves: the failure happens in the background
                while g._writer.busy:
                    time.sleep(0.01)
                g.step()  # ... and is raised here, in the loop
                pytest.fail("the background failure was not raised at the next step")
    finally:
        fsops.set_fs(old)
    assert reader.newest_valid(str(tmp_path)) is None
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_background_error_is_raised_by_wait_and_not_lost(tmp_path):
    w = AsyncWriter()
    old = fsops.set_fs(FsyncFailsInBackground())
    try:
        snap = snap_mod.capture({"m": ("module", {"w": torch.ones(3)})})
        man = manifest_for("ckpt-x", snap)
        w.submit(str(tmp_path), snap, man, lambda *a: None)
        with pytest.raises(CheckpointWriteError):
            w.wait()
        w.wait()  # reported once, then cleared
    finally:
        fsops.set_fs(old)
        w.close()


# ---------------------------------------------------------------- processes

CHILD = textwrap.dedent("""
    import os, sys, torch
    from torch import nn
    import guardian
    run, mode = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(int(sys.argv[3]))])
    opt = torch.optim.Adam(model.parameters())
    with guardian.protect({"model": model, "optimizer": opt}, dir=run, every_steps=1, every_epochs=None,
                          keep_last=None, save_on_exit=False, handle_signals=False) as g:
        for step in range(10_000):
            model(torch.randn(8, 1024)).sum().backward()
            opt.step(); opt.zero_grad()
            g.step()
            if mode == "exit" and step == 1:
                print("in flight:", g._writer.busy, flush=True)
                sys.exit(0)  # leaves the block at once; the save in flight must still land
""")


def run_child(run_dir: str, mode: str, layers: int, **kw) -> subprocess.Popen:
    env = {
        **os.environ,
        "GUARDIAN_QUIET": "0",
        "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, run_dir, mode, str(layers)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_process_exits_only_after_in_flight_save_is_durable(tmp_path):
    run_dir = str(tmp_path / "run")
    proc = run_child(run_dir, "exit", layers=16)  # ~200 MB of model + Adam state
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "in flight: True" in out  # the exit really raced a background persist
    infos = reader.list_checkpoints(run_dir, verify=True)
    assert [i.manifest.step for i in infos if i.valid] == [1, 2], err
    assert not [n for n in os.listdir(run_dir) if n.startswith(".tmp-")]


def test_sigkill_during_background_persist_loses_nothing_committed(tmp_path):
    run_dir = str(tmp_path / "run")
    proc = run_child(run_dir, "loop", layers=16)
    reported: list[str] = []
    try:
        for line in proc.stderr:  # wait for two commits the child has reported
            reported += _saved_names(line)
            if len(reported) >= 2:
                break
        deadline = time.monotonic() + 30
        while not [n for n in os.listdir(run_dir) if n.startswith(".tmp-")]:  # a persist in flight
            assert time.monotonic() < deadline and proc.poll() is None, "no persist in flight"
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        _, rest = proc.communicate(timeout=30)
    for line in rest.splitlines():
        reported += _saved_names(line)
    assert proc.returncode == -signal.SIGKILL
    for name in reported:
        info = reader.inspect_checkpoint(os.path.join(run_dir, name), verify=True)
        assert info.valid, (name, info.problems)
    newest = reader.newest_valid(run_dir)
    assert newest is not None and newest.manifest.seq >= max(
        reader.inspect_checkpoint(os.path.join(run_dir, n)).manifest.seq for n in reported
    )


def _saved_names(line: str) -> list[str]:
    return [line.split("saved ")[1].split()[0]] if " saved step-" in " " + line else []


def test_staging_failure_aborts_the_pipelined_persist(tmp_path, monkeypatch):
    """The persist thread starts before the copy; if the copy fails it must give up,
    leave no temporary directory, and the writer must stay usable."""
    from guardian import async_writer

    states = hostile_states()
    real = async_writer._copy_segments

    def broken(image, segments):
        raise RuntimeError("copy failed")

    monkeypatch.setattr(async_writer, "_copy_segments", broken)
    w = AsyncWriter()
    snap = snap_mod.capture(states)
    man = manifest_for("ckpt-broken", snap)
    with pytest.raises(RuntimeError, match="copy failed"):
        w.submit(str(tmp_path), snap, man, lambda *a: None)
    assert not w.busy
    w.wait()  # nothing left to report
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-") or n.startswith("ckpt-")]
    monkeypatch.setattr(async_writer, "_copy_segments", real)
    sync = save_with(SyncWriter(), str(tmp_path), "ckpt-sync", states)
    assert_same_files(sync, save_with(w, str(tmp_path), "ckpt-async", states))


def test_pipelined_copy_split_across_threads_is_exact(tmp_path, monkeypatch):
    """Batches large enough for the two-thread copy, odd sizes and dtypes included."""
    from guardian import async_writer

    monkeypatch.setattr(async_writer, "PARALLEL_COPY_MIN", 1)
    monkeypatch.setattr(async_writer, "COPY_BATCH", 10_000)
    monkeypatch.setattr(async_writer, "COPY_THREADS", 2)
    states = hostile_states()
    states["odd"][1]["bf16"] = torch.randn(1001, dtype=torch.bfloat16)
    sync = save_with(SyncWriter(), str(tmp_path), "ckpt-sync", states)
    assert_same_files(sync, save_with(AsyncWriter(), str(tmp_path), "ckpt-async", states))


def test_small_tensors_copied_in_runs_are_exact_whatever_the_mix(tmp_path, monkeypatch):
    """Generated mixes: small tensors (copied in runs by one torch call,
    staging.copy_small_run) between large ones (copied one by one, batches flushed in
    the middle of runs), odd dtypes, strided views, tensors that require grad, empty
    ones. Every byte lands as the synchronous writer writes it."""
    from guardian import async_writer

    monkeypatch.setattr(async_writer, "COPY_BATCH", 50_000)
    g = torch.Generator().manual_seed(7)
    dtypes = [torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.uint8, torch.float64]

    def draw(k: int) -> int:
        return int(torch.randint(k, (1,), generator=g))

    for trial in range(6):
        mix = {}
        for i in range(40):
            dtype, n = dtypes[draw(len(dtypes))], draw(12_000)
            t = (torch.rand(n, 2, generator=g) * 100).to(dtype)
            t = t[:, 0] if draw(4) == 0 else t.reshape(-1)[:n]  # a strided view or a plain one
            if dtype.is_floating_point and draw(3) == 0:
                t = t.clone().requires_grad_(True)
            mix[f"t{i:02d}"] = t
        states = {"m": ("user", mix)}
        sync = save_with(SyncWriter(), str(tmp_path), f"s{trial}", states)
        assert_same_files(sync, save_with(AsyncWriter(), str(tmp_path), f"a{trial}", states))


# ---------------------------------------------------------------- abandoned saves (issue 11, 10(e))


def _persist_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("guardian-persist")]


def _wait_until(condition, what: str, deadline: float = 60.0) -> None:
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, f"still waiting after {deadline:.0f} s: {what}"
        time.sleep(0.01)


class StartRaises(AsyncWriter):
    """An exception raised once the persist thread exists but before staging begins —
    what a signal handler raising inside ``Thread.start`` does (seen for real: torch's
    SIGCHLD handler for a DataLoader worker killed by the same SIGTERM)."""

    def _start(self, *args, **kwargs):
        super()._start(*args, **kwargs)
        raise RuntimeError("injected while starting the persist thread")


def test_exception_while_starting_the_persist_thread_abandons_the_save(tmp_path):
    w = StartRaises()
    snap = snap_mod.capture(hostile_states())
    with pytest.raises(RuntimeError, match="injected while starting"):
        w.submit(str(tmp_path), snap, manifest_for("ckpt-started", snap), lambda *a: pytest.fail("committed"))
    _wait_until(lambda: not _persist_threads(), "the persist thread waits for a copy that never comes")
    w.wait()  # nothing to report: the exception above was the report
    assert os.listdir(tmp_path) == []  # neither a checkpoint nor a temporary directory
    w.close()


def test_abandoned_staging_is_failed_by_the_next_wait(tmp_path, monkeypatch):
    """The clean-up itself is cut short (a second signal's exception inside it): the
    image is neither complete nor failed when ``submit`` is left. ``wait`` — which the
    guard calls on every way out — must still end the persist thread, and report no
    checkpoint."""
    from guardian import async_writer
    from guardian.staging import StagedImage

    def broken_copy(image, segments):
        raise RuntimeError("copy failed")

    real_fail, calls = StagedImage.fail, []

    def fail_interrupted(self, error):
        calls.append(error)
        if len(calls) == 1:
            raise KeyboardInterrupt  # inside the except: the image stays unfailed
        real_fail(self, error)

    monkeypatch.setattr(async_writer, "_copy_segments", broken_copy)
    monkeypatch.setattr(StagedImage, "fail", fail_interrupted)
    w = AsyncWriter()
    snap = snap_mod.capture(hostile_states())
    with pytest.raises(KeyboardInterrupt):
        w.submit(str(tmp_path), snap, manifest_for("ckpt-x", snap), lambda *a: pytest.fail("committed"))
    assert _persist_threads(), "the persist thread should still be waiting for the copy"
    waiter = threading.Thread(target=w.wait, name="test-wait", daemon=True)
    waiter.start()
    waiter.join(60)
    assert not waiter.is_alive(), "wait() hangs on a save abandoned while it was being staged"
    assert not _persist_threads()
    assert os.listdir(tmp_path) == []
    w.close()


ABANDON_CHILD = textwrap.dedent("""
    import sys, torch
    from guardian import async_writer
    from guardian.staging import StagedImage
    from guardian.state import snapshot as snap_mod
    from test_async_writer import manifest_for

    def broken_copy(image, segments):
        raise RuntimeError("copy failed")

    def fail_interrupted(self, error):
        raise KeyboardInterrupt  # the clean-up never fails the image

    async_writer._copy_segments = broken_copy
    StagedImage.fail = fail_interrupted
    w = async_writer.AsyncWriter()
    snap = snap_mod.capture({"m": ("module", {"w": torch.ones(1 << 20)})})
    try:
        w.submit(sys.argv[1], snap, manifest_for("ckpt-x", snap), lambda *a: print("COMMITTED"))
    except KeyboardInterrupt:
        print("abandoned", flush=True)
    # the main thread ends here without wait() or close(): the interpreter must still exit
""")


def test_process_exits_when_an_abandoned_save_is_never_waited_for(tmp_path):
    env = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-c", ABANDON_CHILD, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,  # before the fail-safe: the non-daemon persist thread waited forever
    )
    assert "abandoned" in proc.stdout and "COMMITTED" not in proc.stdout, proc.stderr
    assert reader.list_checkpoints(str(tmp_path)) == []


PREEMPT_CHILD = textwrap.dedent("""
    import os, signal, sys, torch
    import guardian
    from guardian import async_writer

    real_start = async_writer.AsyncWriter._start

    def start_then_raise(self, *args, **kwargs):
        real_start(self, *args, **kwargs)
        if "preempt" in args[1][2].reason:
            raise RuntimeError("injected while starting the preemption save")

    async_writer.AsyncWriter._start = start_then_raise
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with guardian.protect(model=model, optimizer=opt, dir=sys.argv[1], every_steps=2, every_epochs=None) as g:
        for step in range(1, 50):
            model(torch.randn(4, 64)).sum().backward()
            opt.step(); opt.zero_grad()
            if step == 5:
                os.kill(os.getpid(), signal.SIGTERM)
            g.step()
""")


def test_preemption_save_that_fails_to_start_exits_instead_of_hanging(tmp_path):
    """The incident: "signal 15 received; checkpointing", then an exception while the
    persist thread was starting, and the process never exited."""
    run_dir = str(tmp_path / "run")
    proc = subprocess.run(
        [sys.executable, "-c", PREEMPT_CHILD, run_dir],
        env={**os.environ, "GUARDIAN_QUIET": "0"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "signal 15 received" in proc.stderr
    assert proc.returncode == 1 and "injected while starting the preemption save" in proc.stderr
    steps = [i.manifest.step for i in reader.list_checkpoints(run_dir, verify=True) if i.valid]
    assert steps[-1] == 4  # the last periodic save; no preemption checkpoint (step 5) is claimed
    assert not [n for n in os.listdir(run_dir) if n.startswith(".tmp-")]


# ---------------------------------------------------------------- what counts as a write error (item 9)


class FsyncRaisesInBackground(fsops.FS):
    """Raises ``error`` from every fsync made off the main thread."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error

    def fsync(self, fd: int) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise self.error
        super().fsync(fd)


@pytest.mark.parametrize("error", [TypeError("a bug in the writer"), KeyboardInterrupt()])
def test_a_bug_in_the_persist_thread_propagates_as_itself(tmp_path, error):
    """on_save_error='warn' forgives I/O failures only: a bug must stop the run as
    itself, not become one log line per save."""
    model = nn.Linear(4, 4)
    old = fsops.set_fs(FsyncRaisesInBackground(error))
    try:
        with pytest.raises(type(error)) as raised:
            with guardian.protect(
                {"model": model}, dir=tmp_path, every_steps=1, every_epochs=None, on_save_error="warn"
            ) as g:
                for _ in range(50):
                    g.step()
                    while g._writer.busy:
                        time.sleep(0.01)
    finally:
        fsops.set_fs(old)
    assert not isinstance(raised.value, CheckpointWriteError)
    assert reader.newest_valid(str(tmp_path)) is None


def test_an_io_failure_in_the_persist_thread_is_a_write_error_that_warn_forgives(tmp_path, caplog):
    model = nn.Linear(4, 4)
    old = fsops.set_fs(FsyncRaisesInBackground(OSError(errno.EIO, "Input/output error")))
    try:
        with guardian.protect(
            {"model": model},
            dir=tmp_path,
            every_steps=1,
            every_epochs=None,
            on_save_error="warn",
            save_on_exit=False,
        ) as g:
            for _ in range(3):
                g.step()
                while g._writer.busy:
                    time.sleep(0.01)
    finally:
        fsops.set_fs(old)
    assert g.global_step == 3  # training went on
    failures = [r for r in caplog.records if "FAILED" in r.getMessage()]
    assert failures and "Input/output error" in failures[0].getMessage()
