"""``obs``: channels ordered by what least squares cannot put back.

onnxprune's own baseline, not one of the seed papers: the greedy, structured form of
Optimal Brain Surgeon (Hassibi & Stork 1993) that ThiNet and OBC-style channel pruning use,
on the statistics the ``lstsq`` compensation already gathers.  For a consumer ``y = W x``
with centred input covariance ``H`` (ridge as the lstsq refit), removing the input block
``J`` and refitting the kept weights by least squares leaves the output error

    E_J = tr(W'_J (H⁻¹_JJ)⁻¹ W'_Jᵀ)

(``W'``: the weights refitted so far).  Per group, the channel class with the smallest
``E`` summed over the consumers that read it is removed, ``W'`` and ``H⁻¹`` are updated
as OBS does (``W' -= W'_J (H⁻¹_JJ)⁻¹ H⁻¹_J:``, ``H⁻¹ -= H⁻¹_:J (H⁻¹_JJ)⁻¹ H⁻¹_J:``), and
so on until one class is left.  A class's score is its step in that order: the first
removed scores lowest.  A block is a channel's k·k columns for a k×k Conv (its im2col
statistics) or the d columns of an attention head.  Consumers without the statistics
(grouped Conv, ConvTranspose, > 4096 features) contribute their wanda score's order
instead, added after the OBS steps.  It pairs with ``--compensate lstsq``, whose refit
it anticipates; with ``bias`` or ``none`` the order is still measured under a refit.
"""

from __future__ import annotations

import numpy as np

from ..calibrate import GramKey, InputRef, StatRequest, Statistics
from ..compensate import lstsq_requests, ridged, weight_rows
from ..consumers import ConsumerView
from ..groups import Analysis
from . import Criterion, MethodOptions, register_criterion


class _Site:
    """One consumer's elimination state: refitted weights and inverse covariance."""

    def __init__(self, w: np.ndarray, cov: np.ndarray, blocks: dict[int, np.ndarray]) -> None:
        self.w = w.copy()  # [out, features]
        self.hinv = np.linalg.inv(ridged(cov.copy()))
        self.blocks = blocks  # class root -> feature columns
        self.single = all(len(j) == 1 for j in blocks.values())

    def costs(self, classes: list[int]) -> np.ndarray:
        if self.single:
            j = np.array([self.blocks[c][0] for c in classes])
            return (self.w[:, j] ** 2).sum(axis=0) / np.maximum(self.hinv[j, j], 1e-300)
        out = np.empty(len(classes))
        for k, c in enumerate(classes):
            j = self.blocks[c]
            wj = self.w[:, j]
            out[k] = float((wj.T * np.linalg.solve(self.hinv[np.ix_(j, j)], wj.T)).sum())
        return out

    def remove(self, c: int) -> None:
        j = self.blocks.pop(c)
        a = np.linalg.inv(self.hinv[np.ix_(j, j)])
        rows = self.hinv[j, :]
        self.w -= (self.w[:, j] @ a) @ rows
        self.hinv -= self.hinv[:, j] @ a @ rows
        self.w[:, j] = 0.0
        self.hinv[j, :] = 0.0
        self.hinv[:, j] = 0.0


class Obs(Criterion):

    def requests(self, analysis: Analysis, views: list[ConsumerView], opts: MethodOptions) -> list[StatRequest]:
        return lstsq_requests(analysis)

    def scores(self, analysis: Analysis, stats: Statistics, views: list[ConsumerView], opts: MethodOptions) -> dict[int, float]:
        class_group = {int(c): g.id for g in analysis.groups if g.prunable for c in g.classes}
        by_group: dict[int, list[_Site]] = {}
        fallback: dict[int, float] = {}
        for view in views:
            roots = analysis.roots[view.atoms]
            gram = stats.extra.get(GramKey(InputRef.of(view)))
            if gram is None or gram.empty:  # no statistics: wanda's order, after the OBS steps
                st = stats.tensors.get(view.tensor)
                if st is not None:
                    rms = np.sqrt(st.sumsq / max(st.n, 1))
                    for r, s in zip(roots.tolist(), np.sqrt(view.column_sq()) * rms):
                        fallback[r] = fallback.get(r, 0.0) + float(s)
                continue
            taps = gram.gram.shape[-1] // len(roots)
            cols: dict[int, dict[int, list[int]]] = {}  # group -> class -> feature columns
            for k, r in enumerate(roots.tolist()):
                if r in class_group:
                    cols.setdefault(class_group[r], {}).setdefault(r, []).extend(range(k * taps, (k + 1) * taps))
            if not cols:
                continue
            w, cov = weight_rows(view), gram.covariance()
            for gid, blocks in cols.items():  # one state per group: each group's order assumes the others whole
                by_group.setdefault(gid, []).append(_Site(w, cov, {c: np.array(j) for c, j in blocks.items()}))
        scores: dict[int, float] = {}
        for gid, sites in sorted(by_group.items()):
            left = sorted({c for site in sites for c in site.blocks})
            step = 0
            while len(left) > 1:
                total = np.zeros(len(left))
                for site in sites:
                    mine = [k for k, c in enumerate(left) if c in site.blocks]
                    if mine:
                        total[mine] += site.costs([left[k] for k in mine])
                c = left.pop(int(np.argmin(total)))
                for site in sites:
                    if c in site.blocks:
                        site.remove(c)
                scores[c] = float(step)
                step += 1
            for c in left:
                scores[c] = float(step)
        # Classes the OBS steps did not see keep wanda's order, above every OBS step.
        top = max(scores.values(), default=0.0) + 1.0
        for c, s in fallback.items():
            if c not in scores:
                scores[c] = top + s
        return scores


register_criterion("obs", Obs())
