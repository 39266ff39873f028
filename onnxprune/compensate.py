"""Compensate stage: make up, at each consumer, for what the removed channels contributed.

``lstsq`` (below, the default with calibration data) refits the kept weights and the bias by
least squares from Gram statistics of the original graph; :mod:`onnxprune.reconstruct` then
refits them again from the pruned graph's own inputs.  Consumers it cannot handle get ``bias``.

``bias``: ``b += W[:, removed] · E[x_removed]`` (Conv: summed over kernel taps).  A
removed channel's mean contribution moves into the consumer's bias, so only its
variation around the mean is lost; a channel that was constant on the calibration data
is removed exactly (up to zero padding at the borders of a Conv).  A consumer without a
bias gets one (Conv, ConvTranspose and Gemm take an input; MatMul gets an ``Add``).

Deltas are computed on the original weights, before the rewrite, and added after it,
sliced like the consumer's own outputs when those are pruned too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import onnx_ir as ir

from ._graph import _unique_name, const_array, new_initializer, replace_const
from .calibrate import GramKey, InputRef, Statistics
from .consumers import consumer_views
from .gram import solve_spd
from .groups import Analysis
from .layout import SliceParam
from .rewrite import removed_mask

COMPENSATIONS = ("none", "bias", "lstsq")


@dataclass
class BiasDelta:
    node: ir.Node
    delta: np.ndarray  # one value per original output channel of the consumer
    out_atoms: np.ndarray | None  # the consumer's own output atoms, when it is a producer


def bias_deltas(analysis: Analysis, stats: Statistics, removed: np.ndarray) -> list[BiasDelta]:
    """The bias change of every consumer that loses input channels."""
    gone = removed_mask(analysis, removed)
    out_atoms = {
        id(e.node): e.atoms for e in analysis.edits if isinstance(e, SliceParam) and e.role == "weight_out"
    }
    deltas: dict[int, BiasDelta] = {}
    for view in consumer_views(analysis):
        st = stats.tensors.get(view.tensor)
        drop = gone[analysis.roots[view.atoms]]
        if st is None or not loses_inputs(view, drop):
            continue
        d = lost_contribution(view, st.mean, drop)
        if id(view.node) in deltas:
            deltas[id(view.node)].delta += d
        else:
            deltas[id(view.node)] = BiasDelta(view.node, d, out_atoms.get(id(view.node)))
    return list(deltas.values())


def apply_bias(analysis: Analysis, deltas: list[BiasDelta], removed: np.ndarray) -> int:
    """Add each delta to its consumer's (already sliced) bias; returns how many changed."""
    from .rewrite import keep_function

    keep = keep_function(analysis, removed)
    graph = analysis.model.graph
    for bd in deltas:
        delta = bd.delta if bd.out_atoms is None else bd.delta[keep(bd.out_atoms)]
        node = bd.node
        if node.op_type in ("Conv", "ConvTranspose", "Gemm"):
            bias_value = node.inputs[2] if len(node.inputs) > 2 else None
            dtype = const_array(node.inputs[1]).dtype
            if bias_value is None:
                node.resize_inputs(3)
                current = np.zeros(delta.shape, dtype=dtype)
                _new_input(node, 2, (current + delta).astype(dtype), graph)
            else:
                current = const_array(bias_value)
                replace_const(node, 2, (np.broadcast_to(current, np.broadcast_shapes(current.shape, delta.shape)) + delta).astype(current.dtype), graph)
        else:  # MatMul: Y = X·W becomes Y = X·W + delta
            _append_add(node, delta.astype(const_array(node.inputs[1]).dtype), graph)
    return len(deltas)


def _new_input(node: ir.Node, index: int, array: np.ndarray, graph: ir.Graph) -> None:
    node.replace_input_with(index, new_initializer(graph, f"{node.name or node.op_type}_bias", array))


