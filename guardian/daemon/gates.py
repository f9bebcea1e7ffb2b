"""Gates: the conditions an attempt must meet before it starts.

Each gate returns None (go) or a human reason to wait. A gate that finds something
a wait cannot fix raises instead: ``BadFileError`` (a hostile run-directory file) or
returns through ``hold_reason`` — the supervisor then holds the job.
"""

from __future__ import annotations

import os

import psutil

from .gpu import Gpus
from .knobs import Knobs
from .progress import Newest
from .records import JobState
from .safefiles import check_run_dir, read_run_status


def hold_reason(run_dir: str, ours: list[dict]) -> str | None:
    """Why the job must be held rather than started into ``run_dir`` (None: it may start).

    Creates a missing run directory (and its parents); a failure to do so, hostile
    files in it, or another live trainer in it hold the job.
    """
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        missing = _missing_ancestor(run_dir)
        where = f"its parent {missing} does not exist and " if missing else ""
        return f"{run_dir}: {where}the run directory cannot be created ({e.strerror}); fix it, then `guardian run --replace`"
    check_run_dir(run_dir)
    return run_dir_owner(run_dir, ours)


def _missing_ancestor(path: str) -> str | None:
    parent = os.path.dirname(os.path.abspath(path))
    top = None
    while parent and not os.path.exists(parent):
        top, parent = parent, os.path.dirname(parent)
    return top


def run_dir_owner(run_dir: str, ours: list[dict]) -> str | None:
    """A reason to hold if run.json says another live process trains into ``run_dir``.

    The pid in run.json counts only if that process was created before run.json was
    last updated — a pid reused after a reboot is newer than the file.
    """
    status = read_run_status(run_dir)
    if not status or status.get("state") != "running" or not isinstance(status.get("pid"), int):
        return None
    pid = status["pid"]
    if any(o.get("pid") == pid for o in ours):
        return None
    updated = status.get("updated")
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE or (
            isinstance(updated, (int, float)) and proc.create_time() > updated
        ):
            return None
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:
        pass
    return (
        f"{run_dir}: run.json says pid {pid} is training into this directory and that process is "
        "alive; not starting a second copy. Stop it, then `guardian run --replace`."
    )


def gpu_gate(st: JobState, gpus: Gpus, k: Knobs, now: float) -> str | None:
    """Wait (up to ``gpu_release_timeout``) for the previous attempt's GPU memory to be freed."""
    cur = st.current
    if not cur or not cur.gpus:
        return None
    prev = {cur.child["pid"]} if cur.child else set()
    waited = now - (st.gate or {}).get("since", now)
    if gpus.usage(prev) and waited < k.gpu_release_timeout:
        return f"GPU memory of attempt {cur.n} not yet released"
    return None


def disk_gate(run_dir: str, newest: Newest | None, factor: float) -> str | None:
    """Refuse to start when the next save cannot fit or the run dir is not writable."""
    if not os.access(run_dir, os.W_OK):
        return f"{run_dir}: not writable by uid {os.getuid()}"
    if newest is None:
        return None
    try:
        st = os.statvfs(run_dir)
    except OSError:
        return None
    free, need = st.f_bavail * st.f_frsize, int(factor * newest.bytes)
    if st.f_blocks and free < need:  # f_blocks 0: a file system that reports nothing
        return f"{run_dir}: {free} bytes free, need {need} ({factor:g} × the last checkpoint)"
    return None
