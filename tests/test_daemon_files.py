"""Item-by-item regressions: hostile files, strict records, secrets, exit codes, wake-ups."""

from __future__ import annotations

import os
import time

import pytest

from guardian.daemon import knobs, policy, procs
from guardian.daemon import registry as reg
from guardian.daemon.records import JobSpec, JobState, filter_env
from guardian.daemon.safefiles import BadFileError, read_json_object
from guardian.daemon.waker import wants_wake

K = knobs.Knobs(backoff_base=10, backoff_max=600, backoff_jitter=0.0, max_requeues=5)


# ---------------------------------------------------------------------------- safe reads


def test_fifo_directory_symlink_and_oversize_are_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    os.mkdir(tmp_path / "dir")
    (tmp_path / "outside.json").write_text('{"a": 1}')
    os.symlink(tmp_path / "outside.json", tmp_path / "link")
    (tmp_path / "big").write_text("[" + "0," * 1000 + "0]")
    t0 = time.monotonic()
    for leaf, words in (("fifo", "FIFO"), ("dir", "directory"), ("link", "symlink"), ("big", "limit")):
        with pytest.raises(BadFileError, match=words):
            read_json_object(str(tmp_path / leaf), limit=1000)
    assert time.monotonic() - t0 < 5  # nothing waited for a writer
    assert read_json_object(str(tmp_path / "missing"), limit=1000) is None


def test_json_that_is_not_an_object_is_not_absent(tmp_path):
    (tmp_path / "s").write_text("[1, 2]")
    with pytest.raises(BadFileError, match="not an object"):
        read_json_object(str(tmp_path / "s"), limit=1000)


# ---------------------------------------------------------------------------- strict records


def spec_dict(**kw):
    base = dict(name="j", argv=["true"], cwd="/", run_dir="/r", env={}, owner_uid=0)
    return {**base, **kw}


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        (dict(argv="python train.py"), "argv"),  # a string is never split into characters
        (dict(argv=[]), "empty"),
        (dict(env={"A": 1}), "env"),
        (dict(owner_uid=True), "owner_uid"),
        (dict(surprise=1), "unknown key"),
        (dict(nproc="2"), "nproc"),
    ],
)
def test_job_spec_is_validated_key_by_key(kw, words):
    with pytest.raises(BadFileError, match=words):
        JobSpec.from_dict(spec_dict(**kw), "job.json")
    assert JobSpec.from_dict(spec_dict(), "job.json").argv == ["true"]


def test_job_state_rejects_unknown_keys_wrong_types_and_bad_attempts():
    with pytest.raises(BadFileError, match="unknown key"):
        JobState.from_dict({"name": "j", "from_the_future": 1})
    with pytest.raises(BadFileError, match="failures"):
        JobState.from_dict({"name": "j", "failures": "3"})
    with pytest.raises(BadFileError, match="attempts\\[0\\]"):
        JobState.from_dict({"name": "j", "attempts": [{"n": 1}]})
    with pytest.raises(BadFileError, match="unknown job state"):
        JobState.from_dict({"name": "j", "state": "dancing"})
    st = JobState.from_dict(JobState(name="j", state="done").to_dict())
    assert st.state == "done"


def test_spawn_refuses_a_string_argv(tmp_path):
    with pytest.raises(TypeError, match="list of strings"):
        procs.spawn_shim(str(tmp_path), "python x.py", str(tmp_path), {})


# ---------------------------------------------------------------------------- secrets and modes


def test_environment_is_stored_without_secrets_unless_asked_and_at_mode_0600(tmp_path):
    env = {
        "PATH": "/bin",
        "HF_TOKEN": "t",
        "AWS_SECRET_ACCESS_KEY": "s",
        "DB_PASSWORD": "p",
        "WANDB_API_KEY": "k",
    }
    assert filter_env(env) == {"PATH": "/bin"}
    assert filter_env(env, keep=["WANDB_API_KEY"]) == {"PATH": "/bin", "WANDB_API_KEY": "k"}
    h = reg.Home(str(tmp_path / "h")).ensure()
    reg.save_spec(h, JobSpec(**spec_dict(owner_uid=os.getuid(), env=filter_env(env))))
    reg.save_state(h, JobState(name="j"))
    for leaf in ("job.json", "state.json"):
        assert os.stat(h.job_file("j", leaf)).st_mode & 0o777 == 0o600


