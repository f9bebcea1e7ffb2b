"""The hostile-input suite: many damaged, forged or booby-trapped run directories,
each built from a real two-checkpoint run, each run against every reader.

Readers: ``guardian verify``, ``guardian ls``, ``ls --json`` and ``inspect --json``
as real CLI subprocesses (in parallel, with a timeout), and a ``protect()`` resume
(tests/hostile_resume_worker.py, one process for many runs, an alarm per run).

For every case and reader: no raw traceback, no hang, no terminal escape in the
output, peak RSS within a budget of the clean baseline, and no access outside the
run directory — every case has its own ``outside/`` directory, the target of any
planted link, watched with inotify while the readers run. Then per case: what must
be refused is refused (verify), and resume takes the previous good checkpoint.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hostile_resume_worker import tiny

import guardian
from guardian.errors import CorruptCheckpointError
from guardian.format import manifest as manifest_mod
from guardian.format import strictjson
from guardian.format.hashing import hash_file
from guardian.format.layout import MANIFEST_FILE, STATE_FILE, TENSORS_FILE, checkpoint_name

OLD, NEW = checkpoint_name(2), checkpoint_name(4)
TESTS = os.path.dirname(os.path.abspath(__file__))
# The CLI, reporting its own peak RSS (VmHWM) on exit: wait4's ru_maxrss would count
# the pages of this (torch-laden) process shared with the child between fork and exec.
CLI = [
    sys.executable,
    "-c",
    "import atexit, sys\n"
    "def _hwm():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            sys.stderr.write('\\n#hwm ' + line.split()[1] + '\\n')\n"
    "atexit.register(_hwm)\n"
    "from guardian.cli import main\n"
    "main(prog_name='guardian')",
]
HWM_MARK = b"\n#hwm "
READERS = {
    "verify": ["verify"],
    "ls": ["ls"],
    "ls_json": ["ls", "--json"],
    "inspect_json": ["inspect", "--json"],
}
CLI_TIMEOUT = 60
PARALLEL = 4
RSS_SLACK = 24 << 20  # the 8 MiB hash buffer and the 1 MiB base budgets, with room to spare
MB = 1 << 20


# ---------------------------------------------------------------------------- forging


def _rehash(ckpt: str, rel: str) -> None:
    """Make the manifest vouch for ``rel`` as it now is (a forger re-hashes: the hash is unkeyed)."""
    digest, size = hash_file(os.path.join(ckpt, rel))
    _edit_manifest(ckpt, lambda m: m["files"].__setitem__(rel, {"bytes": size, "hash": digest}))


def _edit_manifest(ckpt: str, edit: Callable[[dict], object]) -> None:
    path = os.path.join(ckpt, MANIFEST_FILE)
    with open(path, "rb") as f:
        obj = json.loads(f.read())
    edit(obj)
    obj["manifest_hash"] = manifest_mod.self_hash(obj)
    with open(path, "wb") as f:
        f.write(json.dumps(obj).encode())


def _set(key: str, value: object) -> Callable[[dict], object]:
    return lambda m: m.__setitem__(key, value)


def _edit_state(ckpt: str, edit: Callable[[dict], object]) -> None:
    path = os.path.join(ckpt, STATE_FILE)
    with open(path, "rb") as f:
        obj = json.loads(f.read())
    edit(obj["components"])
    with open(path, "wb") as f:
        f.write(strictjson.dumps(obj))
    _rehash(ckpt, STATE_FILE)


def _edit_header(ckpt: str, edit: Callable[[dict], object]) -> None:
    path = os.path.join(ckpt, TENSORS_FILE)
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    edit(header)
    body = json.dumps(header).encode()
    body += b" " * ((-(8 + len(body))) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body + data)
    _rehash(ckpt, TENSORS_FILE)


def _replace(path: str, make: Callable[[str], object]) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)
    make(path)


def _tiny_lists(nbytes: int, prefix: bytes = b'{"x":[', suffix: bytes = b"]}") -> bytes:
    count = (nbytes - len(prefix) - len(suffix)) // 3
    return prefix + b"[]," * count + b"[]" + suffix


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _sparse(path: str, size: int, head: bytes = b"") -> None:
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)


# ---------------------------------------------------------------------------- cases

# What a case must come to. Every case, every reader: no traceback, hang, escape,
# memory blow-up or outside access. Beyond that:
REFUSED = "refused"  # verify refuses NEW; resume sets it aside and takes OLD
FORGED = "forged"  # verifies, but resume must set it aside (the meta pass) and take OLD
RUN_OK = "run_ok"  # readers fine; resume takes NEW (hostile leftovers handled)
PROTECT_REFUSES = "protect_refuses"  # readers fine; protect() refuses the directory cleanly


@dataclass(frozen=True)
class Case:
    name: str
    expect: str
    build: Callable[[str, str], object]  # (run, outside)


def _new(run: str, rel: str = "") -> str:
    return os.path.join(run, NEW, rel) if rel else os.path.join(run, NEW)


def _victim(outside: str) -> str:
    return os.path.join(outside, "victim.json")


def _state_tree(edit: Callable[[dict], object]) -> Callable[[str, str], object]:
    return lambda run, outside: _edit_state(_new(run), edit)


def _header(edit: Callable[[dict], object]) -> Callable[[str, str], object]:
    return lambda run, outside: _edit_header(_new(run), edit)


def _manifest(key: str, value: object) -> Callable[[str, str], object]:
    return lambda run, outside: _edit_manifest(_new(run), _set(key, value))


def _component_symlink(run: str, outside: str) -> None:
    shutil.copy(_new(run, STATE_FILE), os.path.join(outside, "victim_dir", STATE_FILE))
    os.symlink(os.path.join(outside, "victim_dir"), _new(run, "sub"))
    digest, size = hash_file(_new(run, STATE_FILE))
    _edit_manifest(
        _new(run), lambda m: m["files"].__setitem__("sub/" + STATE_FILE, {"bytes": size, "hash": digest})
    )


def _checkpoint_symlink(run: str, outside: str) -> None:
    copy = os.path.join(outside, "victim_dir", NEW)
    shutil.copytree(_new(run), copy)
    shutil.rmtree(_new(run))
    os.symlink(copy, _new(run))


def _deep_chain(run: str, outside: str) -> None:
    fd = os.open(_new(run), os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(1500):  # relative to a descriptor: the full path is beyond PATH_MAX
        os.mkdir("d", dir_fd=fd)
        nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    os.close(fd)


def _many_entries(run: str, outside: str) -> None:
    for i in range(50_000):
        if i % 2:
            os.close(os.open(os.path.join(run, f"junk-{i}"), os.O_CREAT | os.O_WRONLY, 0o644))
        else:
            os.close(os.open(os.path.join(run, checkpoint_name(10**8 + i)), os.O_CREAT | os.O_WRONLY, 0o644))


def _set_aside_trap(make: Callable[[str, str], object]) -> Callable[[str, str], object]:
    def build(run: str, outside: str) -> None:
        make(os.path.join(run, "set-aside"), outside)
        _replace(_new(run, STATE_FILE), os.mkfifo)  # NEW is refused, so resume sets it aside

    return build


def _stale_entries(run: str, outside: str) -> None:
    os.symlink(os.path.join(outside, "victim_dir"), os.path.join(run, ".tmp-step-000000006-1-ab"))
    os.symlink(_victim(outside), os.path.join(run, ".trash-step-000000001-cd"))
    _write(os.path.join(run, ".tmp-step-000000008-2-ef"), b"not a directory")


def _escape_name(run: str, outside: str) -> None:
    _write(_new(run, "\x1b[2J\x1b[H\x1b]0;owned\x07all checkpoints verified OK\n"), b"")


def _undecodable_name(run: str, outside: str) -> None:
    _write(os.path.join(os.fsencode(_new(run)), b"\xff\xfe\x9b2J"), b"")


def _forged_rng(key: str, value: object) -> Callable[[dict], object]:
    return lambda c: c["rng"]["state"].__setitem__(key, value)


def _progress(key: str, value: object) -> Callable[[dict], object]:
    return lambda c: c["progress"]["state"].__setitem__(key, value)


def _shape_swap(h: dict) -> None:
    h["optimizer/state/0.weight/exp_avg"]["shape"] = [4, 3]


def _dtype(key: str, dtype: str) -> Callable[[dict], object]:
    return lambda h: h[key].__setitem__("dtype", dtype)


def _absurd_dims(h: dict) -> None:
    end = max(v["data_offsets"][1] for k, v in h.items() if k != "__metadata__")
    h["model/zz"] = {"dtype": "F32", "shape": [0, 2**47, 2**47], "data_offsets": [end, end]}


def _numpy_bomb(c: dict) -> None:
    c["rng"]["state"]["numpy"]["__tuple__"][1]["v"]["dtype"] = "(1000000000,)u1"


def _python_words(c: dict) -> None:
    c["rng"]["state"]["python"]["__tuple__"][1]["__tuple__"] = list(range(100))


CASES = [
    # non-regular files and links
    Case("manifest_fifo", REFUSED, lambda r, o: _replace(_new(r, MANIFEST_FILE), os.mkfifo)),
    Case("manifest_directory", REFUSED, lambda r, o: _replace(_new(r, MANIFEST_FILE), os.mkdir)),
    Case("state_fifo", REFUSED, lambda r, o: _replace(_new(r, STATE_FILE), os.mkfifo)),
    Case("tensors_fifo", REFUSED, lambda r, o: _replace(_new(r, TENSORS_FILE), os.mkfifo)),
    Case(
        "manifest_symlink_outside",
        REFUSED,
        lambda r, o: (
            shutil.copy(_new(r, MANIFEST_FILE), _victim(o)),
            _replace(_new(r, MANIFEST_FILE), lambda p: os.symlink(_victim(o), p)),
        ),
    ),
    Case(
        "state_symlink_outside",
        REFUSED,
        lambda r, o: (
            shutil.copy(_new(r, STATE_FILE), _victim(o)),
            _replace(_new(r, STATE_FILE), lambda p: os.symlink(_victim(o), p)),
        ),
    ),
    Case(
        "state_symlink_dev_zero",
        REFUSED,
        lambda r, o: _replace(_new(r, STATE_FILE), lambda p: os.symlink("/dev/zero", p)),
    ),
    Case("path_component_symlink", REFUSED, _component_symlink),
    Case("checkpoint_symlink_outside", REFUSED, _checkpoint_symlink),
    # memory
    Case(
        "manifest_30mb_tiny_lists", REFUSED, lambda r, o: _write(_new(r, MANIFEST_FILE), _tiny_lists(30 * MB))
    ),
    Case("manifest_200mb", REFUSED, lambda r, o: _sparse(_new(r, MANIFEST_FILE), 200 * MB, b'{"x":"')),
    Case(
        "header_30mb_tiny_lists",
        REFUSED,
        lambda r, o: (
            _write(_new(r, TENSORS_FILE), struct.pack("<Q", 30 * MB) + _tiny_lists(30 * MB)[: 30 * MB]),
            _rehash(_new(r), TENSORS_FILE),
        ),
    ),
    Case(
        "header_200mb",
        REFUSED,
        lambda r, o: (
            _sparse(_new(r, TENSORS_FILE), 200 * MB + 8, struct.pack("<Q", 200 * MB)),
            _rehash(_new(r), TENSORS_FILE),
        ),
    ),
    Case(
        "state_30mb_tiny_lists",
        REFUSED,
        lambda r, o: (_write(_new(r, STATE_FILE), _tiny_lists(30 * MB)), _rehash(_new(r), STATE_FILE)),
    ),
    Case(
        "state_200mb",
        REFUSED,
        lambda r, o: (_sparse(_new(r, STATE_FILE), 200 * MB, b'{"x":"'), _rehash(_new(r), STATE_FILE)),
    ),
    Case("world_size_1e6", REFUSED, _manifest("world_size", 1e6)),
    Case("world_size_1e9_int", REFUSED, _manifest("world_size", 10**9)),
    Case("world_size_1e6_int", REFUSED, _manifest("world_size", 10**6)),
    Case("absurd_dims", REFUSED, _header(_absurd_dims)),
    Case("deep_directory_chain", REFUSED, _deep_chain),
    Case("run_dir_50k_entries", RUN_OK, _many_entries),
    # manifest field types
    Case("format_version_true", REFUSED, _manifest("version", True)),
    Case("format_version_string", REFUSED, _manifest("version", "1")),
    Case("step_negative", REFUSED, _manifest("step", -5)),
    Case("step_string", REFUSED, _manifest("step", "4")),
    Case("seq_float", REFUSED, _manifest("seq", 4.0)),
    Case("files_list", REFUSED, _manifest("files", [])),
    Case("metrics_string", REFUSED, _manifest("metrics", "loss=0")),
    Case("reason_string", REFUSED, _manifest("reason", "steps")),
    Case("name_integer", REFUSED, _manifest("name", 4)),
    Case("components_list", REFUSED, _manifest("components", [])),
    Case(
        "file_hash_integer",
        REFUSED,
        lambda r, o: _edit_manifest(_new(r), lambda m: m["files"][STATE_FILE].__setitem__("hash", 7)),
    ),
    Case(
        "state_1e999",
        REFUSED,
        lambda r, o: _edit_state(_new(r), lambda c: c["extra"].__setitem__("state", {"x": 1.5})),
    ),
    # run-directory traps for writers
    Case("lock_fifo", PROTECT_REFUSES, lambda r, o: _replace(os.path.join(r, ".lock"), os.mkfifo)),
    Case(
        "lock_symlink_outside",
        PROTECT_REFUSES,
        lambda r, o: (
            _write(_victim(o), b"precious"),
            _replace(os.path.join(r, ".lock"), lambda p: os.symlink(_victim(o), p)),
        ),
    ),
    Case(
        "lock_dangling_symlink_outside",
        PROTECT_REFUSES,
        lambda r, o: _replace(os.path.join(r, ".lock"), lambda p: os.symlink(os.path.join(o, "created"), p)),
    ),
    Case(
        "set_aside_symlink_outside",
        REFUSED,
        _set_aside_trap(lambda p, o: os.symlink(os.path.join(o, "victim_dir"), p)),
    ),
    Case("set_aside_regular_file", REFUSED, _set_aside_trap(lambda p, o: _write(p, b"x"))),
    Case("stale_entries_links_and_files", RUN_OK, _stale_entries),
    # names
    Case("terminal_escape_file_name", REFUSED, _escape_name),
    Case("undecodable_file_name", REFUSED, _undecodable_name),
    Case("checkpoint_name_trailing_newline", RUN_OK, lambda r, o: shutil.copytree(_new(r), _new(r) + "9\n")),
    # forged: verify passes (re-hashed), resume must refuse in the meta pass
    Case("missing_progress", FORGED, _state_tree(lambda c: c.pop("progress"))),
    Case("missing_rng", FORGED, _state_tree(lambda c: c.pop("rng"))),
    Case("rng_python_wrong_size", FORGED, _state_tree(_python_words)),
    Case("rng_python_wrong_type", FORGED, _state_tree(_forged_rng("python", "abc"))),
    Case("rng_torch_wrong_tensor", FORGED, _state_tree(_forged_rng("torch", {"__tensor__": "model/0.bias"}))),
    Case("rng_numpy_subarray_dtype", FORGED, _state_tree(_numpy_bomb)),
    Case(
        "param_groups_string",
        FORGED,
        _state_tree(lambda c: c["optimizer"]["state"].__setitem__("param_groups", "all")),
    ),
    Case("global_step_negative", FORGED, _state_tree(_progress("global_step", -5))),
    Case("epoch_string", FORGED, _state_tree(_progress("epoch", "0"))),
    Case(
        "policy_wrong_type",
        FORGED,
        _state_tree(lambda c: c["policy"]["state"].__setitem__("bad_epochs", "x")),
    ),
    Case(
        "extra_holds_tensor",
        FORGED,
        _state_tree(lambda c: c["extra"].__setitem__("state", {"t": {"__tensor__": "model/0.bias"}})),
    ),
    Case("optimizer_shape_swapped", FORGED, _header(_shape_swap)),
    Case("model_dtype_swapped_f32_i32", FORGED, _header(_dtype("model/0.weight", "I32"))),
    Case(
        "optimizer_dtype_swapped_f32_i32", FORGED, _header(_dtype("optimizer/state/0.weight/exp_avg", "I32"))
    ),
]
CASE_BY_NAME = {c.name: c for c in CASES}


def _fix_1e999(run: str) -> None:
    """``json`` cannot write 1e999; put the literal in by hand (and re-hash)."""
    path = _new(run, STATE_FILE)
    with open(path, "rb") as f:
        data = f.read().replace(b'"x":1.5', b'"x":1e999')
    _write(path, data)
    _rehash(_new(run), STATE_FILE)


# ---------------------------------------------------------------------------- watching


class OutsideWatch:
    """inotify on every case's outside/ directory: any open, read, write, create or
    delete there while the readers run is an access outside the run directory."""

    MASK = 0x1 | 0x2 | 0x4 | 0x8 | 0x20 | 0x40 | 0x80 | 0x100 | 0x200  # access…delete

    def __init__(self) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            pytest.skip("inotify is not available here")
        self.owner: dict[int, str] = {}
        self.events: dict[str, list[str]] = {}

    def watch(self, path: str, case: str) -> None:
        wd = self.libc.inotify_add_watch(self.fd, os.fsencode(path), self.MASK)
        assert wd >= 0, f"inotify_add_watch({path}) failed: errno {ctypes.get_errno()}"
        self.owner[wd] = case

    def drain(self) -> None:
        while True:
            try:
                buf = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return
            pos = 0
            while pos < len(buf):
                wd, mask, _cookie, length = struct.unpack_from("iIII", buf, pos)
                name = buf[pos + 16 : pos + 16 + length].rstrip(b"\0").decode(errors="replace")
                self.events.setdefault(self.owner.get(wd, "?"), []).append(f"{mask:#x} {name}")
                pos += 16 + length

    def close(self) -> None:
        os.close(self.fd)


# ---------------------------------------------------------------------------- running


@dataclass
class Result:
    code: int | None  # None: killed after the timeout (a hang)
    stdout: bytes
    stderr: bytes
    rss: int  # peak resident set, bytes
    seconds: float


def _run_cli(jobs: list[tuple[str, list[str]]], workdir: str) -> dict[str, Result]:
    """Run ``(key, argv)`` jobs, PARALLEL at a time, each with a timeout; the peak RSS
    each child reports of itself."""
    results: dict[str, Result] = {}
    pending = list(jobs)
    running: dict[int, tuple[str, subprocess.Popen, float, str, str]] = {}
    while pending or running:
        while pending and len(running) < PARALLEL:
            key, argv = pending.pop(0)
            out, err = os.path.join(workdir, f"{len(results) + len(running)}.{os.getpid()}.out"), None
            err = out + ".err"
            with open(out, "wb") as fo, open(err, "wb") as fe:
                proc = subprocess.Popen(CLI + argv, stdout=fo, stderr=fe, start_new_session=True)
            running[proc.pid] = (key, proc, time.monotonic(), out, err)
        for pid, (key, proc, started, out, err) in list(running.items()):
            done, status, usage = os.wait4(pid, os.WNOHANG)
            code: int | None
            if done == 0:
                if time.monotonic() - started < CLI_TIMEOUT:
                    continue
                os.killpg(pid, 9)
                _, status, usage = os.wait4(pid, 0)
                code = None
            else:
                code = os.waitstatus_to_exitcode(status)
            proc.returncode = code if code is not None else -9  # reaped here, not by Popen
            with open(out, "rb") as fo, open(err, "rb") as fe:
                stdout, stderr = fo.read(), fe.read()
            assert HWM_MARK in stderr or code is None, stderr[-2000:]
            stderr, _, hwm = stderr.rpartition(HWM_MARK)
            rss = int(hwm.split()[0]) * 1024 if hwm.strip() else usage.ru_maxrss * 1024
            results[key] = Result(code, stdout, stderr, rss, time.monotonic() - started)
            del running[pid]
        time.sleep(0.01)  # polling interval of the loop, not a wait for an outcome
    return results


def _run_resumes(runs: list[str]) -> dict[str, dict]:
    """protect() resumes in two worker processes (each imports torch once)."""
    halves = [runs[::2], runs[1::2]]
    env = {**os.environ, "GUARDIAN_QUIET": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.join(TESTS, "hostile_resume_worker.py"), json.dumps(h)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        for h in halves
        if h
    ]
    out: dict[str, dict] = {}
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        for line in stdout.decode().splitlines():
            rec = json.loads(line)
            out[rec["run"]] = rec
        assert p.returncode == 0, stderr.decode()[-3000:]
    return out


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> str:
    """A real run: two checkpoints (steps 2 and 4) of a two-layer model with Adam."""
    run = str(tmp_path_factory.mktemp("hostile-template") / "run")
    model, opt = tiny()
    with guardian.protect(
        model=model, optimizer=opt, dir=run, every_steps=2, every_epochs=None, keep_last=5, save_on_exit=False
    ) as g:
        for _ in range(4):
            model(torch.randn(2, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
            g.step()
    assert sorted(n for n in os.listdir(run) if n.startswith("step-")) == [OLD, NEW]
    return run


@pytest.fixture(scope="module")
def suite(template, tmp_path_factory):
    base = str(tmp_path_factory.mktemp("hostile-cases"))
    runs, outsides = {}, {}
    for case in [Case("baseline", RUN_OK, lambda r, o: None), *CASES]:
        root = os.path.join(base, case.name)
        run, outside = os.path.join(root, "run"), os.path.join(root, "outside")
        os.makedirs(os.path.join(outside, "victim_dir"))
        shutil.copytree(template, run, symlinks=True)
        case.build(run, outside)
        if case.name == "state_1e999":
            _fix_1e999(run)
        runs[case.name], outsides[case.name] = run, outside
    snapshot = {name: _tree(o) for name, o in outsides.items()}  # before watching: our own reads
    watch = OutsideWatch()
    for name, outside in outsides.items():
        watch.watch(outside, name)
        watch.watch(os.path.join(outside, "victim_dir"), name)
    started = time.monotonic()
    jobs = [((name, reader), argv + [run]) for name, run in runs.items() for reader, argv in READERS.items()]
    cli = _run_cli(jobs, base)
    cli_seconds = time.monotonic() - started
    resumed = _run_resumes(list(runs.values()))
    watch.drain()
    watch.close()
    print(
        f"\nhostile suite: {len(CASES)} cases x {len(READERS)} CLI readers in {cli_seconds:.1f} s, resumes in "
        f"{time.monotonic() - started - cli_seconds:.1f} s"
    )
    top = sorted(cli.items(), key=lambda kv: -kv[1].rss)[:3]
    print(
        "peak RSS (MiB): baseline",
        max(cli[("baseline", r)].rss for r in READERS) // MB,
        "| highest:",
        ", ".join(f"{c}/{r} {res.rss // MB}" for (c, r), res in top),
        "| slowest:",
        ", ".join(
            f"{c}/{r} {res.seconds:.1f}s"
            for (c, r), res in sorted(cli.items(), key=lambda kv: -kv[1].seconds)[:3]
        ),
    )
    yield {
        "runs": runs,
        "cli": cli,
        "resume": {name: resumed[run] for name, run in runs.items()},
        "outside_events": watch.events,
        "outside_changed": {n: o for n, o in outsides.items() if _tree(o) != snapshot[n]},
        "baseline_rss": max(cli[("baseline", r)].rss for r in READERS),
    }
    # pytest's own clean-up recurses and cannot remove a 1 500-level chain; rm can
    subprocess.run(["rm", "-rf", os.path.dirname(runs["deep_directory_chain"])], check=True)


def _tree(root: str) -> dict[str, tuple[int, bytes]]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            data = b""
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    data = f.read()
            out[os.path.relpath(path, root)] = (st.st_mtime_ns, data)
    return out


# ---------------------------------------------------------------------------- checks

NAMES = ["baseline"] + [c.name for c in CASES]


def test_baseline_is_clean(suite):
    for reader in READERS:
        r = suite["cli"][("baseline", reader)]
        assert r.code == 0, (reader, r.stderr)
    assert suite["resume"]["baseline"]["from"] == NEW


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("case", NAMES)
def test_every_reader_ends_cleanly(suite, case, reader):
    """No hang, no raw traceback, no terminal escape, bounded memory."""
    r = suite["cli"][(case, reader)]
    assert r.code is not None, f"{reader} hung on {case} (killed after {CLI_TIMEOUT} s)"
    assert b"Traceback" not in r.stderr and b"Traceback" not in r.stdout, r.stderr.decode(errors="replace")
    assert r.code in (0, 1, 3, 4), (r.code, r.stderr[-2000:])
    for stream in (r.stdout, r.stderr):
        assert b"\x1b" not in stream and b"\x9b" not in stream and b"\x07" not in stream
    limit = 2 * suite["baseline_rss"] + RSS_SLACK
    assert r.rss < limit, f"{reader} on {case}: peak RSS {r.rss / MB:.0f} MiB (limit {limit / MB:.0f} MiB)"


@pytest.mark.parametrize("case", NAMES)
def test_nothing_outside_the_run_directory_is_touched(suite, case):
    assert case not in suite["outside_events"], suite["outside_events"].get(case)
    assert case not in suite["outside_changed"]


@pytest.mark.parametrize("case", [c.name for c in CASES if c.expect == REFUSED])
def test_hostile_checkpoint_is_refused_by_verify(suite, case):
    r = suite["cli"][(case, "verify")]
    assert r.code == 3, r.stdout.decode(errors="replace")
    out = suite["cli"][(case, "inspect_json")]
    if out.code == 0:
        assert json.loads(out.stdout)["name"] == OLD  # never summarizes what it refused
    listing = json.loads(suite["cli"][(case, "ls_json")].stdout or b"[]")
    assert any(row["name"] == OLD and row["valid"] for row in listing)


def _set_aside(run: str) -> list[str]:
    asides = [os.path.join(run, d) for d in os.listdir(run) if d.startswith("set-aside")]
    return [n for d in asides if os.path.isdir(d) and not os.path.islink(d) for n in os.listdir(d)]


@pytest.mark.parametrize("case", [c.name for c in CASES if c.expect == REFUSED])
def test_resume_never_uses_a_refused_checkpoint(suite, case):
    """The previous checkpoint is used. (A checkpoint whose manifest is unreadable has no
    known sequence number; resume leaves it where it is rather than guess.)"""
    rec = suite["resume"][case]
    assert rec["outcome"] == "resumed" and rec["from"] == OLD, rec


@pytest.mark.parametrize("case", ["set_aside_symlink_outside", "set_aside_regular_file"])
def test_set_aside_never_goes_through_a_planted_name(suite, case):
    run = suite["runs"][case]
    assert not os.path.lexists(os.path.join(run, NEW))
    assert any(n.startswith(NEW) for n in os.listdir(os.path.join(run, "set-aside.1")))


@pytest.mark.parametrize("case", [c.name for c in CASES if c.expect == FORGED])
def test_resume_sets_a_forged_checkpoint_aside(suite, case):
    """The newest checkpoint verifies but cannot be restored: it is set aside (never
    deleted) and the previous one used. Needs the resume code to run the meta pass
    (``validate.check_restorable`` after the adapters' ``check_state``) and to set
    the checkpoint aside on its ``CorruptCheckpointError``."""
    rec = suite["resume"][case]
    assert rec["outcome"] == "resumed" and rec["from"] == OLD, rec
    run = suite["runs"][case]
    assert not os.path.lexists(os.path.join(run, NEW)), "the forged checkpoint was not set aside"
    assert any(n.startswith(NEW) for n in _set_aside(run))


@pytest.mark.parametrize("case", [c.name for c in CASES if c.expect == RUN_OK])
def test_hostile_leftovers_do_not_stop_resume(suite, case):
    report = json.loads(suite["cli"][(case, "ls_json")].stdout)
    assert {r["name"] for r in report if r["valid"]} == {OLD, NEW}
    rec = suite["resume"][case]
    assert rec["outcome"] == "resumed" and rec["from"] == NEW, rec
    leftovers = [n for n in os.listdir(suite["runs"][case]) if n.startswith((".tmp-", ".trash-"))]
    assert not leftovers


@pytest.mark.parametrize("case", [c.name for c in CASES if c.expect == PROTECT_REFUSES])
def test_unusable_run_directory_is_refused_cleanly(suite, case):
    assert suite["cli"][(case, "verify")].code == 0
    rec = suite["resume"][case]
    assert rec["outcome"] == "error" and rec["type"] == "CheckpointWriteError", rec
    assert ".lock" in rec["message"] and "Remove it" in rec["message"]


def test_escaped_name_is_shown_escaped(suite):
    out = suite["cli"][("terminal_escape_file_name", "verify")].stdout.decode()
    assert "\\x1b[2J" in out and "all checkpoints verified OK\\n" in out


# ---------------------------------------------------------------------------- meta pass


@pytest.mark.parametrize("case", [c.name for c in CASES if c.expect == FORGED])
def test_forged_checkpoint_verifies_but_fails_the_meta_pass(template, tmp_path, case):
    """What the resume code's meta pass does (load_meta → check_state → check_restorable)
    raises CorruptCheckpointError before any live tensor is touched."""
    from guardian.format.reader import inspect_checkpoint
    from guardian.state import snapshot
    from guardian.state.discover import discover
    from guardian.state.validate import check_restorable

    run = str(tmp_path / "run")
    shutil.copytree(template, run, symlinks=True)
    CASE_BY_NAME[case].build(run, str(tmp_path))
    assert inspect_checkpoint(_new(run), verify=True).valid  # the forger re-hashed
    model, opt = tiny()
    before = [p.detach().clone() for p in model.parameters()]
    components, _ = discover({}, {"model": model, "optimizer": opt})
    with pytest.raises(CorruptCheckpointError):
        meta = snapshot.load_meta(_new(run))
        for name, adapter in components.items():
            if name in meta and hasattr(adapter, "check_state"):
                adapter.check_state(meta[name][1], name)
        check_restorable(meta, _new(run))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_meta_pass_accepts_every_real_checkpoint(template):
    from guardian.state import snapshot
    from guardian.state.validate import check_restorable

    for name in (OLD, NEW):
        check_restorable(snapshot.load_meta(os.path.join(template, name)), os.path.join(template, name))
