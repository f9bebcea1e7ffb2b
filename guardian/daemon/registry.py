"""The daemon's durable state: a private directory of small JSON files.

    HOME/                      0700, owned by the daemon's user
      daemon.json              the running daemon's identity (pid, create time, boot id)
      daemon.lock              flock held by the one daemon using HOME
      daemon.log               the human log
      jobs/NAME/
        job.json               the definition, written once by ``guardian run`` (argv, cwd, env, run dir)
        state.json             everything the daemon decided; only the daemon writes it
        events.jsonl           one JSON record per decision, with its reason; append-only
        stop.request           ``guardian stop`` asks; the daemon acts and removes it
        attempts/0001/         per attempt: shim.json, child.json, exit.json, stdout.log, stderr.log
        latest -> attempts/NNNN

Every JSON file is replaced atomically (tmp + fsync + rename + dir fsync, via
``guardian.smallfiles.write_small_file_atomically``), so a power cut leaves either the
old or the new record, never half of one. JSON (not SQLite) because each file has a
single writer and people read these files when things go wrong.
"""

from __future__ import annotations

import os
import re
import stat
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import GuardianError
from ..format import strictjson
from ..smallfiles import write_small_file_atomically
from . import DaemonError, UnsafeJobError

JOB_FORMAT = "guardian.job/1"
STATE_FORMAT = "guardian.jobstate/1"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# Job states. Terminal ones are never left by the daemon on its own.
PENDING, RUNNING, BACKOFF, STOPPING = "pending", "running", "backoff", "stopping"
DONE, FAILED, STOPPED, INCOMPLETE, HELD = "done", "failed", "stopped", "incomplete", "held"
TERMINAL = (DONE, FAILED, STOPPED, INCOMPLETE)


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise DaemonError(
            f"job name {name!r}: use 1-64 letters, digits, '.', '_' or '-' (it becomes a directory name)"
        )
    return name


@dataclass
class JobSpec:
    """What the owner registered. The daemon runs exactly this and nothing else."""

    name: str
    argv: list[str]
    cwd: str
    run_dir: str
    env: dict[str, str]
    owner_uid: int
    created: float = field(default_factory=time.time)
    format: str = JOB_FORMAT
    nproc: int | None = None  # ranks under torchrun (``--nproc-per-node``); argv is then the launcher


@dataclass
class Attempt:
    n: int
    boot_id: str
    started: float
    resume_from: str | None = None  # the checkpoint the library will load (newest valid)
    resume_override: str | None = None  # set when the daemon forced GUARDIAN_RESUME_FROM
    shim: dict | None = None  # {pid, create_time}
    child: dict | None = None
    sid: int | None = None
    ended: float | None = None
    exit_code: int | None = None
    signal: str | None = None
    classification: str | None = None
    reason: str | None = None
    last_step: int | None = None
    newest_checkpoint: str | None = None
    gpus: list[str] = field(default_factory=list)
    adopted: bool = False


