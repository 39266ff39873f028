"""Score stage: one importance value per removable channel of each group.

Data-free criteria live here; calibration-based ones join them as they arrive.
``l1``/``l2`` measure the producer's effective filter: an unfused BatchNormalization right
after it is folded in, so a fused and an unfused export of one network score alike.  A
score is computed per atom (one producer row) and summed over the atoms of a channel
class, so a channel shared by a residual Add is judged by all the filters that make it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_ir as ir

from ._graph import const_array
from .groups import Analysis, Group
from .layout import SliceParam
from .methods import REGISTRY, MethodOptions

DATA_FREE = ("l1", "l2", "random")
# Data-driven: the baselines here, then the seed papers' plug-ins (onnxprune.methods).
DATA_DRIVEN = ("wanda", "flap", "activation", *REGISTRY)
METHODS = DATA_FREE + DATA_DRIVEN
# Methods that read E|x| (TensorStats.sumabs) besides Σx and Σx², which are always gathered.
_READ_SUMABS = ("activation", "relief")


def statistics_for(method: str) -> tuple[str, ...]:
    """The per-channel statistics ``calibrate`` must gather for ``method`` (and for the
    dead channels and bias compensation)."""
    return ("sum", "sumsq", "sumabs") if method in _READ_SUMABS else ("sum", "sumsq")


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


def _data_scores(analysis: Analysis, stats, method: str) -> tuple[dict[int, float], set[int]]:
    """Class root -> score from calibration statistics at every consumer, and the dead classes.

    ``activation``: mean |x_k| as the consumer sees it (averaged over a flattened block);
    ``wanda``: Σ ‖W[:, k]‖₂·rms(x_k); ``flap``: Σ Var(x_k)·‖W[:, k]‖₂² (METHODS.md), summed
    over the consumers that read the channel and over the features it flattens into.
    A class is dead when every index of it was exactly 0 on every calibration sample.
    """
    from .consumers import consumer_views

    n_atoms = len(analysis.roots)
    total = np.zeros(n_atoms)
    alive = np.zeros(n_atoms, dtype=bool)
    measured = np.zeros(n_atoms, dtype=bool)
    seen_tensors: set[str] = set()
    for view in consumer_views(analysis):
        st = stats.tensors.get(view.tensor)
        if st is None:
            continue
        roots = analysis.roots[view.atoms]
        if method == "activation":
            if view.tensor in seen_tensors:
                continue
            counts = np.bincount(roots, minlength=n_atoms)
            sums = np.bincount(roots, weights=st.mean_abs, minlength=n_atoms)
            total += np.divide(sums, counts, out=np.zeros(n_atoms), where=counts > 0)
        elif method == "wanda":
            rms = np.sqrt(st.sumsq / max(st.n, 1))
            total += np.bincount(roots, weights=np.sqrt(view.column_sq()) * rms, minlength=n_atoms)
        else:  # flap
            total += np.bincount(roots, weights=st.var * view.column_sq(), minlength=n_atoms)
        seen_tensors.add(view.tensor)
        measured[roots] = True
        alive |= np.bincount(roots, weights=(~st.dead).astype(float), minlength=n_atoms) > 0
    dead = {int(r) for r in np.flatnonzero(measured & ~alive)}
    return {int(r): float(total[r]) for r in np.flatnonzero(measured)}, dead


def score_groups(
    analysis: Analysis, method: str, seed: int = 0, stats=None, opts: MethodOptions | None = None
) -> dict[int, np.ndarray]:
    """Group id -> score of each of its removable channels (same order as ``group.classes``).

    Data-driven methods need ``stats`` (from the calibrate stage).  Dead channels score
    ``-inf`` so every selection removes them first.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    groups = [g for g in analysis.groups if g.prunable]
    if method in DATA_DRIVEN:
        if stats is None:
            raise ValueError(f"method {method!r} needs calibration statistics")
        if method in REGISTRY:
            from .consumers import consumer_views

            _, dead = _data_scores(analysis, stats, "wanda")  # only the dead classes: Σx² only
            totals = REGISTRY[method].scores(analysis, stats, consumer_views(analysis), opts or MethodOptions(seed=seed))
        else:
            totals, dead = _data_scores(analysis, stats, method)
        return {
            g.id: np.array([-np.inf if int(c) in dead else totals.get(int(c), 0.0) for c in g.classes])
            for g in groups
        }
    if method == "random":
        rng = np.random.default_rng(seed)
        return {g.id: rng.random(len(g.classes)) for g in groups}
    p = 1 if method == "l1" else 2
    totals = _norm_scores(analysis, p)
    finish: Callable[[float], float] = (lambda x: x) if p == 1 else np.sqrt
    return {g.id: np.array([finish(totals.get(int(c), 0.0)) for c in g.classes]) for g in groups}


def group_of(analysis: Analysis, gid: int) -> Group:
    return next(g for g in analysis.groups if g.id == gid)
