"""Global assignment: which source goes with which target when many could.

``assign`` solves the maximum-score matching with the Hungarian algorithm, so a
pairing is chosen for the whole set at once rather than greedily (greedy matching
lets one early, slightly better pair push every later one onto a wrong partner).
"""

from __future__ import annotations

from collections.abc import Sequence

INCOMPATIBLE = 1e9


def assign(scores: Sequence[Sequence[float | None]]) -> list[tuple[int, int]]:
    """Maximum-score matching (None = not allowed), solved globally. A score matrix
    without any None (a ``list[list[float]]``) is accepted as it is."""
    if not scores or not scores[0]:
        return []
    cost = [[INCOMPATIBLE if v is None else 1.0 - v for v in row] for row in scores]
    pairs = hungarian(cost)
    return [(i, j) for i, j in pairs if scores[i][j] is not None]


def hungarian(cost: list[list[float]]) -> list[tuple[int, int]]:
    """Minimum-cost assignment on a rectangular matrix (Kuhn–Munkres with potentials,
    O(n²m)); returns (row, col) pairs for min(n, m) rows/cols."""
    n, m = len(cost), len(cost[0])
    if n > m:
        return [(i, j) for j, i in hungarian([list(col) for col in zip(*cost, strict=False)])]
    inf = float("inf")
    u, v, p, way = [0.0] * (n + 1), [0.0] * (m + 1), [0] * (m + 1), [0] * (m + 1)
    for i in range(1, n + 1):
        p[0], j0 = i, 0
        minv, used = [inf] * (m + 1), [False] * (m + 1)
        while True:
            used[j0] = True
            i0, delta, j1 = p[j0], inf, 0
            row = cost[i0 - 1]
            for j in range(1, m + 1):
                if not used[j]:
                    cur = row[j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(m + 1):
                if used[j]:
                    u[p[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    return sorted((p[j] - 1, j - 1) for j in range(1, m + 1) if p[j])