def _append_add(node: ir.Node, delta: np.ndarray, graph: ir.Graph) -> None:
    out = node.outputs[0]
    bias = new_initializer(graph, f"{node.name or 'matmul'}_bias", delta)
    # Names a MatMul's Add from an earlier round (--steps reloads the file) has are not reused.
    add_name = _free(f"{node.name or 'matmul'}_bias_add", {n.name for n in graph})
    add = ir.Node("", "Add", [out, bias], name=add_name, num_outputs=1)
    result = add.outputs[0]
    # Adding a bias of one value per output changes no shape: the Add's is the MatMul's, and
    # no shape inference has to run again for it (the bias and refit writes keep every shape).
    result.dtype, result.shape = out.dtype, None if out.shape is None else ir.Shape(list(out.shape))
    # Readers of the MatMul now read MatMul + delta; a graph output keeps its name.
    is_output = out.is_graph_output()
    old_name = out.name
    for use in list(out.uses()):
        use.node.replace_input_with(use.idx, result)
    if is_output:
        out.name = _unique_name(graph, f"{old_name}_before_bias")
        result.name = old_name
        graph.outputs[graph.outputs.index(out)] = result
    else:
        result.name = _unique_name(graph, f"{old_name}_biased")
    add.replace_input_with(0, out)
    graph.insert_after(node, add)


def _free(base: str, taken: set[str]) -> str:
    """``base``, or ``base_k`` with the first ``k`` that is not ``taken``."""
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


# ----------------------------------------------------------------------------- lstsq

LSTSQ_MAX_FEATURES = 4096  # Gram matrices above this size fall back to bias compensation
LSTSQ_RIDGE = 1e-3  # λ relative to the mean variance of the kept inputs


def ridged(cov: np.ndarray) -> np.ndarray:
    """``cov`` with the least-squares ridge added to its diagonal, in place (λ =
    LSTSQ_RIDGE × the mean variance): the one regularisation every refit and estimate uses."""
    cov[np.diag_indices_from(cov)] += LSTSQ_RIDGE * max(float(np.trace(cov)) / max(len(cov), 1), 1e-12)
    return cov


def weight_rows(view, w: np.ndarray | None = None) -> np.ndarray:
    """A consumer's weight (or ``w``, an array of its shape) as [outputs, features], columns
    in the Gram statistics' order (Conv: channel-major c·kh·kw + tap; Gemm/MatMul: one per
    input channel)."""
    from ._graph import attr_int

    w = view.weight() if w is None else w
    if view.node.op_type == "Conv":
        return w.reshape(w.shape[0], -1)
    if view.node.op_type == "Gemm" and attr_int(view.node, "transB", 0):
        return w
    return w.T


def rows_to_weight(node: ir.Node, rows: np.ndarray, shape) -> np.ndarray:
    """The inverse of :func:`weight_rows`: [outputs, features] back to ``node``'s weight layout."""
    from ._graph import attr_int

    if node.op_type == "Conv" or (node.op_type == "Gemm" and attr_int(node, "transB", 0)):
        return rows.reshape(shape)
    return rows.T.reshape(shape)


# Fewer rows than this per kept feature and the fit is mostly ridge, worse than the bias
# fit on a transformer with little calibration text; such consumers get bias compensation
# (benchmarks/RESULTS.md, "Design measurements").
LSTSQ_ROWS_PER_FEATURE = 4


# A consumer whose weight is sparse on purpose keeps its zeros: a least-squares refit would
# write every connection back, so it gets the bias fit.  On purpose means zeros onnxprune
# wrote itself (relief's ``--granularity connection`` marks the node with KEEP_ZEROS) or at
# least this share of exact zeros (a model pruned before).  Trained dense weights hold a few
# incidental zeros, far below this share (benchmarks/RESULTS.md, "Design measurements").
SPARSE_SHARE = 0.25
KEEP_ZEROS = "onnxprune.keep_zeros"


# The weights a method wrote as zero in this round (relief's ``--granularity connection``),
# as an array of the weight's shape that is zero elsewhere: compensation puts back their mean
# contribution, as it does for removed channels.
ZEROED = "onnxprune.zeroed"


def lost_contribution(view, mean: np.ndarray, drop: np.ndarray) -> np.ndarray:
    """What the consumer's pre-activation loses on average: the removed channels ``drop``
    and the connections zeroed this round (ZEROED)."""
    d = view.contribution(mean, drop)
    zeroed = view.node.meta.get(ZEROED)
    if zeroed is not None:
        d = d + view.contribution(mean, np.ones_like(drop), w=zeroed)
    return d


def loses_inputs(view, drop: np.ndarray) -> bool:
    """Whether the consumer loses input channels or had connections zeroed this round."""
    return bool(drop.any()) or ZEROED in view.node.meta


def holds_zeros(node: ir.Node, weight: np.ndarray) -> bool:
    """Whether the consumer ``node`` with ``weight`` is sparse on purpose (see SPARSE_SHARE)."""
    if node.meta.get(KEEP_ZEROS):
        return True
    return weight.size > 0 and np.count_nonzero(weight == 0) >= SPARSE_SHARE * weight.size


