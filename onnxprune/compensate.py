"""Compensate stage: make up, at each consumer, for what the removed channels contributed.

``bias``: ``b += W[:, removed] · E[x_removed]`` (Conv: summed over kernel taps).  A
removed channel's mean contribution moves into the consumer's bias, so only its
variation around the mean is lost; a channel that was constant on the calibration data
is removed exactly (up to zero padding at the borders of a Conv).  A consumer without a
bias gets one (Conv, ConvTranspose and Gemm take an input; MatMul gets an ``Add``).

Deltas are computed on the original weights, before the rewrite, and added after it,
sliced like the consumer's own outputs when those are pruned too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ._graph import const_array, replace_const
from .calibrate import Statistics
from .consumers import consumer_views
from .groups import Analysis
from .layout import SliceParam

COMPENSATIONS = ("none", "bias")


@dataclass
class BiasDelta:
    node: ir.Node
    delta: np.ndarray  # one value per original output channel of the consumer
    out_atoms: np.ndarray | None  # the consumer's own output atoms, when it is a producer


def bias_deltas(analysis: Analysis, stats: Statistics, removed: np.ndarray) -> list[BiasDelta]:
    """The bias change of every consumer that loses input channels."""
    gone = np.zeros(len(analysis.roots), dtype=bool)
    gone[np.asarray(removed, dtype=np.int64)] = True
    gone[0] = False
    out_atoms = {
        id(e.node): e.atoms for e in analysis.edits if isinstance(e, SliceParam) and e.role == "weight_out"
    }
    deltas: dict[int, BiasDelta] = {}
    for view in consumer_views(analysis):
        st = stats.tensors.get(view.tensor)
        drop = gone[analysis.roots[view.atoms]]
        if st is None or not drop.any():
            continue
        d = view.contribution(st.mean, drop)
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
    base = f"{node.name or node.op_type}_bias"
    name, k = base, 0
    while name in graph.initializers:
        k += 1
        name = f"{base}_{k}"
    value = ir.Value(name=name, shape=ir.Shape(array.shape), const_value=ir.tensor(array, name=name))
    value.dtype = value.const_value.dtype
    graph.register_initializer(value)
    node.replace_input_with(index, value)


def _append_add(node: ir.Node, delta: np.ndarray, graph: ir.Graph) -> None:
    out = node.outputs[0]
    base = f"{node.name or 'matmul'}_bias"
    name, k = base, 0
    while name in graph.initializers:
        k += 1
        name = f"{base}_{k}"
    bias = ir.Value(name=name, shape=ir.Shape(delta.shape), const_value=ir.tensor(delta, name=name))
    bias.dtype = bias.const_value.dtype
    graph.register_initializer(bias)
    add = ir.Node("", "Add", [out, bias], name=f"{node.name or 'matmul'}_bias_add", num_outputs=1)
    result = add.outputs[0]
    result.dtype = out.dtype
    # Readers of the MatMul now read MatMul + delta; a graph output keeps its name.
    is_output = out.is_graph_output()
    old_name = out.name
    for use in list(out.uses()):
        use.node.replace_input_with(use.idx, result)
    if is_output:
        out.name = f"{old_name}_before_bias"
        result.name = old_name
        graph.outputs[graph.outputs.index(out)] = result
    else:
        result.name = f"{old_name}_biased"
    add.replace_input_with(0, out)
    graph.insert_after(node, add)
