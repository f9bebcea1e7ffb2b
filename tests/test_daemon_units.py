"""The daemon's parts: policy, heartbeat clock, registry security, processes, NVML, service unit.

No GPU on the CI machines: the NVML tests use a fake ``pynvml`` module (the only mock).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import types

import psutil
import pytest

from guardian.daemon import UnsafeJobError, gates, knobs, policy, procs, reconcile, service
from guardian.daemon import registry as reg
from guardian.daemon.gpu import Gpus
from guardian.daemon.heartbeat import HangClock
from guardian.daemon.registry import Attempt

K = knobs.Knobs(
    backoff_base=10,
    backoff_max=600,
    max_failures=3,
    thrash_count=4,
    thrash_window=600,
    hang_min=300,
    hang_factor=5,
    startup=900,
    save_timeout=1800,
)


def facts(**kw):
    base = dict(exit_code=1, signal=None, run_state=None, error_type=None, made_progress=False)
    return policy.ExitFacts(**{**base, **kw})


@pytest.mark.parametrize(
    "kw, expected",
    [
        (dict(exit_code=0, run_state="finished"), "done"),
        (dict(exit_code=0, run_state="running"), "incomplete"),
        (dict(exit_code=75), "requeue"),
        (dict(exit_code=78), "permanent"),
        (dict(exit_code=1, error_type="NameError"), "permanent"),
        (dict(exit_code=1, error_type="NameError", made_progress=True), "crash"),
        (dict(exit_code=1, error_type="RuntimeError"), "crash"),
        (dict(exit_code=-9, signal="SIGKILL"), "crash"),
        (dict(exit_code=-9, hung=True), "hang"),
        (dict(exit_code=None, run_state="finished"), "done"),
        (dict(exit_code=75, stop_requested=True), "stopped"),
    ],
)
def test_classify(kw, expected):
    assert policy.classify(facts(**kw)).classification == expected


def test_budget_only_for_crashes_and_hangs():
    assert not policy.classify(facts(exit_code=75)).uses_budget
    assert policy.classify(facts(exit_code=-9)).uses_budget


def test_error_type_from_stderr():
    lines = [
        "Traceback (most recent call last):",
        '  File "x.py", line 1',
        "    foo()",
        "NameError: name 'foo' is not defined",
    ]
    assert policy.error_type_from_stderr(lines) == "NameError"
    assert policy.error_type_from_stderr(["torch.OutOfMemoryError: CUDA out of memory"]) == "OutOfMemoryError"
    assert policy.error_type_from_stderr(["just a log line"]) is None


def test_backoff_doubles_caps_and_jitters():
    rng = random.Random(0)
    k = knobs.Knobs(backoff_base=10, backoff_max=600, backoff_jitter=0.25)
    for n, nominal in ((1, 10), (2, 20), (3, 40), (10, 600)):
        d = policy.backoff(n, k, rng)
        assert 0.75 * nominal <= d <= 1.25 * nominal


def test_give_up_rules():
    now = 10_000.0
    assert policy.give_up_reason(3, [], 3, now, K).startswith("3 failures")
    assert "thrashing" in policy.give_up_reason(1, [now - 1] * 4, 5, now, K)
    assert policy.give_up_reason(1, [now - 1000] * 4, 5, now, K) is None
    assert "hard cap" in policy.give_up_reason(0, [], 100, now, K)


def test_step_back_only_after_two_deaths_at_the_same_checkpoint():
    assert policy.should_step_back(["a", "b", "b"], [True, False, False])
    assert not policy.should_step_back(["a", "b"], [False, False])
    assert not policy.should_step_back(["b", "b"], [False, True])
    assert not policy.should_step_back([None, None], [False, False])


def test_hang_clock_learns_and_widens_while_saving():
    t0, m = 1000.0, 50.0  # wall time in the beats; the daemon's monotonic clock
    c = HangClock(started=t0, pid=7, quiet_since=m)
    assert c.timeout(K) == K.startup
    assert c.verdict(K, now=m + K.startup - 1) is None
    assert "before its first heartbeat" in c.verdict(K, now=m + K.startup + 1)
    for i in range(20):
        c.observe({"pid": 7, "step": i * 10, "phase": "train", "time": t0 + i * 100.0})  # 10 s/step
    assert c.p99() == pytest.approx(10.0)
    assert c.timeout(K) == 300  # max(hang_min, 5 × 10 s)
    c.observe({"pid": 7, "step": 200, "phase": "train", "time": t0 + 2000, "step_interval_p99": 100.0})
    assert c.timeout(K) == 500
    c.observe({"pid": 7, "step": 200, "phase": "save", "time": t0 + 2001})
    assert c.timeout(K) == K.save_timeout
    c.observe({"pid": 7, "step": 200, "phase": "done", "time": t0 + 2002})
    assert c.verdict(K, now=m + 10**6) is None


def test_hang_clock_counts_silence_the_daemon_saw_not_the_beat_time():
    """Silence runs on the daemon's clock from the look that saw the last new beat; an
    unchanged file does not reset it, and a starved loop (a long gap between looks)
    restarts it: the daemon cannot blame the job for time it could not watch."""
    k = knobs.Knobs(poll=1.0, hang_min=10, startup=10)
    c = HangClock(started=0.0, pid=7, quiet_since=0.0)
    beat = {"pid": 7, "step": 3, "phase": "train", "time": 1.0}
    for t in range(0, 12):  # a look every second; the job wrote one beat, long ago
        c.look(beat, k, now=float(t))
    assert c.verdict(k, now=11.0) is not None and "step 3" in c.verdict(k, now=11.0)
    c.look({**beat, "step": 4, "time": 2.0}, k, now=12.0)  # a new beat, whatever its time says
    assert c.verdict(k, now=12.5) is None
    c.look({**beat, "step": 4, "time": 2.0}, k, now=13.0)
    c.look({**beat, "step": 4, "time": 2.0}, k, now=60.0)  # the loop was starved for 47 s
    assert c.verdict(k, now=60.0) is None and c.verdict(k, now=69.0) is None
    assert c.verdict(k, now=71.0) is not None


def test_hang_clock_ignores_other_processes_and_stale_beats():
    c = HangClock(started=1000.0, pid=7)
    assert c.observe({"pid": 8, "step": 1, "phase": "train", "time": 1001.0}) is None
    assert c.observe({"pid": 7, "step": 1, "phase": "train", "time": 500.0}) is None


def test_knobs_env_and_overrides():
    k = knobs.load({"poll": 0.5}, env={"GUARDIAN_DAEMON_MAX_FAILURES": "7", "GUARDIAN_DAEMON_POLL": "2"})
    assert k.max_failures == 7 and k.poll == 0.5
    with pytest.raises(ValueError, match="GUARDIAN_DAEMON_HANG_MIN"):
        knobs.load(env={"GUARDIAN_DAEMON_HANG_MIN": "soon"})
    assert knobs.default_home({"GUARDIAN_HOME": "/x/y"}) == "/x/y"


# ---------------------------------------------------------------------------- registry


def spec(home: reg.Home, name: str = "j") -> reg.JobSpec:
    s = reg.JobSpec(name=name, argv=["true"], cwd="/", run_dir="/tmp/r", env={}, owner_uid=os.getuid())
    reg.save_spec(home, s)
    return s


def test_home_is_private(tmp_path):
    h = reg.Home(str(tmp_path / "h"))
    os.makedirs(h.root, mode=0o755)
    os.chmod(h.root, 0o755)
    h.ensure()
    assert os.stat(h.root).st_mode & 0o777 == 0o700
    assert os.stat(h.jobs).st_mode & 0o777 == 0o700


def test_job_writable_by_others_is_refused(tmp_path):
    h = reg.Home(str(tmp_path / "h")).ensure()
    spec(h)
    assert reg.load_spec(h, "j").argv == ["true"]
    os.chmod(h.job_file("j", "job.json"), 0o666)
    with pytest.raises(UnsafeJobError, match="writable by group or others"):
        reg.load_spec(h, "j")


def test_job_registered_by_another_uid_is_refused(tmp_path):
    h = reg.Home(str(tmp_path / "h")).ensure()
    s = spec(h)
    s.owner_uid = os.getuid() + 1
    reg.save_spec(h, s)
    with pytest.raises(UnsafeJobError, match="registered by uid"):
        reg.load_spec(h, "j")


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".hidden", "x" * 65, "a b"])
def test_hostile_job_names_are_rejected(bad):
    with pytest.raises(Exception, match="job name"):
        reg.check_name(bad)


def test_state_round_trip_and_events(tmp_path):
    h = reg.Home(str(tmp_path / "h")).ensure()
    spec(h)
    st = reg.JobState(
        name="j", attempts=[Attempt(n=1, boot_id="b", started=1.0, shim={"pid": 1, "create_time": 2.0})]
    )
    reg.save_state(h, st)
    assert reg.load_state(h, "j").current.shim == {"pid": 1, "create_time": 2.0}
    reg.append_event(h, "j", "start", "because", attempt=1)
    with open(h.job_file("j", "events.jsonl"), "ab") as f:
        f.write(b'{"torn')  # a power cut mid-append
    assert [e["event"] for e in reg.read_events(h, "j")] == ["start"]


# ---------------------------------------------------------------------------- processes


def test_identity_survives_only_with_matching_create_time():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        ident = procs.identify(p.pid)
        assert procs.is_alive(ident)
        assert not procs.is_alive(procs.ProcId(p.pid, ident.create_time - 100))
    finally:
        p.kill()
        p.wait()
    assert not procs.is_alive(ident)


def test_shim_records_exit_and_kill_tree_reaches_grandchildren(tmp_path):
    adir = str(tmp_path / "a")
    os.makedirs(adir)
    code = (
        "import subprocess, sys, time; "
        "[subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']) for _ in range(2)]; "
        "print('ready', flush=True); time.sleep(60)"
    )
    shim = procs.spawn_shim(adir, [sys.executable, "-c", code], str(tmp_path), dict(os.environ))
    from guardian.daemon.shim import CHILD_FILE, EXIT_FILE

    out = os.path.join(adir, "stdout.log")
    deadline = time.time() + 20
    while time.time() < deadline and not (os.path.exists(out) and "ready" in open(out).read()):
        time.sleep(0.05)
    child = procs.ProcId.from_dict(reg.read_json(os.path.join(adir, CHILD_FILE)))
    tree = [child.pid] + [c.pid for c in psutil.Process(child.pid).children(recursive=True)]
    assert len(tree) == 3 and os.getsid(child.pid) == shim.pid
    assert procs.kill_tree(procs.ProcId(shim.pid, psutil.Process(shim.pid).create_time()), child) >= 1
    shim.wait(timeout=20)
    rec = reg.read_json(os.path.join(adir, EXIT_FILE))
    assert rec["returncode"] == -9 and rec["signal_name"] == "SIGKILL"
    time.sleep(0.2)
    assert all(procs.identify(p) is None for p in tree)


def test_catches_signal_reads_sigcgt():
    code = "import faulthandler, signal, time; faulthandler.register(signal.SIGTTIN); print('r', flush=True); time.sleep(30)"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        p.stdout.readline()
        assert procs.catches_signal(p.pid, signal.SIGTTIN)
        assert not procs.catches_signal(p.pid, signal.SIGUSR2)
    finally:
        p.kill()
        p.wait()


def test_reconcile_decisions(tmp_path):
    adir = str(tmp_path / "a")
    os.makedirs(adir)
    me = procs.identify(os.getpid())
    alive = Attempt(n=1, boot_id="B", started=0, shim=me.to_dict())
    assert reconcile.decide(alive, "B", adir).action == "adopt"
    assert reconcile.decide(alive, "OTHER", adir).action == "reboot"
    dead = Attempt(n=1, boot_id="B", started=0, shim={"pid": me.pid, "create_time": me.create_time - 50})
    assert reconcile.decide(dead, "B", adir).action == "finished"
    never = Attempt(n=1, boot_id="B", started=0)
    assert reconcile.decide(never, "B", adir).action == "reboot"  # never started: no budget
    open(os.path.join(adir, "exit.json"), "w").write("{}")
    assert reconcile.decide(alive, "OTHER", adir).action == "finished"  # the exit record wins


def test_run_dir_in_use_by_another_live_process_holds(tmp_path):
    from guardian import runfiles

    run = str(tmp_path / "run")
    os.makedirs(run)
    runfiles.write_status(run, "running")  # written by this (live) test process
    assert "not starting a second copy" in gates.run_dir_owner(run, [])
    assert gates.run_dir_owner(run, [{"pid": os.getpid()}]) is None


# ---------------------------------------------------------------------------- NVML (faked: no GPU here)


def fake_pynvml(used_by: dict[int, int]) -> types.ModuleType:
    m = types.ModuleType("pynvml")
    m.NVMLError = type("NVMLError", (Exception,), {})  # as in nvidia-ml-py
    m.nvmlInit = lambda: None
    m.nvmlShutdown = lambda: None
    m.nvmlDeviceGetCount = lambda: 1
    m.nvmlDeviceGetHandleByIndex = lambda i: "h0"
    m.nvmlDeviceGetUUID = lambda h: b"GPU-0000"
    m.nvmlDeviceGetComputeRunningProcesses = lambda h: [
        types.SimpleNamespace(pid=p, usedGpuMemory=b) for p, b in used_by.items()
    ]
    m.nvmlDeviceGetGraphicsRunningProcesses = lambda h: []
    return m


def test_gpu_usage_and_release_with_fake_nvml(monkeypatch):
    used = {4242: 1 << 30}
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(used))
    g = Gpus().start()
    assert g.available and g.usage({4242}) == {"GPU-0000": 1 << 30}
    assert not g.wait_released({4242}, timeout=0.2, poll=0.05)
    used.clear()
    assert g.wait_released({4242}, timeout=0.2, poll=0.05)


def test_nvml_query_errors_are_reported_not_raised(monkeypatch, caplog):
    m = fake_pynvml({})

    def broken(h):
        raise m.NVMLError("GPU is lost")

    m.nvmlDeviceGetComputeRunningProcesses = broken
    monkeypatch.setitem(sys.modules, "pynvml", m)
    g = Gpus().start()
    assert g.usage({1}) == {}
    assert "GPU is lost" in caplog.text


def test_gpu_degrades_without_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    g = Gpus().start()
    assert not g.available and "NVML unavailable" in g.why_not
    assert g.usage({1}) == {} and g.wait_released({1}, timeout=0) and g.drain_events() == []


# ---------------------------------------------------------------------------- service, CLI weight


def test_service_unit():
    text = service.unit_text("/var/lib/guardian", user_mode=False, executable="/opt/venv/bin/guardian")
    assert "ExecStart=/opt/venv/bin/guardian watch --home /var/lib/guardian" in text
    assert "Restart=always" in text and "WantedBy=multi-user.target" in text and "KillMode=process" in text
    assert "WantedBy=default.target" in service.unit_text("/h", user_mode=True, executable="g")
    assert any("enable-linger" in s for s in service.next_steps(True))


def test_service_install_writes_unit(tmp_path):
    from click.testing import CliRunner

    from guardian.cli import main

    r = CliRunner().invoke(
        main,
        [
            "service",
            "install",
            "--home",
            str(tmp_path / "h"),
            "--user",
            "--unit-dir",
            str(tmp_path / "units"),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "Restart=always" in (tmp_path / "units" / "guardian.service").read_text()


def test_daemon_and_status_help_never_import_torch():
    code = (
        "import sys, pkgutil, importlib, guardian.daemon, guardian.cli.daemon, guardian.cli.views, "
        "guardian.cli.jobs; "
        "[importlib.import_module('guardian.daemon.' + m.name) "
        " for m in pkgutil.iter_modules(guardian.daemon.__path__)]; "
        "from click.testing import CliRunner; from guardian.cli import main; "
        "r = CliRunner().invoke(main, ['status', '--help']); assert r.exit_code == 0, r.output; "
        "r = CliRunner().invoke(main, ['watch', '--help']); assert r.exit_code == 0, r.output; "
        "r = CliRunner().invoke(main, ['top', '--help']); assert r.exit_code == 0, r.output; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_run_without_daemon_says_so_and_refuses_duplicates(tmp_path):
    from click.testing import CliRunner

    from guardian.cli import main

    h = str(tmp_path / "h")
    r = CliRunner().invoke(main, ["run", "--home", h, "--name", "x", "--", "python", "t.py", "--lr", "1"])
    assert r.exit_code == 0 and "no daemon is running" in r.output
    assert reg.load_spec(reg.Home(h), "x").argv == ["python", "t.py", "--lr", "1"]
    r = CliRunner().invoke(main, ["run", "--home", h, "--name", "x", "--", "python", "t.py"])
    assert r.exit_code != 0 and "already exists" in r.output
