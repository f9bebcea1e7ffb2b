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
from dataclasses import asdict
from typing import Any

from ..errors import GuardianError
from ..format import strictjson
from ..smallfiles import write_small_file_atomically
from . import DaemonError, UnsafeJobError
from .records import (  # noqa: F401  (re-exported: the registry's vocabulary)
    BACKOFF,
    DONE,
    FAILED,
    HELD,
    INCOMPLETE,
    JOB_FORMAT,
    PENDING,
    RUNNING,
    STATE_FORMAT,
    STOPPED,
    STOPPING,
    TERMINAL,
    Attempt,
    JobSpec,
    JobState,
)
from .safefiles import JOB_FILE_LIMIT, STATE_FILE_LIMIT, BadFileError, read_json_object, read_tail

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
EVENTS_LIMIT = 64 << 20  # ``guardian logs --events`` reads at most this much


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise DaemonError(
            f"job name {name!r}: use 1-64 letters, digits, '.', '_' or '-' (it becomes a directory name)"
        )
    return name


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
    """Atomically, at mode 0600: job files hold a command line and an environment."""
    write_small_file_atomically(path, strictjson.dumps_pretty(record), mode=0o600)


def read_json(path: str, limit: int = JOB_FILE_LIMIT) -> dict[str, Any] | None:
    """A daemon-side JSON object, or None if absent; ``BadFileError`` if unusable."""
    return read_json_object(path, limit)


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
    if isinstance(spec.argv, str):
        raise DaemonError("argv must be a list of strings; to run a shell line use ['sh', '-c', LINE]")
    d = home.job_dir(spec.name)
    for sub in (d, os.path.join(d, "attempts")):
        os.makedirs(sub, mode=0o700, exist_ok=True)
    write_json(os.path.join(d, "job.json"), asdict(spec))


def load_spec(home: Home, name: str) -> JobSpec:
    """The job's definition, after checking that only the daemon's owner could write it.

    Raises ``UnsafeJobError`` (someone else could have written it), ``BadFileError``
    (unreadable, hostile or invalid) or ``FileNotFoundError`` (not registered yet).
    """
    d = home.job_dir(name)
    path = os.path.join(d, "job.json")
    check_owned(d)
    raw = read_json(path)
    if raw is None:
        raise FileNotFoundError(path)
    check_owned(path)
    spec = JobSpec.from_dict(raw, path)
    if spec.owner_uid != os.getuid():
        raise UnsafeJobError(f"{path}: registered by uid {spec.owner_uid}, not {os.getuid()}")
    return spec


def save_state(home: Home, st: JobState) -> None:
    write_json(home.job_file(st.name, "state.json"), st.to_dict())


def load_state(home: Home, name: str) -> JobState | None:
    """The job's state, None if it has none yet; ``BadFileError`` if it is unusable.

    A state.json that exists but is not a valid state is never "absent": treating it so
    could run a finished job again.
    """
    path = home.job_file(name, "state.json")
    raw = read_json(path, STATE_FILE_LIMIT)
    return None if raw is None else JobState.from_dict(raw, path)


def append_event(home: Home, name: str, event: str, reason: str, **evidence: Any) -> dict[str, Any]:
    """One line per decision. O_APPEND + a single write keeps lines whole.

    O_NONBLOCK|O_NOFOLLOW and an fstat: a FIFO or symlink named events.jsonl must not
    block the daemon or redirect its writes (``BadFileError`` instead).
    """
    record = {"time": time.time(), "job": name, "event": event, "reason": reason, **evidence}
    line = strictjson.dumps(record) + b"\n"
    path = home.job_file(name, "events.jsonl")
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        raise BadFileError(f"{path}: cannot append ({e.strerror}); it must be a regular file") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BadFileError(f"{path}: not a regular file; remove it")
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    return record


def read_events(home: Home, name: str) -> list[dict[str, Any]]:
    try:
        data = read_tail(home.job_file(name, "events.jsonl"), EVENTS_LIMIT)
    except BadFileError:
        return []
    out = []
    for line in data.splitlines():
        try:
            rec = strictjson.loads(line, what="events.jsonl")
        except GuardianError:
            continue  # a torn last line after a power cut
        if isinstance(rec, dict):
            out.append(rec)
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
