"""How a job is going, in words a person reads at a glance: ages, rates, progress, ETA.

Pure functions over ``guardian status --json`` records, shared by ``guardian status``
and ``guardian top``. Nothing here reads files or the clock except through arguments.

Progress and ETA need the loop's length: they appear when the heartbeat carries
``steps_total`` (or ``epochs_total``); steps/s is measured between the newest
checkpoint (its step and commit time) and the latest heartbeat.
"""

from __future__ import annotations

from typing import Any

ACTIVE = ("running", "stopping", "pending", "backoff")


def human_age(seconds: float | None) -> str:
    """42s, 3m12s, 2h05m, 3d04h; "-" when unknown."""
    if seconds is None or seconds != seconds:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def rate(step: Any, beat_time: Any, ck_step: Any, ck_time: Any) -> float | None:
    """Steps per second from the newest checkpoint to the latest heartbeat."""
    nums = (step, beat_time, ck_step, ck_time)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in nums):
        return None
    dt, ds = beat_time - ck_time, step - ck_step
    return ds / dt if dt > 0.5 and ds > 0 else None


def progress(hb: dict | None, steps_per_sec: float | None) -> tuple[float | None, float | None]:
    """(fraction done 0..1, ETA seconds) when the heartbeat knows the loop's length."""
    if not hb:
        return None, None
    step, total = _float(hb.get("step")), _float(hb.get("steps_total"))
    if step is not None and total:
        eta = (total - step) / steps_per_sec if steps_per_sec else None
        return min(1.0, step / total), eta
    epoch, epochs = _float(hb.get("epoch")), _float(hb.get("epochs_total"))
    if epoch is not None and epochs:
        return min(1.0, epoch / epochs), None
    return None, None


def _float(v: Any) -> float | None:
    """A positive-or-zero number from a heartbeat field, else None (hostile values ignored)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0:
        return float(v)
    return None


def fmt_progress(j: dict[str, Any]) -> str:
    frac = j.get("progress")
    return f"{100 * frac:.0f}%" if isinstance(frac, (int, float)) else "-"


def fmt_rate(j: dict[str, Any]) -> str:
    r = j.get("steps_per_sec")
    if not isinstance(r, (int, float)):
        return "-"
    return f"{r:.1f}/s" if r >= 1 else f"{60 * r:.1f}/m"


def short_state(j: dict[str, Any]) -> str:
    return str(j["state"])


COLUMNS = [
    # header, width, how to render; the last column (reason) takes what is left
    ("JOB", 14, lambda j: j["name"]),
    ("STATE", 10, short_state),
    ("TRY", 4, lambda j: str(j["attempts"])),
    ("EP", 4, lambda j: "-" if j.get("epoch") is None else str(j["epoch"])),
    ("STEP", 7, lambda j: "-" if j.get("step") is None else str(j["step"])),
    ("DONE", 5, fmt_progress),
    ("ETA", 7, lambda j: human_age(j.get("eta"))),
    ("RATE", 7, fmt_rate),
    ("CKPT", 6, lambda j: human_age(j.get("checkpoint_age"))),
    ("GPU", 5, lambda j: ",".join(j.get("devices") or []) or "-"),
]


def _cell(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def table(jobs: list[dict[str, Any]], width: int) -> list[str]:
    """One header and one line per job, each at most ``width`` columns; the reason
    fills what is left (at 80 columns every other column still fits)."""
    fixed = sum(w + 1 for _, w, _ in COLUMNS)
    rest = max(0, width - fixed)
    head = " ".join(f"{h:<{w}}" for h, w, _ in COLUMNS) + (" WHY" if rest >= 20 else "")
    lines = [head[:width]]
    for j in jobs:
        row = " ".join(f"{_cell(render(j), w):<{w}}" for _, w, render in COLUMNS)
        if rest >= 20:
            row += " " + _cell(str(j.get("reason") or ""), rest)
        lines.append(row[:width].rstrip())
    if rest < 20:  # narrow: the reasons of the jobs that are not simply running, below the table
        lines += [
            _cell(f"  {j['name']}: {j.get('reason') or ''}", width) for j in jobs if j["state"] != "running"
        ]
    return lines
