"""onnxprune's own counters: parameters and multiply-accumulates over inferred shapes.

Symbolic dims (a dynamic batch) count as 1, so MACs are per sample.
"""

from __future__ import annotations

import math

import onnx_ir as ir

from ._graph import all_graph_nodes, attr_int, dims


def count_params(model: ir.Model) -> int:
    """Elements of every constant tensor (initializers and ``Constant`` nodes)."""
    total = sum(math.prod(v.const_value.shape) for v in model.graph.initializers.values() if v.const_value is not None)
    for node in all_graph_nodes(model.graph):
        if node.op_type == "Constant":
            attr = node.attributes.get("value")
            if attr is not None:
                total += math.prod(attr.value.shape)
    return int(total)


def _p(d: list[int | None] | None) -> int | None:
    if d is None:
        return None
    return math.prod(1 if x is None else x for x in d)


def node_macs(node: ir.Node) -> int:
    """MACs of one Conv/ConvTranspose/Gemm/MatMul node (0 for other ops or unknown shapes)."""
    op = node.op_type
    if op in ("Conv", "ConvTranspose") and len(node.inputs) > 1:
        w = dims(node.inputs[1])
        ref = node.outputs[0] if op == "Conv" else node.inputs[0]
        n = _p(dims(ref))
        if w is None or n is None or any(x is None for x in w):
            return 0
        return n * math.prod(w[1:])
    if op in ("Gemm", "MatMul"):
        a, y = dims(node.inputs[0]), dims(node.outputs[0])
        if a is None or y is None or not a:
            return 0
        k = a[0] if (op == "Gemm" and attr_int(node, "transA", 0)) else a[-1]
        return (_p(y) or 0) * (k or 1)
    return 0


def count_macs(model: ir.Model) -> int:
    """MACs of the main graph's convolutions and matrix products."""
    return int(sum(node_macs(n) for n in model.graph))
