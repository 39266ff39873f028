"""onnxprune's own counters: parameters and multiply-accumulates over inferred shapes.

MACs are per sample: a symbolic batch is fixed to 1 and the shapes inferred again (a dim that
merges the batch with a static count, unknown after load or named by the exporter, still counts
that count).  A model with
symbolic spatial or sequence dims is counted on real input shapes when the run knows them
(``input_shapes``: ``--input-shape``, or a calibration sample's shape): the dims are fixed
on a weightless copy of the graph, shapes are inferred again there (onnx, then
onnxruntime's symbolic pass), and each node of the model is counted on its copy's shapes.
Without them the count is per unit of the symbolic dims (see :func:`symbolic_dims`).

Only the main graph is counted: the nodes inside If/Loop/Scan bodies are not (which branch
runs, and how many times a body runs, is known only at run time; those bodies are never
pruned either).  The report names what was left out (``groups.control_flow_summary``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ._graph import all_graph_nodes, attr_int, dims, is_const, named_dims
from .fold import FOLD_LIMIT
from .shapes import _structure_proto, supplement_shapes
from .rewrite import removed_mask

InputShapes = dict[str, tuple[int, ...]]


def _is_param(tensor) -> bool:
    """Small integer and boolean constants are index and shape arithmetic (Reshape shapes,
    Slice bounds, pads, axes, and what ``load`` folds into constants), not parameters."""
    dtype = tensor.dtype
    small_index = tensor.size <= FOLD_LIMIT and (dtype.is_integer() or dtype == ir.DataType.BOOL)
    return not small_index


def count_params(model: ir.Model) -> int:
    """Elements of every constant tensor (initializers and ``Constant`` nodes), except
    integer and boolean ones of at most ``FOLD_LIMIT`` elements: so folding constant
    index arithmetic at load time leaves the count as it was."""
    total = sum(
        v.const_value.size for v in model.graph.initializers.values()
        if v.const_value is not None and _is_param(v.const_value)
    )
    for node in all_graph_nodes(model.graph):
        if node.op_type == "Constant":
            attr = node.attributes.get("value")
            if attr is not None and attr.type == ir.AttributeType.TENSOR and _is_param(attr.value):
                total += attr.value.size
    return int(total)


def _p(d: list[int | None] | None) -> int | None:
    if d is None:
        return None
    return math.prod(1 if x is None else x for x in d)


def _count_dims(value: ir.Value | None) -> list[int | None] | None:
    """Dims for counting: a symbolic dim counts as 1 (MACs are per sample, per token when
    the sequence is symbolic), except for the static factors of a product such as
    onnxruntime's ``197*batch`` (ViT's tokens merged with the batch before a Gemm)."""
    d = named_dims(value)
    if d is None:
        return None
    out: list[int | None] = []
    for x in d:
        if isinstance(x, str) and "*" in x:
            factors = [int(f) for f in x.split("*") if f.strip().isdigit()]
            out.append(math.prod(factors) if factors else None)
        else:
            out.append(x if isinstance(x, int) else None)
    return out


_COUNTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def node_macs(node: ir.Node) -> int:
    """MACs of one Conv/ConvTranspose/Gemm/MatMul node (0 for other ops or unknown shapes)."""
    op = node.op_type
    if op in ("Conv", "ConvTranspose") and len(node.inputs) > 1:
        w = dims(node.inputs[1])
        ref = node.outputs[0] if op == "Conv" else node.inputs[0]
        n = _p(_count_dims(ref))
        if w is None or n is None or any(x is None for x in w):
            return 0
        return n * math.prod(w[1:])
    if op in ("Gemm", "MatMul"):
        a, y = _count_dims(node.inputs[0]), _count_dims(node.outputs[0])
        if a is None or y is None or not a:
            return 0
        k = a[0] if (op == "Gemm" and attr_int(node, "transA", 0)) else a[-1]
        if k is None and len(node.inputs) > 1:  # A's K is symbolic (a Reshape to [N, -1]): B has it
            b = dims(node.inputs[1])
            if b and op == "Gemm" and len(b) == 2:
                k = b[1] if attr_int(node, "transB", 0) else b[0]
            elif b and op == "MatMul":
                k = b[-2] if len(b) >= 2 else b[0]
        return (_p(y) or 0) * (k or 1)
    return 0


def count_macs(model: ir.Model, input_shapes: InputShapes | None = None) -> int:
    """MACs of the main graph's convolutions and matrix products (on ``input_shapes`` when
    given, else as :func:`macs_by_node` counts without them)."""
    return int(sum(macs_by_node(model, input_shapes).values()))


def batch_one_shapes(model: ir.Model) -> InputShapes | None:
    """The declared input shapes with a symbolic batch fixed to 1, when the batch is the only
    symbolic dim: a dim inferred as an unnamed product of the batch and a static count
    (Swin's ``B·windows`` in a TorchScript export) would otherwise count as 1.  None when
    no input has a symbolic batch, or another dim is symbolic (counted per unit)."""
    if symbolic_dims(model):
        return None
    shapes: InputShapes = {}
    batch: set[str] = set()
    for v in model.graph.inputs:
        if v.shape is None or len(v.shape) < 2 or isinstance(v.shape[0], int):
            continue
        factors = str(getattr(v.shape[0], "value", v.shape[0])).split("*")
        batch.update(f.strip() for f in factors if not f.strip().isdigit())
        # A batch declared as a product (``7*batch``) keeps its static factor, as _count_dims does.
        shapes[v.name] = (math.prod(int(f) for f in factors if f.strip().isdigit()), *(int(d) for d in v.shape[1:]))
    return shapes if shapes and not _only_batch_dims(model, batch) else None


def _only_batch_dims(model: ir.Model, batch: set[str]) -> bool:
    """Whether every symbolic dim a counted node reads is a batch dim or a static multiple
    of one (``197*batch``): then the declared shapes count per sample exactly, and the
    inference on a copy (seconds on a large graph) is not needed."""
    for node in model.graph:
        if node.op_type not in _COUNTED:
            continue
        for v in (*node.inputs, *node.outputs):
            nd = named_dims(v)
            if v is not None and nd is None:  # rank unknown here: a copy may infer it
                return False
            for d in nd or ():
                if isinstance(d, int):
                    continue
                if d is None or not all(f.strip().isdigit() or f.strip() in batch for f in d.split("*")):
                    return False
    return True


def macs_by_node(model: ir.Model, input_shapes: InputShapes | None = None) -> dict[int, int]:
    """``id(node)`` -> MACs of every main-graph node (0 for ops that are not counted), with
    the graph inputs named in ``input_shapes`` fixed to those dims (on a copy: ``model``
    keeps its shapes).  Without them, a symbolic batch is fixed to 1 when it is the only
    symbolic dim (:func:`batch_one_shapes`); otherwise the graph's own shapes count."""
    nodes = list(model.graph)
    input_shapes = input_shapes or batch_one_shapes(model)
    if not input_shapes:
        return {id(n): node_macs(n) for n in nodes}
    fixed = fixed_shape_copy(model, input_shapes)
    return {id(n): node_macs(m) for n, m in zip(nodes, fixed.graph)}


def fixed_shape_copy(model: ir.Model, input_shapes: InputShapes) -> ir.Model:
    """The graph without its large weights (their shapes stay, as typed inputs), with the
    named inputs fixed to ``input_shapes`` and every intermediate shape inferred again:
    its nodes are ``model``'s, in the same order."""
    from onnx_ir.passes.common import ShapeInferencePass

    proto = _structure_proto(model)
    for vi in proto.graph.input:
        dims_ = input_shapes.get(vi.name)
        if dims_ is None:
            continue
        shape = vi.type.tensor_type.shape
        del shape.dim[:]
        for d in dims_:
            shape.dim.add().dim_value = int(d)
    copy = ir.from_proto(proto)
    ShapeInferencePass(strict_mode=False, data_prop=True)(copy)
    supplement_shapes(copy)
    return copy


def symbolic_dims(model: ir.Model) -> dict[str, list[str]]:
    """Input name -> the symbolic dims MACs are counted per unit of: every symbolic dim
    but a leading (batch) dim of an input of rank 2 or more."""
    out: dict[str, list[str]] = {}
    for v in model.graph.inputs:
        if v.shape is None:
            continue
        names = [str(getattr(d, "value", d) or "?") for i, d in enumerate(v.shape)
                 if not isinstance(d, int) and not (i == 0 and len(v.shape) >= 2)]
        if names:
            out[v.name] = names
    return out


@dataclass
class _Plan:
    """The removal-independent part of :func:`estimate_after`: the counts before; per sliced
    constant input, the atoms of each sliced axis and the MACs that shrink with it; per sliced
    constant, its size, its sliced readers and whether a reader leaves it whole."""

    params: int
    macs: int
    sliced: list[tuple[int, list[np.ndarray]]] = field(default_factory=list)  # (MACs, atoms per axis)
    constants: list[tuple[int, list[int], bool]] = field(default_factory=list)  # (size, indices into sliced, read whole)
    products: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (MACs, atoms): products of computed tensors
    # Every atom list above as one array, for :meth:`shares`: per sliced input its lists'
    # indices, per product its list's index.
    sliced_axes: list[list[int]] = field(default_factory=list)
    product_lists: list[int] = field(default_factory=list)
    _roots: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    _starts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    _sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def index(self, roots: np.ndarray) -> None:
        """Gather every atom list's class roots (``roots``: the analysis's atom -> root)."""
        lists = [a for _, atoms in self.sliced for a in atoms] + [a for _, a in self.products]
        counts = [len(a) for a in lists]
        self.sliced_axes, k = [], 0
        for _, atoms in self.sliced:
            self.sliced_axes.append(list(range(k, k + len(atoms))))
            k += len(atoms)
        self.product_lists = list(range(k, k + len(self.products)))
        self._sizes = np.array(counts, dtype=np.int64)
        self._starts = np.cumsum(self._sizes) - self._sizes
        flat = np.concatenate([np.asarray(a, dtype=np.int64) for a in lists]) if lists else np.zeros(0, np.int64)
        self._roots = roots[flat]

    def shares(self, gone: np.ndarray) -> list[float]:
        """Per atom list, the share of its atoms kept when the roots ``gone`` go (1.0 for an
        empty list): the mean of a boolean list, exactly."""
        if not len(self._sizes):
            return []
        running = np.concatenate([[0], np.cumsum(~gone[self._roots], dtype=np.int64)])
        total = running[self._starts + self._sizes] - running[self._starts]
        out = np.ones(len(self._sizes))
        some = self._sizes > 0
        out[some] = total[some] / self._sizes[some]
        return out.tolist()


def _plan(analysis) -> _Plan:
    from .layout import SliceParam

    model = analysis.model
    # The same per-node counts as the MACs before and after: on real shapes when known.
    table = analysis.node_macs if analysis.node_macs is not None else macs_by_node(model)
    axes: dict[tuple[int, int], dict[int, np.ndarray]] = {}
    first: dict[tuple[int, int], SliceParam] = {}
    for e in analysis.edits:
        if isinstance(e, SliceParam):
            key = (id(e.node), e.index)
            axes.setdefault(key, {})[e.axis] = np.asarray(e.atoms)
            first.setdefault(key, e)
    plan = _Plan(count_params(model), int(sum(table.values())))
    readers: dict[int, tuple[ir.Value, list[int]]] = {}
    for key, by_axis in axes.items():
        e = first[key]
        value = e.node.inputs[e.index]
        if value is not None:
            readers.setdefault(id(value), (value, []))[1].append(len(plan.sliced))
        macs = table.get(id(e.node), 0) if key[1] == 1 and e.node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") else 0
        plan.sliced.append((macs, list(by_axis.values())))
    for value, idx in readers.values():
        size = math.prod(d if isinstance(d, int) else 1 for d in (value.shape or ()))
        whole = value.is_graph_output() or any((id(u.node), u.idx) not in axes for u in value.uses())
        plan.constants.append((size, idx, whole))
    # A product of two computed tensors (QKᵀ, attention·V) has no weight to slice: it
    # shrinks with the channels (heads) its operands carry.
    for node in model.graph:
        if node.op_type != "MatMul":
            continue
        if any(is_const(v) for v in node.inputs):
            # A constant weight whose left operand carries the channels on a batch axis
            # (MatMul over W of an NCHW tensor): the layout passes through, the weight is not
            # sliced, and the MACs shrink with the kept channels.
            lay = analysis.layouts.get(node.inputs[0])
            if lay is not None and len(lay) and analysis.layouts.get(node.outputs[0]) is lay:
                plan.products.append((table.get(id(node), 0), np.asarray(lay.atoms)))
            continue
        lay = analysis.layouts.get(node.inputs[0]) or analysis.layouts.get(node.inputs[1])
        if lay is not None and len(lay):
            plan.products.append((table.get(id(node), 0), np.asarray(lay.atoms)))
    plan.index(np.asarray(analysis.roots))
    return plan


def estimate_after(analysis, removed) -> tuple[int, int]:
    """Params and MACs after removing the classes in ``removed``, without rewriting.

    Every sliced constant shrinks by the product of its axes' kept fractions; a
    Conv/ConvTranspose/Gemm/MatMul's MACs are proportional to its weight's size, so they
    shrink by the same factor as the weight.  Used to bisect budgets quickly: what does not
    depend on ``removed`` is computed once per analysis.
    """
    if analysis.estimate_plan is None:
        analysis.estimate_plan = _plan(analysis)
    plan = analysis.estimate_plan
    gone = removed_mask(analysis, removed)
    # Every atom list's kept share at once (one gather and one segment sum, not a numpy
    # call per list: the allocation asks for thousands of estimates).
    kept = plan.shares(gone)
    params, macs = plan.params, plan.macs
    fs = [math.prod(kept[k] for k in axes) for axes in plan.sliced_axes]
    for (node_mac, _), f in zip(plan.sliced, fs):
        macs -= int(round(node_mac * (1 - f)))
    for size, idx, whole in plan.constants:
        # As the rewrite does it (_graph.replace_const): a constant shared by several readers
        # gives each reader that loses entries its own sliced copy, and stays as it is while
        # any reader keeps all of it.
        cut = [fs[i] for i in idx if fs[i] < 1]
        kept_whole = whole or len(cut) < len(idx)
        params += int(round(sum(size * f for f in cut) + (size if kept_whole else 0))) - size
    for (node_mac, _), k in zip(plan.products, plan.product_lists):
        macs -= int(round(node_mac * (1 - kept[k])))
    return params, macs
