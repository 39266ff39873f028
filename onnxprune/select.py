"""Select stage: which channels of each group to remove, from scores and a budget."""

from __future__ import annotations

import math

import numpy as np

from .groups import Group


def _keep_count(n: int, n_remove: int, min_keep: int, round_to: int) -> int:
    keep = max(n - n_remove, min(n, max(1, min_keep)))
    if round_to > 1:
        keep = min(n, int(math.ceil(keep / round_to) * round_to))
    return keep


def select(
    groups: list[Group],
    scores: dict[int, np.ndarray],
    ratio: float,
    *,
    global_: bool = False,
    min_keep: int = 1,
    round_to: int = 1,
) -> dict[int, np.ndarray]:
    """Group id -> class roots to remove.

    ``ratio`` is the share of each group's channels to remove; with ``global_`` the
    scores are standardised per group and one threshold removes ``ratio`` of all
    removable channels, so groups lose different shares.  Every group keeps at least
    ``max(1, min_keep)`` channels, and kept counts are rounded up to ``round_to``.
    Ties go to the lower index so results are deterministic.
    """
    todo = [g for g in groups if g.prunable and g.id in scores]
    want: dict[int, int] = {}
    if global_:
        entries = []
        for g in todo:
            s = scores[g.id].astype(np.float64)
            std = s.std()
            z = (s - s.mean()) / std if std > 0 else np.zeros_like(s)
            entries.extend((float(z[i]), g.id, i) for i in range(len(s)))
        entries.sort()
        n_total = int(math.floor(ratio * len(entries)))
        for _, gid, _ in entries[:n_total]:
            want[gid] = want.get(gid, 0) + 1
    else:
        want = {g.id: int(math.floor(ratio * len(g.classes))) for g in todo}

    removed: dict[int, np.ndarray] = {}
    for g in todo:
        n = len(g.classes)
        keep = _keep_count(n, want.get(g.id, 0), min_keep, round_to)
        order = np.argsort(scores[g.id], kind="stable")
        removed[g.id] = np.sort(g.classes[order[: n - keep]])
    return removed
