"""Curves of a run's history as a PNG (``guardian plot``; needs matplotlib).

One panel per metric against the step, sharing the x-axis. On every panel:
checkpoints as small triangles along the x-axis, the best checkpoint as a gold line
(and a star on the monitored metric's curve), and each restart as a red dashed line —
the step the run went back to after a crash.
"""

from __future__ import annotations

import math
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, and never a GUI toolkit import

import matplotlib.pyplot as plt  # noqa: E402

from .csvfile import HistoryTable  # noqa: E402

_MANY_POINTS = 60  # above this, a curve is drawn without point markers


def draw(
    table: HistoryTable, metrics: list[str], events: list[dict[str, Any]], *, title: str, output: str
) -> None:
    checkpoints = [e for e in events if e.get("event") == "checkpoint"]
    restarts = [e for e in events if e.get("event") == "restart"]
    best = next((e for e in reversed(checkpoints) if "best" in (e.get("reasons") or [])), None)
    fig, axes = plt.subplots(
        len(metrics), 1, sharex=True, figsize=(10, 1.2 + 2.6 * len(metrics)), squeeze=False
    )
    for ax, metric in zip(axes[:, 0], metrics):
        steps, values = _series(table, metric)
        style = "-" if len(steps) > _MANY_POINTS else "-o"
        ax.plot(steps, values, style, markersize=3.5, linewidth=1.4, color="tab:blue", label=metric)
        ax.set_ylabel(_short(metric))
        ax.grid(True, alpha=0.3)
        _mark_checkpoints(ax, checkpoints)
        _mark_best(ax, best, metric)
        for i, r in enumerate(restarts):
            ax.axvline(
                r["step"],
                color="tab:red",
                linestyle="--",
                linewidth=1.2,
                label="restart (resumed here)" if i == 0 else None,
            )
        ax.legend(loc="best", fontsize="small", framealpha=0.85)
    axes[-1, 0].set_xlabel("step (optimizer steps)")
    fig.suptitle(f"{title}: metric history", fontsize="large")
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)


def _series(table: HistoryTable, metric: str) -> tuple[list[int], list[float]]:
    """NaN and inf become gaps in the curve (rather than wreck the y-scale)."""
    pairs = [(r.step, r.values[metric]) for r in table.rows if metric in r.values]
    return [s for s, _ in pairs], [v if math.isfinite(v) else math.nan for _, v in pairs]


def _mark_checkpoints(ax: Any, checkpoints: list[dict[str, Any]]) -> None:
    if not checkpoints:
        return
    steps = sorted({c["step"] for c in checkpoints})
    ax.plot(
        steps,
        [0.0] * len(steps),
        "^",
        transform=ax.get_xaxis_transform(),  # x in data, y in axes: along the x-axis
        color="dimgray",
        markersize=7,
        clip_on=False,
        label="checkpoint",
    )


def _mark_best(ax: Any, best: dict[str, Any] | None, metric: str) -> None:
    if best is None:
        return
    label = f"best checkpoint ({best.get('checkpoint', '?')})"
    ax.axvline(best["step"], color="goldenrod", linewidth=1.6, alpha=0.9, label=label)
    value = (best.get("metrics") or {}).get(metric)
    if best.get("monitor") == metric and isinstance(value, (int, float)) and math.isfinite(value):
        ax.plot(
            [best["step"]], [value], "*", color="goldenrod", markersize=15, markeredgecolor="black", zorder=5
        )


def _short(name: str, limit: int = 28) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"