@dataclass
class JobState:
    name: str
    state: str = PENDING
    reason: str = "registered"
    attempts: list[Attempt] = field(default_factory=list)
    failures: int = 0  # failures since the last new valid checkpoint
    failure_times: list[float] = field(default_factory=list)
    progress_mark: list[int] | None = None  # (seq, step) of the newest valid checkpoint seen
    last_checkpoint: str | None = None
    next_start_at: float | None = None
    resume_override: str | None = None
    stepped_back: bool = False
    hang_steps: list[int] = field(default_factory=list)
    stderr_tail: list[str] = field(default_factory=list)
    stop: dict | None = None  # {"why": "request"|"hang", "stage": "usr2"|"term"|"kill", "deadline": t}
    gate: dict | None = None  # the restart gate that is holding us back, and since when
    events: int = 0
    spec_created: float = 0.0  # job.json's "created": a newer one (guardian run --replace) resets the job
    format: str = STATE_FORMAT

    @property
    def current(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None

    @property
    def restarts(self) -> int:
        return max(0, len(self.attempts) - 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobState:
        d = dict(d)
        d["attempts"] = [Attempt(**a) for a in d.get("attempts", [])]
        return cls(**d)


class Home:
    """Paths inside the daemon's state directory, and the checks that keep it private."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.jobs = os.path.join(self.root, "jobs")

    def ensure(self) -> Home:
        """Create HOME and HOME/jobs as 0700; refuse a HOME someone else controls."""
        for d in (self.root, self.jobs):
            os.makedirs(d, mode=0o700, exist_ok=True)
            st = os.lstat(d)
            if stat.S_ISLNK(st.st_mode) or st.st_uid != os.getuid():
                raise DaemonError(f"{d}: not a directory owned by uid {os.getuid()}; choose another --home")
            if stat.S_IMODE(st.st_mode) != 0o700:
                os.chmod(d, 0o700)
        return self

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def job_dir(self, name: str) -> str:
        return os.path.join(self.jobs, check_name(name))

    def job_file(self, name: str, leaf: str) -> str:
        return os.path.join(self.job_dir(name), leaf)

    def attempt_dir(self, name: str, n: int) -> str:
        return os.path.join(self.job_dir(name), "attempts", f"{n:04d}")

    def job_names(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.jobs) if NAME_RE.match(n))
        except FileNotFoundError:
            return []


# ---------------------------------------------------------------------------- JSON files


def write_json(path: str, record: dict[str, Any]) -> None:
    write_small_file_atomically(path, strictjson.dumps_pretty(record))


def read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            obj = strictjson.loads(f.read(), what=path)
    except FileNotFoundError:
        return None
    except GuardianError as e:
        raise DaemonError(f"{path}: unreadable ({e}); move it aside to continue") from e
    return obj if isinstance(obj, dict) else None


def check_owned(path: str) -> None:
    """Refuse files that anyone but us could have written (or swapped via a symlink)."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeJobError(f"{path}: is a symlink; job files must be regular files")
    if st.st_uid != os.getuid():
        raise UnsafeJobError(f"{path}: owned by uid {st.st_uid}, not by the daemon's uid {os.getuid()}")
    if st.st_mode & 0o022:
        raise UnsafeJobError(
            f"{path}: writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
            "refusing to run a command others could have changed"
        )


def save_spec(home: Home, spec: JobSpec) -> None:
    d = home.job_dir(spec.name)
    for sub in (d, os.path.join(d, "attempts")):
        os.makedirs(sub, mode=0o700, exist_ok=True)
    write_json(os.path.join(d, "job.json"), asdict(spec))


def load_spec(home: Home, name: str) -> JobSpec:
    """The job's definition, after checking that only the daemon's owner could write it."""
    d = home.job_dir(name)
    path = os.path.join(d, "job.json")
    check_owned(d)
    check_owned(path)
    raw = read_json(path)
    if raw is None or raw.get("format") != JOB_FORMAT:
        raise DaemonError(f"{path}: not a {JOB_FORMAT} job definition")
    if raw.get("owner_uid") != os.getuid():
        raise UnsafeJobError(f"{path}: registered by uid {raw.get('owner_uid')}, not {os.getuid()}")
    return JobSpec(**raw)


def save_state(home: Home, st: JobState) -> None:
    write_json(home.job_file(st.name, "state.json"), st.to_dict())


def load_state(home: Home, name: str) -> JobState | None:
    raw = read_json(home.job_file(name, "state.json"))
    return JobState.from_dict(raw) if raw else None


def append_event(home: Home, name: str, event: str, reason: str, **evidence: Any) -> dict[str, Any]:
    """One line per decision. O_APPEND + a single write keeps lines whole."""
    record = {"time": time.time(), "job": name, "event": event, "reason": reason, **evidence}
    line = strictjson.dumps(record) + b"\n"
    fd = os.open(
        home.job_file(name, "events.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
    )
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    return record


def read_events(home: Home, name: str) -> list[dict[str, Any]]:
    out = []
    try:
        with open(home.job_file(name, "events.jsonl"), "rb") as f:
            for line in f:
                try:
                    out.append(strictjson.loads(line, what="events.jsonl"))
                except GuardianError:
                    continue  # a torn last line after a power cut
    except FileNotFoundError:
        pass
    return out


def point_latest(home: Home, name: str, n: int) -> None:
    """Atomically repoint ``latest`` at attempt ``n`` (symlink to tmp name, then rename)."""
    link = home.job_file(name, "latest")
    tmp = f"{link}.tmp{os.getpid()}"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    os.symlink(os.path.join("attempts", f"{n:04d}"), tmp)
    os.replace(tmp, link)