def test_guardian_run_filters_env_keeps_named_and_creates_the_run_dir_parent(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from guardian.cli import main

    monkeypatch.setenv("MY_TOKEN", "secret")
    monkeypatch.setenv("KEEP_KEY", "wanted")
    h, run = str(tmp_path / "h"), tmp_path / "deep" / "er" / "run"
    r = CliRunner().invoke(
        main, ["run", "--home", h, "--name", "x", "--dir", str(run), "--env", "KEEP_KEY", "--", "true"]
    )
    assert r.exit_code == 0, r.output
    env = reg.load_spec(reg.Home(h), "x").env
    assert "MY_TOKEN" not in env and env["KEEP_KEY"] == "wanted"
    assert run.parent.is_dir()


# ---------------------------------------------------------------------------- policy


def facts(**kw):
    return policy.ExitFacts(
        **{**dict(exit_code=1, signal=None, run_state=None, error_type=None, made_progress=False), **kw}
    )


def test_command_not_found_is_held_not_retried():
    for kw in (dict(exit_code=127), dict(exit_code=126), dict(exit_code=127, spawn_error="No such file")):
        v = policy.classify(facts(**kw))
        assert v.classification == "unrunnable" and not v.uses_budget and "--replace" in v.reason


def test_requeues_back_off_after_the_first_and_are_capped():
    assert policy.requeue_delay(1, K) == 0.0
    assert [policy.requeue_delay(n, K) for n in (2, 3, 4)] == [10.0, 20.0, 40.0]
    assert policy.requeue_limit_reason(4, K) is None
    assert "5 requeues" in policy.requeue_limit_reason(5, K)


def test_hang_limit_counts_hangs_not_heartbeat_steps():
    assert policy.hang_limit_reason(1) is None
    assert "hung 2 times" in policy.hang_limit_reason(2)


# ---------------------------------------------------------------------------- wake-ups


@pytest.mark.parametrize(
    ("event", "is_dir", "src", "dest", "wake"),
    [
        ("opened", False, "/run/heartbeat.json", None, False),  # the daemon's own read
        ("closed_no_write", False, "/run/heartbeat.json", None, False),
        ("modified", False, "/h/jobs/j/state.json", None, False),  # the daemon's own write
        ("moved", False, "/h/jobs/j/state.json.1.ab.tmp", "/h/jobs/j/state.json", False),
        ("modified", False, "/h/jobs/j/events.jsonl", None, False),
        ("moved", False, "/h/jobs/j/job.json.1.ab.tmp", "/h/jobs/j/job.json", True),  # guardian run
        ("moved", False, "/h/jobs/j/stop.request.1.tmp", "/h/jobs/j/stop.request", True),  # guardian stop
        ("created", True, "/h/jobs/new", None, True),
    ],
)
def test_only_user_requests_wake_the_loop(event, is_dir, src, dest, wake):
    assert wants_wake(event, is_dir, src, dest) is wake


def test_shim_reports_a_missing_command_as_127(tmp_path):
    adir = tmp_path / "a"
    adir.mkdir()
    p = procs.spawn_shim(str(adir), ["/nonexistent/command"], str(tmp_path), dict(os.environ))
    assert p.wait(timeout=60) == 127
    rec = read_json_object(str(adir / "exit.json"), 1 << 16)
    assert rec["returncode"] == 127 and "No such file" in rec["spawn_error"]


def test_replace_sets_an_unreadable_state_aside_and_starts_afresh(tmp_path):
    from click.testing import CliRunner

    from guardian.cli import main

    h = str(tmp_path / "h")
    assert CliRunner().invoke(main, ["run", "--home", h, "--name", "x", "--", "true"]).exit_code == 0
    path = reg.Home(h).job_file("x", "state.json")
    with open(path, "w") as f:
        f.write("{garbage")
    r = CliRunner().invoke(main, ["run", "--home", h, "--name", "x", "--replace", "--", "true"])
    assert r.exit_code == 0, r.output
    assert not os.path.exists(path)
    assert any(n.startswith("state.json.unreadable-") for n in os.listdir(os.path.dirname(path)))
