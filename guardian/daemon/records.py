"""The daemon's records — a job's definition, its state, its attempts — and their checks.

Each record is a dataclass written as one JSON object. Reading one back is strict:
an unknown key (a file from another guardian version, a hand edit), a missing
required key or a value of the wrong type is a ``BadFileError`` naming the key, never
a ``TypeError`` from deep inside the loop. The caller holds that one job.
"""

from __future__ import annotations

import re
import time
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from .safefiles import BadFileError

JOB_FORMAT = "guardian.job/1"
STATE_FORMAT = "guardian.jobstate/1"

# Job states. Terminal ones are never left by the daemon on its own.
PENDING, RUNNING, BACKOFF, STOPPING = "pending", "running", "backoff", "stopping"
DONE, FAILED, STOPPED, INCOMPLETE, HELD = "done", "failed", "stopped", "incomplete", "held"
TERMINAL = (DONE, FAILED, STOPPED, INCOMPLETE)
STATES = (PENDING, RUNNING, BACKOFF, STOPPING, *TERMINAL, HELD)

# Environment variables whose names look like credentials are not stored in job.json
# unless the user names them (``guardian run --env NAME``).
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|KEY|CREDENTIAL", re.IGNORECASE)


@dataclass
class JobSpec:
    """What the owner registered. The daemon runs exactly this and nothing else.

    ``argv`` is a list of strings, executed without a shell. A string is refused, never
    split: to run a shell line, register ``["sh", "-c", "LINE"]``.
    """

    name: str
    argv: list[str]
    cwd: str
    run_dir: str
    env: dict[str, str]
    owner_uid: int
    created: float = field(default_factory=time.time)
    format: str = JOB_FORMAT
    nproc: int | None = None  # ranks under torchrun (``--nproc-per-node``); argv is then the launcher
    gpus: int | None = None  # whole devices to allocate (CUDA_VISIBLE_DEVICES); None: not managed
    cpu_only: bool = False  # run with CUDA_VISIBLE_DEVICES="" (sees no GPU at all)
    priority: int = 0  # higher starts first; equal priorities start in registration order
    notify: str | None = None  # a command given each event as JSON on stdin (``--notify``)
    webhook: str | None = None  # a URL each event is POSTed to as JSON (``--webhook``)
    adopt: dict | None = None  # {pid, create_time}: a hand-started process to watch, not start

    @classmethod
    def from_dict(cls, d: dict[str, Any], what: str) -> JobSpec:
        check_fields(cls, d, what)
        if d.get("format") not in (None, JOB_FORMAT):
            raise BadFileError(f"{what}: format {d['format']!r}, expected {JOB_FORMAT}")
        if not d["argv"]:
            raise BadFileError(f"{what}: argv is empty; give the command as a list of strings")
        return cls(**d)


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
    devices: list[str] = field(default_factory=list)  # allocated to it (CUDA_VISIBLE_DEVICES)
    lost: str | None = None  # why its devices vanished: the job is held when the attempt ends


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
    hang_steps: list[int] = field(default_factory=list)  # evidence: where each hang was seen
    hangs: int = 0  # hangs since the last new valid checkpoint
    requeues: int = 0  # exit-75 requeues in a row since the last new valid checkpoint
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
    def latest(self) -> Attempt:
        """The current attempt, for code that only runs once the job has one.

        Why apart from ``current``: most of the daemon handles a job only while an attempt
        exists; this states that and fails with a clear message (a daemon bug) instead
        of an ``AttributeError`` on ``None``.
        """
        if not self.attempts:
            raise RuntimeError(f"job {self.name!r} has no attempt yet; this is a guardian daemon bug")
        return self.attempts[-1]

    @property
    def started(self) -> int:
        """Attempts started so far. Old attempt records are pruned, so not ``len(attempts)``."""
        return self.attempts[-1].n if self.attempts else 0

    @property
    def restarts(self) -> int:
        return max(0, self.started - 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], what: str = "state.json") -> JobState:
        check_fields(cls, d, what)
        if d.get("format") not in (None, STATE_FORMAT):
            raise BadFileError(f"{what}: format {d['format']!r}, expected {STATE_FORMAT}")
        if d.get("state", PENDING) not in STATES:
            raise BadFileError(f"{what}: unknown job state {d['state']!r}")
        attempts = d.get("attempts", [])
        for i, a in enumerate(attempts):
            if not isinstance(a, dict):
                raise BadFileError(f"{what}: attempts[{i}] is not an object")
            check_fields(Attempt, a, f"{what}: attempts[{i}]")
        return cls(**{**d, "attempts": [Attempt(**a) for a in attempts]})


def filter_env(env: dict[str, str], keep: typing.Iterable[str] = ()) -> dict[str, str]:
    """The environment to store for a job: without variables that look like secrets.

    Why: job.json is a file on disk that outlives the shell; a token in it is a token
    leaked. Names in ``keep`` (the user asked for them) are stored anyway.
    """
    wanted = set(keep)
    return {k: v for k, v in env.items() if k in wanted or not SECRET_NAME.search(k)}


# ---------------------------------------------------------------------------- validation


def check_fields(cls: type, d: dict[str, Any], what: str) -> None:
    """Raise ``BadFileError`` for unknown keys, missing required keys or wrong types."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise BadFileError(
            f"{what}: unknown key(s) {', '.join(map(repr, unknown))} (written by another guardian "
            "version, or edited by hand?); move the file aside or re-register the job with --replace"
        )
    for name, f in known.items():
        if name not in d:
            if f.default is MISSING and f.default_factory is MISSING:
                raise BadFileError(f"{what}: required key {name!r} is missing")
            continue
        if not _conforms(d[name], hints[name]):
            raise BadFileError(
                f"{what}: {name!r} is {_describe(d[name])}, expected {_type_name(hints[name])}"
            )


def _conforms(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            return False
        return not args or all(_conforms(k, args[0]) and _conforms(v, args[1]) for k, v in value.items())
    if origin is list:
        return isinstance(value, list) and all(_conforms(v, args[0]) for v in value)
    return isinstance(value, dict)  # nested records (attempts) are checked by their own class


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'…' if len(text) > 40 else ''}"


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
