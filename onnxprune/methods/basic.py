"""The basic criteria: data-free ``l1``, ``l2``, ``random``; ``wanda``, ``flap`` and
``activation`` from the per-channel statistics every calibration gathers.

``l1``/``l2`` measure the producer's effective filter: an unfused BatchNormalization right
after it is folded in, so a fused and an unfused export of one network score alike.  A
score is computed per atom (one producer row) and summed over the atoms of a channel
class, so a channel shared by a residual Add is judged by all the filters that make it.
The data-driven ones sum a term over the consumers that read the channel and over the
features it flattens into (METHODS.md).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_ir as ir

from .._graph import const_array
from ..calibrate import Statistics, TensorStats
from ..consumers import ConsumerView
from ..groups import Analysis
from ..layout import SliceParam
from . import Criterion, MethodOptions, register_criterion


def _bn_scale(producer: ir.Node) -> np.ndarray | None:
    """|gamma|/sqrt(var+eps) of a BatchNormalization that follows ``producer``.

    The filter the network really applies is W·gamma/sqrt(var+eps); folding it in makes
    l1/l2 give the same ranking whether or not the exporter fused BN into the Conv.
    Looks through single-use elementwise activations (BN after ReLU).
    """
    value = producer.outputs[0]
    for _ in range(3):
        uses = list(value.uses())
        if len(uses) != 1 or value.is_graph_output():
            return None
        node = uses[0].node
        if node.op_type == "BatchNormalization" and uses[0].idx == 0:
            gamma, var = const_array(node.inputs[1]), const_array(node.inputs[4])
            if gamma is None or var is None:
                return None
            eps = node.attributes.get("epsilon")
            eps = 1e-5 if eps is None else float(eps.value)
            return np.abs(gamma.astype(np.float64)) / np.sqrt(var.astype(np.float64) + eps)
        if node.op_type not in ("Relu", "LeakyRelu", "Clip", "HardSwish", "Sigmoid", "Tanh", "Identity"):
            return None
        value = node.outputs[0]
    return None


def _row_norms(edit: SliceParam, p: int) -> np.ndarray:
    w = np.asarray(const_array(edit.node.inputs[edit.index]), dtype=np.float64)
    w = np.moveaxis(w, edit.axis, 0).reshape(w.shape[edit.axis], -1)
    norms = np.abs(w).sum(axis=1) if p == 1 else (w * w).sum(axis=1)
    scale = _bn_scale(edit.node)
    if scale is not None and scale.shape == norms.shape:
        norms = norms * (scale if p == 1 else scale * scale)
    return norms


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


class Norm(Criterion):
    """``l1``: Σ|w| of a class's producer filters; ``l2``: their l2 norm (BN folded in)."""

    needs_data = False

    def __init__(self, p: int) -> None:
        self.p = p

    def scores(self, analysis: Analysis, stats: Statistics | None, views: list[ConsumerView],
               opts: MethodOptions) -> dict[int, float]:
        totals = _norm_scores(analysis, self.p)
        return totals if self.p == 1 else {r: np.sqrt(t) for r, t in totals.items()}


class Random(Criterion):
    """Uniform random scores from ``opts.seed``: the baseline every criterion must beat."""

    needs_data = False

    def scores(self, analysis: Analysis, stats: Statistics | None, views: list[ConsumerView],
               opts: MethodOptions) -> dict[int, float]:
        rng = np.random.default_rng(opts.seed)
        out: dict[int, float] = {}
        for g in analysis.groups:
            if g.prunable:
                out.update(zip(g.classes.tolist(), rng.random(len(g.classes))))
        return out


# A consumer's contribution to every atom's score: (view, its input's statistics, class
# root per index, number of atoms) -> [atoms].
Term = Callable[[ConsumerView, TensorStats, np.ndarray, int], np.ndarray]


def _summed(analysis: Analysis, stats: Statistics, views: list[ConsumerView], term: Term,
            once_per_tensor: bool = False) -> dict[int, float]:
    """Class root -> ``term`` summed over the consumers with statistics; classes no consumer
    with statistics reads are left out."""
    n_atoms = len(analysis.roots)
    total = np.zeros(n_atoms)
    measured = np.zeros(n_atoms, dtype=bool)
    seen: set[str] = set()
    for view in views:
        st = stats.tensors.get(view.tensor)
        if st is None or (once_per_tensor and view.tensor in seen):
            continue
        roots = analysis.roots[view.atoms]
        total += term(view, st, roots, n_atoms)
        seen.add(view.tensor)
        measured[roots] = True
    return {int(r): float(total[r]) for r in np.flatnonzero(measured)}


def _mean_abs(view: ConsumerView, st: TensorStats, roots: np.ndarray, n: int) -> np.ndarray:
    """mean |x_k| as the consumer sees it, averaged over a flattened block."""
    counts = np.bincount(roots, minlength=n)
    sums = np.bincount(roots, weights=st.mean_abs, minlength=n)
    return np.divide(sums, counts, out=np.zeros(n), where=counts > 0)


def _wanda(view: ConsumerView, st: TensorStats, roots: np.ndarray, n: int) -> np.ndarray:
    """‖W[:, k]‖₂·rms(x_k)."""
    rms = np.sqrt(st.sumsq / max(st.n, 1))
    return np.bincount(roots, weights=np.sqrt(view.column_sq()) * rms, minlength=n)


def _flap(view: ConsumerView, st: TensorStats, roots: np.ndarray, n: int) -> np.ndarray:
    """Var(x_k)·‖W[:, k]‖₂²."""
    return np.bincount(roots, weights=st.var * view.column_sq(), minlength=n)


class Summed(Criterion):
    """A per-consumer term summed over the consumers of each class (``wanda``, ``flap``);
    ``activation`` counts each tensor once, however many consumers read it."""

    def __init__(self, term: Term, statistics: tuple[str, ...] = ("sum", "sumsq"), once_per_tensor: bool = False):
        self.term, self.statistics, self.once_per_tensor = term, statistics, once_per_tensor

    def scores(self, analysis: Analysis, stats: Statistics, views: list[ConsumerView],
               opts: MethodOptions) -> dict[int, float]:
        return _summed(analysis, stats, views, self.term, self.once_per_tensor)


register_criterion("l1", Norm(1))
register_criterion("l2", Norm(2))
register_criterion("random", Random())
register_criterion("wanda", Summed(_wanda))
register_criterion("flap", Summed(_flap))
register_criterion("activation", Summed(_mean_abs, ("sum", "sumsq", "sumabs"), once_per_tensor=True))
