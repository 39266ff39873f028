"""What the data-driven stages need to know about each consumer of a prunable group:
the tensor it reads, how that tensor's indices map to channel classes, and its weights."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ._graph import attr_int, const_array
from .groups import Analysis
from .layout import SliceParam


@dataclass
class ConsumerView:
    """One consumer node reading a channel-carrying tensor."""

    node: ir.Node
    value: ir.Value  # the tensor it reads (input 0)
    axis: int  # channel axis of that tensor
    atoms: np.ndarray  # atom per index of that axis
    edit: SliceParam  # its weight_in edit

    @property
    def tensor(self) -> str:
        return self.value.name

    def weight(self) -> np.ndarray:
        return np.asarray(const_array(self.node.inputs[1]), dtype=np.float64)

    def column_sq(self) -> np.ndarray:
        """‖W[:, k]‖² for every index k of the input tensor (Conv: over kernel taps too)."""
        w = self.weight()
        op = self.node.op_type
        c = len(self.atoms)
        if op == "Conv":
            group = attr_int(self.node, "group", 1)
            o, s = w.shape[0], w.shape[1]
            per = (w.reshape(group, o // group, s, -1) ** 2).sum(axis=(1, 3))  # [group, s]
            return per.reshape(c)
        axis = self.edit.axis
        moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        return (moved**2).sum(axis=1)

    def contribution(self, mean: np.ndarray, drop: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
        """W[:, drop]·E[x_drop] per consumer output: what removing ``drop`` takes away from
        the pre-activation on average (Conv: summed over taps; ConvTranspose: per position).
        ``w``: another array of the weight's shape in place of W."""
        w = self.weight() if w is None else w
        op = self.node.op_type
        m = np.where(drop, mean, 0.0)
        if op == "Conv":
            group = attr_int(self.node, "group", 1)
            o, s = w.shape[0], w.shape[1]
            taps = w.reshape(group, o // group, s, -1).sum(axis=3)  # [group, o/g, s]
            return np.einsum("gos,gs->go", taps, m.reshape(group, s)).reshape(o)
        if op == "ConvTranspose":
            strides = self.node.attributes.get("strides")
            stride = float(np.prod(list(strides.value))) if strides is not None else 1.0
            return np.einsum("ko,k->o", w.reshape(w.shape[0], w.shape[1], -1).sum(axis=2), m) / stride
        if op == "Gemm":
            return w @ m if attr_int(self.node, "transB", 0) else m @ w
        return m @ w  # MatMul, W [K, N]


def consumer_views(analysis: Analysis, only_prunable: bool = True) -> list[ConsumerView]:
    """Every consumer of a (prunable) group, in graph order."""
    prunable_roots: set[int] = set()
    for g in analysis.groups:
        if g.prunable or not only_prunable:
            prunable_roots.update(g.classes.tolist())
    views = []
    for e in analysis.edits:
        if not (isinstance(e, SliceParam) and e.role == "weight_in"):
            continue
        value = e.node.inputs[0]
        layout = analysis.layouts.get(value)
        if layout is None or not prunable_roots.intersection(analysis.roots[layout.atoms].tolist()):
            continue
        views.append(ConsumerView(e.node, value, layout.axis, layout.atoms, e))
    return views
