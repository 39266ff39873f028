"""Rewrite: remove the chosen channels by applying the analysis' edit records.

Initializers and ``Constant`` tensors are sliced, attributes and shape constants are
rewritten, stale shapes are dropped and onnx shape inference is run again.  The model
is changed in place.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from ._graph import const_array, new_initializer, opset, remove_dead, replace_const
from .shapes import supplement_shapes
from .groups import Analysis
from .layout import SetCount, SetGroup, SliceBounds, SliceParam, SplitSizes

Keep = Callable[[np.ndarray], np.ndarray]


def removed_mask(analysis: Analysis, removed: np.ndarray) -> np.ndarray:
    """Per class root, whether it goes with ``removed`` (FIXED, root 0, never does)."""
    gone = np.zeros(len(analysis.roots), dtype=bool)
    gone[np.asarray(removed, dtype=np.int64)] = True
    gone[0] = False
    return gone


def keep_function(analysis: Analysis, removed: np.ndarray) -> Keep:
    """``keep(atoms)``: which of ``atoms`` survive when the classes in ``removed`` go."""
    gone = removed_mask(analysis, removed)

    def keep(atoms: np.ndarray) -> np.ndarray:
        return ~gone[analysis.roots[atoms]]

    return keep


def apply_removal(analysis: Analysis, removed: np.ndarray) -> None:
    """Remove every channel whose class root is in ``removed`` from ``analysis.model``."""
    model = analysis.model
    graph = model.graph
    keep = keep_function(analysis, removed)
    if not len(removed):
        return
    # Constant inputs may be edited by several records (a Conv weight is sliced on its
    # output axis as a producer and on its input axis as a consumer): gather per input.
    array_ops: dict[tuple[ir.Node, int], list[Callable[[np.ndarray], np.ndarray]]] = defaultdict(list)
    seen_axes: set[tuple[int, int, int]] = set()
    touched: list[ir.Value] = []

    for e in analysis.edits:
        if isinstance(e, SliceParam):
            key = (id(e.node), e.index, e.axis)
            if key in seen_axes:
                continue
            seen_axes.add(key)
            mask = keep(e.atoms)
            if mask.all():
                continue
            idx = np.flatnonzero(mask)
            array_ops[(e.node, e.index)].append(lambda a, idx=idx, axis=e.axis: np.take(a, idx, axis=axis))
        elif isinstance(e, SetCount):
            count = int(keep(e.atoms).sum()) * e.scale
            if e.attr is not None:
                values = [int(v) for v in e.node.attributes[e.attr].value]
                values[e.pos] = count
                e.node.attributes[e.attr] = ir.AttrInt64s(e.attr, values)
            else:
                array_ops[(e.node, e.index)].append(_set_entry(e.pos, count))
        elif isinstance(e, SetGroup):
            e.node.attributes["group"] = ir.AttrInt64("group", int(keep(e.atoms).sum()))
        elif isinstance(e, SplitSizes):
            _rewrite_split(e, keep, graph, model)
        elif isinstance(e, SliceBounds):
            start = int(keep(e.atoms[: e.start]).sum())
            end = start + int(keep(e.atoms[e.start : e.end]).sum())
            for index, attr, val in ((1, "starts", start), (2, "ends", end)):
                if opset(model) >= 10:
                    array_ops[(e.node, index)].append(_set_entry(e.pos, val))
                else:
                    values = [int(v) for v in e.node.attributes[attr].value]
                    values[e.pos] = val
                    e.node.attributes[attr] = ir.AttrInt64s(attr, values)

    for (node, index), ops in array_ops.items():
        value = node.inputs[index]
        array = const_array(value)
        for op in ops:
            array = op(array)
        touched.append(value)
        replace_const(node, index, np.ascontiguousarray(array), graph)

    remove_dead(graph, touched)  # the constants our private copies replaced
    refresh_shapes(model)


def _set_entry(pos: int, count: int) -> Callable[[np.ndarray], np.ndarray]:
    def op(a: np.ndarray) -> np.ndarray:
        out = np.array(a, copy=True)
        out.reshape(-1)[pos] = count
        return out

    return op


def _rewrite_split(e: SplitSizes, keep: Keep, graph: ir.Graph, model: ir.Model) -> None:
    sizes = np.array([int(keep(c).sum()) for c in e.chunks], dtype=np.int64)
    node = e.node
    if opset(model) < 13:
        node.attributes["split"] = ir.AttrInt64s("split", sizes.tolist())
        return
    node.attributes.pop("num_outputs", None)  # opset 18: sizes may now be unequal
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        replace_const(node, 1, sizes, graph)
        return
    value = new_initializer(graph, f"{node.name or 'split'}_sizes", sizes)
    node.resize_inputs(2)
    node.replace_input_with(1, value)


def refresh_shapes(model: ir.Model) -> None:
    """Forget inferred shapes of intermediate values and infer them again."""
    graph = model.graph
    outputs = set(graph.outputs)
    for node in graph:
        for value in node.outputs:
            if value not in outputs:
                value.shape = None
    ShapeInferencePass(strict_mode=False, data_prop=True)(model)
    supplement_shapes(model)
