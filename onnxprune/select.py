"""Select stage: which channels of each group to remove, from scores and a budget."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .chunks import ChunkGuard
from .groups import Group

# Kept Conv widths keep the alignment they had, up to 16: onnxruntime's CPU Convs run in
# its blocked NCHWc layout only when channel counts are multiples of the block (8 with
# AVX2, 16 with AVX-512), and a pruned Conv that falls out of it runs slower than the
# unpruned one (benchmarks/RESULTS.md, latency).  GPU tensor cores like the same multiples.
CONV_ALIGN = (16, 8)
# A target (--target-macs/--target-params) is met when the kept fraction, by the tool's own
# count, is within this of the requested one.  The target is a ceiling (at most F is kept)
# whenever that can be reached, so the band in practice is [F - TOLERANCE, F].
TOLERANCE = 0.02
# The alignments a group steps down to, in order, when its automatic alignment leaves the
# target outside the band: only the groups that need it, only as far as needed.
RELAX = (8, 1)

Measure = Callable[[dict[int, np.ndarray]], float]


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


def in_band(achieved: float, target: float) -> bool:
    """Whether a kept fraction meets a target: at most ``target``, by at most
    :data:`TOLERANCE` less (the float slack keeps an exact ``F - TOLERANCE`` in)."""
    return target - TOLERANCE - 1e-9 <= achieved <= target + 1e-12


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
    align: dict[int, int] | None = None,
) -> dict[int, np.ndarray]:
    """Group id -> class roots to remove: about ``want[g.id]`` of the lowest-scored
    channels of each prunable group.  Every group keeps at least ``max(1, min_keep)``
    channels, and kept counts are rounded up to :func:`round_for` (``round_to=None``:
    automatic; ``align[g.id]`` instead where given: a group whose alignment a target
    relaxed); channels dead on the calibration data (score -inf) are always removed; a
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
        step = (align or {}).get(g.id) or round_for(g, round_to)
        keep = _keep_count(n, want.get(g.id, 0), min_keep, step)
        order = np.argsort(scores[g.id], kind="stable")
        lowest = np.asarray(g.classes)[order[: max(n - keep, 0)]].astype(np.int64)
        if chunks.free(g.classes, lowest):  # no chunk to keep a class of: the lowest scores go
            removed[g.id] = np.sort(lowest)
            continue
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
    measure: Measure,
    target: float,
    *,
    min_keep: int = 1,
    round_to: int | None = 1,
    iterations: int = 30,
) -> tuple[dict[int, np.ndarray], float, dict[int, int]]:
    """Bisect the global ratio until ``measure(removed)`` (the kept fraction of MACs or
    params) is at most ``target``, then bring it into the band with :func:`fit_band`;
    returns the selection, the ratio the bisection used and the groups whose alignment
    was relaxed (id -> the multiple they keep).

    The kept fraction falls as the ratio grows (up to ties and rounding), so bisection
    finds the smallest ratio that meets the target; the aligned counts make that a step
    function, so the result can sit well under the target until :func:`fit_band` gives
    channels back.  If even the largest ratio cannot meet it (min-keep, blocked groups),
    the selection closest to it is returned: the report then shows the fraction reached.
    """
    lo, hi = 0.0, 0.999
    best = select(groups, scores, hi, global_=True, min_keep=min_keep, round_to=round_to)
    best_ratio = hi
    if measure(best) <= target:
        for _ in range(iterations):
            mid = (lo + hi) / 2
            sel = select(groups, scores, mid, global_=True, min_keep=min_keep, round_to=round_to)
            if measure(sel) <= target:
                best, best_ratio, hi = sel, mid, mid
            else:
                lo = mid
    todo = [g for g in groups if g.prunable and g.id in scores]
    best, relaxed = fit_band(todo, scores, best, measure, target, min_keep=min_keep, round_to=round_to)
    return best, best_ratio, relaxed


Gain = Callable[[int, np.ndarray, np.ndarray], float]


