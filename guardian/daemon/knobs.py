"""Every tunable of the daemon, with its environment override, in one place.

Precedence: a flag on ``guardian watch`` > ``GUARDIAN_DAEMON_*`` env var > default.
Defaults are for real training (minutes-long timeouts); tests shrink them to run
in seconds, which is why every timing lives here and not in the code that uses it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "GUARDIAN_DAEMON_"


@dataclass
class Knobs:
    poll: float = 1.0  # seconds between checks (watchdog events wake the loop earlier)
    backoff_base: float = 10.0  # first restart delay; doubled per failure without progress
    backoff_max: float = 600.0
    backoff_jitter: float = 0.25  # ± fraction, so a fleet of jobs does not restart in lockstep
    max_failures: int = 3  # failures without a newer valid checkpoint before giving up
    thrash_count: int = 4  # this many failures ...
    thrash_window: float = 600.0  # ... within this many seconds → give up
    max_requeues: int = 20  # exit-75 requeues in a row without a newer checkpoint before giving up
    max_restarts: int = 100  # hard cap on attempts of one job, whatever the reason
    hang_min: float = 300.0  # a training heartbeat is never "late" before this
    hang_factor: float = 5.0  # ... nor before this × the p99 step interval
    startup: float = 900.0  # allowance before the first heartbeat (imports, data, CUDA init)
    save_timeout: float = 1800.0  # allowance while the job is saving, loading or evaluating
    stop_grace: float = 120.0  # after SIGUSR2: time to reach a step boundary and save
    kill_grace: float = 10.0  # after SIGTERM: before SIGKILL of the whole tree
    stack_dump_wait: float = 2.0  # after SIGTTIN: time for faulthandler to write
    gpu_release_timeout: float = 120.0  # wait for a dead job's GPU memory to be freed
    disk_factor: float = 2.0  # free disk must exceed this × the last checkpoint's size
    gate_retry: float = 30.0  # re-check a failed restart gate (disk, GPU) this often
    stderr_tail_lines: int = 20
    devices: str = ""  # the GPU inventory as a list ("0,1" or UUIDs); empty: NVML, else CUDA_VISIBLE_DEVICES
    max_concurrent: int = 0  # jobs running at once (0: no limit besides devices)
    keep_attempts: int = 10  # attempt directories kept besides the first and the latest failure
    log_max_bytes: int = 64 << 20  # an attempt log or events.jsonl larger than this is rotated
    notify: str = ""  # a command for every job's events (JSON on stdin), besides the job's own
    webhook: str = ""  # a URL for every job's events, besides the job's own
    notify_interval: float = 60.0  # at most one notification per job and event kind this often
    notify_timeout: float = 10.0  # a notifier running longer is killed (it never stalls the daemon)
    extra: dict[str, Any] = field(default_factory=dict)


def _coerce(kind: type, raw: str, name: str) -> Any:
    try:
        return kind(raw)
    except ValueError as e:
        raise ValueError(f"{name}={raw!r}: expected a {kind.__name__}") from e


def load(overrides: dict[str, Any] | None = None, env: Mapping[str, str] | None = None) -> Knobs:
    """Defaults, then ``GUARDIAN_DAEMON_<NAME>`` env vars, then non-None ``overrides``."""
    env = os.environ if env is None else env
    knobs = Knobs()
    for f in dataclasses.fields(Knobs):
        if f.name == "extra":
            continue
        name = ENV_PREFIX + f.name.upper()
        if name in env:
            setattr(knobs, f.name, _coerce(type(getattr(knobs, f.name)), env[name], name))
    for key, value in (overrides or {}).items():
        if value is not None:
            setattr(knobs, key, value)
    return knobs


def default_home(env: Mapping[str, str] | None = None) -> str:
    """``GUARDIAN_HOME``, else ``$XDG_STATE_HOME/guardian``, else ``~/.local/state/guardian``.

    Root's default is /var/lib/guardian, the conventional place for a system service.
    """
    env = os.environ if env is None else env
    if env.get("GUARDIAN_HOME"):
        return os.path.abspath(env["GUARDIAN_HOME"])
    if os.getuid() == 0 and not env.get("XDG_STATE_HOME"):
        return "/var/lib/guardian"
    base = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "guardian")
