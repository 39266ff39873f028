"""Select stage: which channels of each group to remove, from scores and a budget."""

from __future__ import annotations

import math

import numpy as np

from .chunks import ChunkGuard
from .groups import Group

# Kept Conv widths keep the alignment they had, up to 16: onnxruntime's CPU Convs run in
# its blocked NCHWc layout only when channel counts are multiples of the block (8 with
# AVX2, 16 with AVX-512), and a pruned Conv that falls out of it runs slower than the
# unpruned one (benchmarks/RESULTS.md, latency).  GPU tensor cores like the same multiples.
CONV_ALIGN = (16, 8)


def round_for(group: Group, round_to: int | None) -> int:
    """The multiple kept counts of ``group`` are rounded to: ``round_to`` when given, else
    (automatic) for a group that a Conv produces or reads, the largest of
    :data:`CONV_ALIGN` that divides its width and leaves a step to prune (width ≥ 2× it),
    and 1 for the rest (Gemm/MatMul kernels take any width; heads and MLP channels stay
    free)."""
    if round_to is not None:
        return round_to
    if not any(n.op_type in ("Conv", "ConvTranspose") for n in [*group.producers, *group.consumers]):
        return 1
    n = len(group.classes)
    return next((a for a in CONV_ALIGN if n % a == 0 and n >= 2 * a), 1)


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
    round_to: int | None = 1,
) -> dict[int, np.ndarray]:
    """Group id -> class roots to remove.

    ``ratio`` is the share of each group's channels to remove; with ``global_`` the
    scores are standardised per group and one threshold removes ``ratio`` of all
    removable channels, so groups lose different shares.  The counts then go through
    :func:`choose` (min-keep, rounding, dead channels, Split/Slice chunks).
    """
    todo = [g for g in groups if g.prunable and g.id in scores]
    want: dict[int, int] = {}
    if global_:
        entries = []
        for g in todo:
            s = scores[g.id].astype(np.float64)
            live = np.isfinite(s)  # dead channels score -inf and stay first
            z = np.full_like(s, -np.inf)
            if live.any():
                std = s[live].std()
                z[live] = (s[live] - s[live].mean()) / std if std > 0 else 0.0
            entries.extend((float(z[i]), g.id, i) for i in range(len(s)))
        entries.sort()
        n_total = int(math.floor(ratio * len(entries)))
        for _, gid, _ in entries[:n_total]:
            want[gid] = want.get(gid, 0) + 1
    else:
        want = {g.id: int(math.floor(ratio * len(g.classes))) for g in todo}
    return choose(todo, scores, want, min_keep=min_keep, round_to=round_to)


def choose(
    groups: list[Group],
    scores: dict[int, np.ndarray],
    want: dict[int, int],
    *,
    min_keep: int = 1,
    round_to: int | None = 1,
) -> dict[int, np.ndarray]:
    """Group id -> class roots to remove: about ``want[g.id]`` of the lowest-scored
    channels of each prunable group.  Every group keeps at least ``max(1, min_keep)``
    channels, and kept counts are rounded up to :func:`round_for` (``round_to=None``:
    automatic); channels dead on the calibration data (score -inf) are always removed; a
    channel is also kept when it is the last one of a Split output or channel Slice.  Ties
    go to the lower index so results are deterministic.
    """
    todo = [g for g in groups if g.prunable and g.id in scores]
    want = dict(want)
    for g in todo:  # channels dead on the calibration data are always removed
        want[g.id] = max(want.get(g.id, 0), int(np.isneginf(scores[g.id]).sum()))

    chunks = ChunkGuard(todo)  # the last kept class of a Split/Slice chunk is skipped

    removed: dict[int, np.ndarray] = {}
    for g in todo:
        n = len(g.classes)
        keep = _keep_count(n, want.get(g.id, 0), min_keep, round_for(g, round_to))
        order = np.argsort(scores[g.id], kind="stable")
        chosen: list[int] = []
        for i in order.tolist():
            if len(chosen) == n - keep:
                break
            c = int(g.classes[i])
            if chunks.last_of_chunk(c):
                continue
            chunks.remove(c)
            chosen.append(c)
        removed[g.id] = np.sort(np.array(chosen, dtype=np.int64))
    return removed


def select_for_target(
    groups: list[Group],
    scores: dict[int, np.ndarray],
    measure,
    target: float,
    *,
    min_keep: int = 1,
    round_to: int | None = 1,
    iterations: int = 30,
) -> tuple[dict[int, np.ndarray], float]:
    """Bisect the global ratio until ``measure(removed)`` (the kept fraction of MACs or
    params) is at most ``target``; returns the selection and the ratio used.

    The kept fraction falls as the ratio grows (up to ties and rounding), so bisection
    finds the smallest ratio that meets the target.  If even the largest ratio cannot
    meet it (min-keep, blocked groups), that selection is returned: the report then
    shows the fraction actually reached.
    """
    lo, hi = 0.0, 0.999
    best = select(groups, scores, hi, global_=True, min_keep=min_keep, round_to=round_to)
    best_ratio = hi
    if measure(best) > target:
        return best, hi
    for _ in range(iterations):
        mid = (lo + hi) / 2
        sel = select(groups, scores, mid, global_=True, min_keep=min_keep, round_to=round_to)
        if measure(sel) <= target:
            best, best_ratio, hi = sel, mid, mid
        else:
            lo = mid
    return best, best_ratio