def fit_band(
    groups: list[Group],
    scores: dict[int, np.ndarray],
    removed: dict[int, np.ndarray],
    measure: Measure,
    target: float,
    *,
    min_keep: int = 1,
    round_to: int | None = None,
    most: dict[int, int] | None = None,
    gain: Gain | None = None,
) -> tuple[dict[int, np.ndarray], dict[int, int]]:
    """Bring ``measure(removed)`` into the band of ``target`` (:func:`in_band`), one group
    at a time: first at every group's own alignment, then, only while that is not enough,
    with single groups relaxed to 8, then to 1 (:data:`RELAX`).

    Alignment stays a constraint of the search rather than a rounding after it: each
    change moves a group between counts it may keep.  Aligned changes go on while they
    fit under the target (inside the band too); relaxed ones stop at the band.  Under the band a group gives back as
    many channels as fit under the target; over the target it removes the fewest more that
    reach it (else as many as ``most[g.id]`` allows).  Of the groups' changes, the one
    landing in the band with the largest ``gain(gid, before, after)`` (the damage it saves;
    without ``gain``, the one closest to the target) is made, and this repeats until the
    band is reached or no change helps.  Returns the selection and the relaxed groups (id
    -> the multiple they now keep)."""
    removed = dict(removed)
    align = {g.id: round_for(g, round_to) for g in groups}
    relaxed: dict[int, int] = {}
    for level in (0, *RELAX):
        for _ in range(4 * len(groups) + 4):
            m = measure(removed)
            if level and in_band(m, target):  # aligned steps go on while they fit: they cost nothing
                return removed, relaxed
            steps = {g.id: align[g.id] if level == 0 else level for g in groups if level == 0 or level < align[g.id]}
            change = _best_change(groups, scores, removed, measure, target, m, steps, min_keep, most, gain)
            if change is None:
                break
            gid, sel = change
            removed[gid] = sel
            if level:
                align[gid] = relaxed[gid] = level
    return removed, relaxed


def _best_change(groups, scores, removed, measure, target, m, steps, min_keep, most, gain):
    """The change of one group that :func:`fit_band` makes next (gid, selection), or None."""
    options = []
    for g in groups:
        if g.id not in steps:
            continue
        sel = _fill(g, scores, removed, measure, target, m > target, steps[g.id], min_keep, (most or {}).get(g.id))
        if sel is not None:
            trial = measure({**removed, g.id: sel})
            if (trial < m) if m > target else (m < trial <= target):
                options.append((trial, g.id, sel))
    if not options:
        return None
    band = [o for o in options if in_band(o[0], target)]
    if band:
        key = (lambda o: gain(o[1], removed.get(o[1], _NONE), o[2])) if gain else (lambda o: o[0])
        pick = max(band, key=lambda o: (key(o), -o[1]))
    elif any(o[0] <= target for o in options):
        pick = max((o for o in options if o[0] <= target), key=lambda o: (o[0], -o[1]))
    else:
        pick = min(options, key=lambda o: (o[0], o[1]))
    return pick[1], pick[2]


_NONE = np.zeros(0, dtype=np.int64)


def _fill(g: Group, scores, removed, measure, target: float, over: bool, step: int, min_keep: int,
          most: int | None) -> np.ndarray | None:
    """The group's selection, at kept counts that are multiples of ``step``, with the most
    channels kept whose measure is at most ``target``: among counts keeping more than now
    (``over`` False) or fewer, down to ``most`` removed (``over``); over the target and
    unable to reach it, the fewest kept.  None when there is no such count."""
    n, cur = len(g.classes), len(removed.get(g.id, _NONE))
    keeps = [min(n, j * step) for j in range(0, -(-n // step) + 1)]
    floor = max(1, min_keep, n - (n if most is None else most))
    keeps = sorted({k for k in keeps if k >= floor and (k < n - cur if over else k > n - cur)})
    if not keeps:
        return None

    def at(keep: int) -> np.ndarray:
        return choose([g], scores, {g.id: n - keep}, min_keep=min_keep, align={g.id: step})[g.id]

    def fits(keep: int) -> bool:
        return measure({**removed, g.id: at(keep)}) <= target

    if not fits(keeps[0]):  # even the fewest kept misses: over, the most it can do; under, nothing
        return at(keeps[0]) if over else None
    lo, hi = 0, len(keeps) - 1  # keeps[lo] fits; the kept fraction grows with the kept count
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(keeps[mid]):
            lo = mid
        else:
            hi = mid - 1
    return at(keeps[lo])


def target_outcome(kind: str, requested: float, achieved: float, relaxed: dict[int, tuple[int, int]]) -> dict:
    """The report's ``target`` entry: what was asked (``kind``: "MACs" or "params") and what
    the tool's own count found, whether that is within :data:`TOLERANCE`, and one line
    saying why not, or which groups' alignment was relaxed (id -> (from, to)) to reach it."""
    within = abs(achieved - requested) <= TOLERANCE + 1e-9
    note = None
    if relaxed:
        note = "alignment relaxed to reach the target: " + ", ".join(
            f"group {gid} {a}→{b}" for gid, (a, b) in sorted(relaxed.items()))
    if not within:
        why = ("not reachable, every prunable group is at its limit (blocked groups, --min-keep)" if achieved > requested
               else "the closest at or under it, the channels left are steps of more than 2 points")
        note = f"target {kind} {requested:.3g} missed: achieved {achieved:.3f} (outside ±{TOLERANCE * 100:.0f} points), {why}"
    return {"kind": kind, "requested": requested, "achieved": achieved, "within_tolerance": within,
            "tolerance": TOLERANCE, "note": note,
            "relaxed_alignment": {str(k): list(v) for k, v in sorted(relaxed.items())}}