def enough_rows(rows: float, features: int) -> bool:
    """Whether ``rows`` sampled rows can fit ``features`` inputs by least squares."""
    return rows >= LSTSQ_ROWS_PER_FEATURE * features


def _taps(view) -> int:
    """Input features per channel of a consumer's least-squares fit (k×k Conv: k·k)."""
    w = view.node.inputs[1].shape
    return int(np.prod([int(d) for d in list(w)[2:]])) if view.node.op_type == "Conv" else 1


def _lstsq_kind(view) -> str | None:
    """'rows' (Gemm/MatMul/1×1 Conv: channel Gram), 'patch' (k×k Conv: im2col Gram), or
    None when least squares is not supported for this consumer (it then gets bias)."""
    op = view.node.op_type
    if op in ("Gemm", "MatMul"):
        return "rows" if len(view.atoms) <= LSTSQ_MAX_FEATURES else None
    if op == "Conv":
        from ._graph import attr_int

        w = const_array(view.node.inputs[1])
        if attr_int(view.node, "group", 1) != 1 or w.ndim != 4:
            return None
        if w.shape[1] * w.shape[2] * w.shape[3] > LSTSQ_MAX_FEATURES:
            return None
        return "patch"
    return None


GRAM_BUFFER = 2048  # rows gathered before one Gram product (gram.ChannelGram.buffer)


def lstsq_requests(analysis: Analysis) -> list:
    """Gram statistics of every consumer input that least squares can refit."""
    from .calibrate import StatRequest
    from .gram import ChannelGram, PatchGram

    out = []
    for view in consumer_views(analysis):
        kind = _lstsq_kind(view)
        if kind == "rows":
            out.append(StatRequest(GramKey(InputRef.of(view)), view.value, lambda a=view.axis: ChannelGram(a, shards=1, buffer=GRAM_BUFFER)))
        elif kind == "patch":
            out.append(StatRequest(GramKey(InputRef.of(view)), view.value, lambda n=view.node: PatchGram(n, shards=1, buffer=GRAM_BUFFER)))
    return out


@dataclass
class Refit:
    """New kept input weights and bias of one consumer, in its original output rows."""

    node: ir.Node
    weight: np.ndarray  # the consumer's weight with only kept inputs, all original outputs
    bias: np.ndarray  # one value per original output
    out_atoms: np.ndarray | None
    out_axis: int  # axis of `weight` that holds the outputs


