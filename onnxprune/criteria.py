"""Score stage: one importance value per removable channel of each group.

Data-free criteria live here; calibration-based ones join them as they arrive.  A
score is computed per atom (one producer row) and summed over the atoms of a channel
class, so a channel shared by a residual Add is judged by all the filters that make it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ._graph import const_array
from .groups import Analysis, Group
from .layout import SliceParam

METHODS = ("l1", "l2", "random")


def _row_norms(edit: SliceParam, p: int) -> np.ndarray:
    w = np.asarray(const_array(edit.node.inputs[edit.index]), dtype=np.float64)
    w = np.moveaxis(w, edit.axis, 0).reshape(w.shape[edit.axis], -1)
    return np.abs(w).sum(axis=1) if p == 1 else (w * w).sum(axis=1)


def _norm_scores(analysis: Analysis, p: int) -> dict[int, float]:
    """Class root -> l1 norm (p=1) or squared l2 norm (p=2) of its producer filters."""
    total: dict[int, float] = {}
    for e in analysis.edits:
        if isinstance(e, SliceParam) and e.role == "weight_out":
            roots = analysis.roots[e.atoms]
            sums = np.bincount(roots, weights=_row_norms(e, p), minlength=len(analysis.roots))
            for r in np.unique(roots).tolist():
                total[r] = total.get(r, 0.0) + float(sums[r])
    return total


def score_groups(analysis: Analysis, method: str, seed: int = 0) -> dict[int, np.ndarray]:
    """Group id -> score of each of its removable channels (same order as ``group.classes``)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    groups = [g for g in analysis.groups if g.prunable]
    if method == "random":
        rng = np.random.default_rng(seed)
        return {g.id: rng.random(len(g.classes)) for g in groups}
    p = 1 if method == "l1" else 2
    totals = _norm_scores(analysis, p)
    finish: Callable[[float], float] = (lambda x: x) if p == 1 else np.sqrt
    return {g.id: np.array([finish(totals.get(int(c), 0.0)) for c in g.classes]) for g in groups}


def group_of(analysis: Analysis, gid: int) -> Group:
    return next(g for g in analysis.groups if g.id == gid)
