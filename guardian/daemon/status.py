"""What ``guardian status`` shows for one job, read from the daemon's files alone.

Works with or without a running daemon, and never blocks or fails on a bad file: a
job whose job.json or state.json cannot be used is shown ``held`` with the reason,
exactly as the daemon holds it; a hostile heartbeat leaves the heartbeat columns empty
and names the problem.
"""

from __future__ import annotations

import time
from typing import Any

from . import DaemonError, view
from . import progress as progress_mod
from . import registry as reg
from .records import JobSpec, JobState
from .safefiles import BadFileError, read_run_heartbeat


def job_summary(h: reg.Home, name: str) -> dict[str, Any]:
    """One job as ``guardian status --json`` shows it."""
    spec, problem = _spec(h, name)
    try:
        st = reg.load_state(h, name) or JobState(name=name)
    except BadFileError as e:
        st, problem = JobState(name=name), problem or str(e)
    if problem:
        st.state, st.reason = reg.HELD, problem
    hb, hb_problem = _heartbeat(spec)
    cur = st.current
    running = cur if st.state in (reg.RUNNING, reg.STOPPING) else None
    beat_time = hb.get("time") if hb else None
    newest = progress_mod.newest_checked(spec.run_dir, deep=False) if spec else None
    now = time.time()
    speed = view.rate(hb and hb.get("step"), beat_time, newest and newest.mark[1], newest and newest.created)
    done, eta = view.progress(hb if running else None, speed)
    return {
        "name": name,
        "state": st.state,
        "reason": st.reason,
        "attempts": st.started,
        "restarts": st.restarts,
        "failures_without_progress": st.failures,
        "pid": (running.child or {}).get("pid") if running else None,  # the job's, never the shim's
        "last_checkpoint": st.last_checkpoint,
        "resume_from": cur.resume_from if cur else None,
        "exit_code": cur.exit_code if cur else None,
        "signal": cur.signal if cur else None,
        "classification": cur.classification if cur else None,
        "heartbeat_age": round(time.time() - beat_time, 1) if isinstance(beat_time, (int, float)) else None,
        "heartbeat_problem": hb_problem,
        "step": hb.get("step") if hb else None,
        "epoch": hb.get("epoch") if hb else None,
        "steps_per_sec": round(speed, 3) if speed and running else None,
        "progress": done,
        "eta": eta,
        "checkpoint_age": round(now - newest.created, 1) if newest and newest.created else None,
        "phase": hb.get("phase") if hb else None,
        "gpus": cur.gpus if cur else [],
        "devices": running.devices if running else [],  # allocated (CUDA_VISIBLE_DEVICES)
        "wants_gpus": spec.gpus if spec else None,
        "priority": spec.priority if spec else 0,
        "next_start_at": st.next_start_at,
        "stderr_tail": st.stderr_tail,
        "run_dir": spec.run_dir if spec else None,
        "argv": spec.argv if spec else None,
        "nproc": spec.nproc if spec else None,
    }


def _spec(h: reg.Home, name: str) -> tuple[JobSpec | None, str | None]:
    try:
        return reg.load_spec(h, name), None
    except FileNotFoundError:
        return None, None  # guardian run is still writing it
    except (DaemonError, OSError) as e:
        return None, str(e)


def _heartbeat(spec: JobSpec | None) -> tuple[dict | None, str | None]:
    if spec is None:
        return None, None
    try:
        return read_run_heartbeat(spec.run_dir), None
    except BadFileError as e:
        return None, str(e)