def lstsq_refits(analysis: Analysis, stats: Statistics, removed: np.ndarray,
                 refit_later: Iterable[ir.Node] = ()) -> tuple[list[Refit], list[BiasDelta]]:
    """Least-squares refits where Gram statistics exist; bias deltas for the other consumers.
    ``refit_later``: consumers the refit on the pruned graph fits again before anything reads
    their output (:mod:`onnxprune.reconstruct`): they keep their kept weights and bias here
    (a MatMul still gets this round's bias ``Add``, which that refit writes), without the
    solve that refit would throw away.

    For a consumer ``y = W x + b`` losing inputs, the kept weights become
    ``W'_S = W Σ[:, S] (Σ_SS + λI)⁻¹`` and the bias ``b' = b + W μ − W'_S μ_S`` (Σ, μ: the
    input's covariance and mean; for a k×k Conv, of its im2col patches), the least-squares
    fit of the original pre-activation from the kept inputs.
    """
    from ._graph import attr_int

    gone = removed_mask(analysis, removed)
    out_atoms = {id(e.node): e.atoms for e in analysis.edits if isinstance(e, SliceParam) and e.role == "weight_out"}
    refits: list[Refit] = []
    fallback: dict[int, BiasDelta] = {}
    later = {id(n) for n in refit_later}
    for view in consumer_views(analysis):
        drop = gone[analysis.roots[view.atoms]]
        if not loses_inputs(view, drop):
            continue
        gram = stats.extra.get(GramKey(InputRef.of(view)))
        node = view.node
        if (gram is None or gram.empty or not enough_rows(gram.total()[2], int((~drop).sum()) * _taps(view))
                or holds_zeros(node, view.weight())):
            st = stats.tensors.get(view.tensor)
            if st is not None:
                d = lost_contribution(view, st.mean, drop)
                if id(node) in fallback:
                    fallback[id(node)].delta += d
                else:
                    fallback[id(node)] = BiasDelta(node, d, out_atoms.get(id(node)))
            continue
        w = view.weight()
        op = node.op_type
        wf = weight_rows(view)
        keep_cols = np.repeat(~drop, wf.shape[1] // len(drop))  # k·k columns per channel of a Conv
        s = np.flatnonzero(keep_cols)
        b_old = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        b_old = np.zeros(wf.shape[0]) if b_old is None else np.broadcast_to(np.asarray(b_old, np.float64).reshape(-1), (wf.shape[0],))
        if id(node) in later:
            w_new, b_new = wf[:, s], b_old
        else:
            w_new, b_new = _fit_from_gram(gram, wf, s, b_old)
        if op == "Conv":
            weight, axis = w_new.reshape(w.shape[0], -1, w.shape[2], w.shape[3]), 0
        elif op == "Gemm" and attr_int(node, "transB", 0):
            weight, axis = w_new, 0
        else:
            weight, axis = w_new.T, 1
        refits.append(Refit(node, weight, b_new, out_atoms.get(id(node)), axis))
    return refits, list(fallback.values())


def _fit_from_gram(gram, wf: np.ndarray, s: np.ndarray, b_old: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(W'_S, b') of :func:`lstsq_refits` for the kept columns ``s`` of ``wf`` [O, F]."""
    cov = gram.covariance()
    mu = gram.mean()
    rhs = (wf @ cov)[:, s].T
    css = cov[np.ix_(s, s)]
    del cov  # the C×C temporaries of a wide input (a flattened Conv map) dominate peak memory
    ridged(css)
    w_new = solve_spd(css, rhs).T  # W Σ[:,S] (Σ_SS+λI)⁻¹
    return w_new, b_old + wf @ mu - w_new @ mu[s]


def apply_refits(analysis: Analysis, refits: list[Refit], removed: np.ndarray) -> None:
    """Write refitted weights and biases into the (already sliced) consumers."""
    from .rewrite import keep_function

    keep = keep_function(analysis, removed)
    graph = analysis.model.graph
    for r in refits:
        rows = slice(None) if r.out_atoms is None else keep(r.out_atoms)
        weight = np.compress(rows, r.weight, axis=r.out_axis) if r.out_atoms is not None else r.weight
        # A MatMul's bias Add is new: one a previous --steps round appended stays as it is.
        write_consumer(r.node, weight, r.bias[rows], graph, fresh_add=True)


def write_consumer(node: ir.Node, weight: np.ndarray, bias: np.ndarray, graph: ir.Graph, *, fresh_add: bool) -> None:
    """Write a consumer's compensated weight (in its own layout, kept outputs only) and bias
    (one per kept output) into the pruned graph, in the weight's dtype: the one writer of
    refitted weights (:func:`apply_refits`, :mod:`onnxprune.reconstruct`).  A MatMul has no
    bias input: its bias goes into an ``Add`` after it, a new one (``fresh_add``) or the one
    this round's compensation appended (:func:`bias_add`; a new one when there is none)."""
    dtype = const_array(node.inputs[1]).dtype
    replace_const(node, 1, np.ascontiguousarray(weight.astype(dtype)), graph)
    if node.op_type == "MatMul":
        add = None if fresh_add else bias_add(node)
        if add is not None:
            replace_const(add, 1, bias.astype(dtype), graph)
        else:
            _append_add(node, bias.astype(dtype), graph)
    elif len(node.inputs) > 2 and node.inputs[2] is not None:
        current = const_array(node.inputs[2])
        shape = np.broadcast_shapes(current.shape, bias.shape)  # a Gemm's C keeps its rank
        replace_const(node, 2, np.broadcast_to(bias.astype(current.dtype), shape).copy(), graph)
    else:
        node.resize_inputs(3)
        _new_input(node, 2, bias.astype(dtype), graph)


def bias_add(node: ir.Node) -> ir.Node | None:
    """The ``Add`` onnxprune appended last to a MatMul for its compensation bias, if any
    (named by :func:`_append_add`: ``…_bias_add``, ``…_bias_add_1`` after an earlier round's)."""
    for use in node.outputs[0].uses():
        reader = use.node
        if reader.op_type == "Add" and use.idx == 0 and re.search(r"_bias_add(_\d+)?$", reader.name or ""):
            return reader
    return None
