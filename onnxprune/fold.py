"""Load-time folding: exporter idioms that compute constants at run time become constants.

- shared constants read through ``Identity`` nodes are read directly
  (:func:`inline_constant_identities`);
- reads of *static* dims and the integer arithmetic on them (``torch.chunk`` bounds:
  Shape → Gather → Add → Div → Mul) become constants (:func:`fold_static_shapes`);
- small constant-only subgraphs (the TorchScript exporter's ``F.pad`` pads) are evaluated
  with onnx's reference evaluator (:func:`fold_constant_nodes`).

:func:`prepare_graph` runs them, with the attention idioms of :mod:`canonical`, until
nothing changes; ``load.normalise`` alternates it with shape inference.  The model
computes the same values.

Why our own folder and not onnxscript's optimizer (``fold_constants``), tried on branch
``issue16-passes``: on TorchScript exports onnxscript's folder stops at shape reads ours
takes (Swin-T: 327 of 477 Shape nodes left, ours leaves 24), so ``load.normalise`` needed
17 rounds of shape inference instead of 7 and loading Swin-T took 20.5 CPU-s instead of
9.6.  No topological sort is needed (nor onnx-ir's ``TopologicalSortPass``): onnx's checker
refuses an unsorted graph at load, and every fold inserts its nodes before the node it
replaces.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from ._graph import attr_int, attr_ints, const_array, dims, is_const, opset, remove_dead
from .canonical import fold_attention_idioms


def _shape_range(node: ir.Node) -> tuple[list[int | None], int, int] | None:
    """Input dims of a ``Shape`` node and its normalised ``start``/``end`` (opset 15)."""
    d = dims(node.inputs[0])
    if d is None:
        return None
    r = len(d)
    start, end = attr_int(node, "start", 0), attr_int(node, "end", r)
    start = min(max(start + r if start < 0 else start, 0), r)
    end = min(max(end + r if end < 0 else end, 0), r)
    return d, start, end


def _fold_shape_node(node: ir.Node, args: list[np.ndarray | None]) -> np.ndarray | None:
    """Value of ``node`` when it reads only static dims or folded integer constants."""
    op = node.op_type
    if op == "Shape":
        info = _shape_range(node)
        if info is None:
            return None
        d, start, end = info
        sub = d[start:end]
        return None if any(x is None for x in sub) else np.asarray(sub, dtype=np.int64)
    if op == "Gather" and args[1] is not None and attr_int(node, "axis", 0) == 0:
        src = node.inputs[0].producer()
        if args[0] is not None:
            data = args[0]
        elif src is not None and src.op_type == "Shape" and _shape_range(src) is not None:
            d, start, end = _shape_range(src)
            data = np.asarray([-1 if x is None else x for x in d[start:end]], dtype=np.int64)
            picked = np.take(data, args[1], axis=0)
            return None if (picked < 0).any() else picked  # a symbolic dim was read
        else:
            return None
        return np.take(data, args[1], axis=0)
    if any(a is None for a in args) or not all(np.issubdtype(a.dtype, np.integer) for a in args):
        return None
    if op in ("Add", "Sub", "Mul") and len(args) == 2:
        return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}[op](*args).astype(args[0].dtype)
    if op == "Div" and len(args) == 2 and not (args[1] == 0).any():
        return np.trunc(np.true_divide(*args)).astype(args[0].dtype)  # C-style integer division
    if op == "Neg" and len(args) == 1:
        return -args[0]
    if op == "Identity" and len(args) == 1:
        return args[0]
    if op == "Cast" and len(args) == 1:
        to = attr_int(node, "to", 0)
        if to not in (int(ir.DataType.INT64), int(ir.DataType.INT32)):
            return None
        return args[0].astype(np.int64 if to == int(ir.DataType.INT64) else np.int32)
    if op == "Concat" and args:
        return np.concatenate([np.atleast_1d(a) for a in args], axis=attr_int(node, "axis", 0))
    if op in ("Unsqueeze", "Squeeze"):
        axes = [int(x) for x in args[1].reshape(-1)] if len(args) > 1 else attr_ints(node, "axes")
        if op == "Unsqueeze" and axes is not None:
            out = args[0]
            for a in sorted(x + args[0].ndim + len(axes) if x < 0 else x for x in axes):
                out = np.expand_dims(out, a)
            return out
        if op == "Squeeze":
            return np.squeeze(args[0], axis=None if axes is None else tuple(axes))
    return None


def fold_static_shapes(graph: ir.Graph) -> int:
    """Replace run-time reads of *static* dims by constants, and fold the integer
    arithmetic done on them (the TorchScript exporter computes ``torch.chunk`` bounds
    as Shape→Gather→Add→Div→Mul even where the channel count is fixed).

    The model computes the same values afterwards; the channel count is no longer read at
    run time, and the op handlers see (and rewrite) the bounds as constants.  Only
    values derived from a ``Shape`` are folded.  Returns the number of nodes replaced.
    """
    derived: set[ir.Value] = set()
    folded = 0
    for node in list(graph):
        if node.domain not in ("", "ai.onnx") or len(node.outputs) != 1 or node.op_type == "Constant":
            continue
        out = node.outputs[0]
        if out.is_graph_output():
            continue
        if node.op_type == "Shape":
            pass
        elif node.op_type == "Gather" and node.inputs[0] is not None and (
            node.inputs[0] in derived
            or (node.inputs[0].producer() is not None and node.inputs[0].producer().op_type == "Shape")
        ):
            pass
        elif not any(v in derived for v in node.inputs if v is not None):
            continue
        args = [const_array(v) if v is not None else None for v in node.inputs]
        if node.op_type not in ("Shape", "Gather") and not all(
            v is None or v in derived or is_const(v) for v in node.inputs
        ):
            continue
        try:
            arr = _fold_shape_node(node, args)
        except (ValueError, IndexError, TypeError):
            arr = None
        if arr is None or arr.size > 64:
            continue
        derived.update(_replace_by_constants(graph, node, [np.asarray(arr)], "static"))
        folded += 1
    for node in list(graph):  # Shape nodes whose every read was folded
        if node.op_type == "Shape" and not node.outputs[0].uses() and not node.outputs[0].is_graph_output():
            graph.remove(node, safe=True)
    return folded


def inline_constant_identities(graph: ir.Graph) -> int:
    """Let the readers of ``Identity(constant)`` read the constant itself.

    The TorchScript exporter shares equal initializers (the zero biases of folded
    BatchNorms, say) through Identity nodes; the op handlers then see constants, and the
    rewrite gives each reader that needs a different slice its own copy.
    Returns the number of Identity nodes removed.
    """
    # Not onnx-ir's IdentityEliminationPass: it removes every Identity (not only those over
    # constants), enters subgraphs (an Identity writing a branch output renames the outer
    # value it reads) and hands a graph output's name to its source; load changes nothing
    # but the readers of shared constants.
    removed = 0
    for node in list(graph):
        if node.op_type != "Identity" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 1:
            continue
        source, out = node.inputs[0], node.outputs[0]
        if not is_const(source) or out.is_graph_output():
            continue
        ir.convenience.replace_all_uses_with(out, source)
        graph.remove(node, safe=True)
        removed += 1
    return removed


# Folding is for index and shape arithmetic: a node whose inputs and outputs all have at
# most this many elements.  Weights (and nodes that read them) are left alone.
FOLD_LIMIT = 64
_NOT_FOLDED = frozenset(
    {
        "Constant", "Identity",  # already constants / handled by inline_constant_identities
        "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
        "Multinomial", "Bernoulli", "Dropout",  # non-deterministic (Dropout in training mode)
    }
)


def _small_const(value: ir.Value) -> np.ndarray | None:
    """The array of ``value`` when it is a constant of at most FOLD_LIMIT elements that
    cannot be overridden at run time (an initializer that is not a graph input, or a
    ``Constant`` output); the size is checked before any data is read."""
    if value.is_graph_input():
        return None
    if value.const_value is not None:
        if value.const_value.size > FOLD_LIMIT:
            return None
        arr = value.const_value.numpy()
    else:
        node = value.producer()
        if node is None or node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            return None
        attr = node.attributes.get("value")
        if attr is not None and attr.type == ir.AttributeType.TENSOR and attr.value.size > FOLD_LIMIT:
            return None
        arr = const_array(value)
    if arr is None or arr.size > FOLD_LIMIT or arr.dtype.kind not in "biuf":
        return None
    return arr


def _has_subgraph(node: ir.Node) -> bool:
    return any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())


def _evaluate(node: ir.Node, args: list[np.ndarray | None], opset_version: int) -> list[np.ndarray] | None:
    """Run ``node`` alone with onnx's reference evaluator on the constant ``args``.

    None when the result is not known to be small (onnx shape inference on the one-node
    model must give static output shapes of at most FOLD_LIMIT elements before anything
    is evaluated), or when evaluation fails or disagrees with the inferred types.
    """
    import onnx
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    proto = ir.serde.serialize_node(node)
    in_names = [f"in{k}" if a is not None else "" for k, a in enumerate(args)]
    out_names = [f"out{k}" if v.name else "" for k, v in enumerate(node.outputs)]
    del proto.input[:], proto.output[:]
    proto.domain = ""  # "ai.onnx" is the default domain too; the one-node model imports ""
    proto.input.extend(in_names)
    proto.output.extend(out_names)
    inits = [numpy_helper.from_array(a, n) for a, n in zip(args, in_names) if a is not None]
    graph = helper.make_graph(
        [proto], "fold", [], [helper.make_empty_tensor_value_info(n) for n in out_names if n], initializer=inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset_version)])
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
        types = {o.name: o.type.tensor_type for o in inferred.graph.output}
        expected: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        for name in filter(None, out_names):
            t = types.get(name)
            if t is None or not t.elem_type or not t.HasField("shape"):
                return None
            if not all(d.HasField("dim_value") for d in t.shape.dim):
                return None
            shape = tuple(int(d.dim_value) for d in t.shape.dim)
            if math.prod(shape) > FOLD_LIMIT:
                return None
            expected[name] = (shape, helper.tensor_dtype_to_np_dtype(t.elem_type))
        results = ReferenceEvaluator(model).run(None, {})
    except Exception:  # an op the evaluator or shape inference does not cover: leave it
        return None
    arrays = []
    for name, res in zip(filter(None, out_names), results):
        arr = np.asarray(res)
        shape, dtype = expected[name]
        if arr.shape != shape or arr.dtype != dtype or arr.dtype.kind not in "biuf":
            return None
        arrays.append(arr)
    return arrays


def _replace_by_constants(graph: ir.Graph, node: ir.Node, arrays: list[np.ndarray], tag: str) -> list[ir.Value]:
    """Replace ``node`` by one ``Constant`` per named output, holding ``arrays`` in order.

    The constants take over the outputs' names (an output nobody reads gets none);
    inputs of ``node`` left unread (``Constant`` nodes, initializers that are not graph
    inputs) are removed.
    """
    outs = [o for o in node.outputs if o.name]
    assert len(outs) == len(arrays)
    new_values = []
    base = node.name or node.op_type
    for k, (out, arr) in enumerate(zip(outs, arrays)):
        if not out.uses() and not out.is_graph_output():
            continue
        tensor = ir.tensor(arr)
        const = ir.node("Constant", [], attributes={"value": tensor}, name=f"{base}_{tag}" + (f"_{k}" if k else ""))
        value = const.outputs[0]
        value.shape, value.dtype = ir.Shape(arr.shape), tensor.dtype
        graph.insert_before(node, const)
        ir.convenience.replace_all_uses_with(out, value)
        new_values.append((value, out.name))
    inputs = [v for v in dict.fromkeys(node.inputs) if is_const(v)]  # (a Shape's source stays)
    graph.remove(node, safe=True)
    for value, name in new_values:
        value.name = name
    remove_dead(graph, inputs)
    return [v for v, _ in new_values]


def fold_constant_nodes(graph: ir.Graph) -> int:
    """Replace default-domain nodes that compute small values from constants only by
    ``Constant`` nodes holding those values, evaluated exactly.

    The TorchScript exporter writes every ``F.pad`` as a Pad whose pads come from
    ConstantOfShape → Concat → Reshape → Slice → Transpose → Reshape → Cast over
    constants; onnx shape inference stops at such a Pad and the op handlers cannot read
    the pads.  Nodes with subgraphs, non-deterministic ops, graph outputs and anything
    reading or producing more than FOLD_LIMIT elements are left alone.  One pass in
    topological order folds whole chains.  Returns the number of nodes replaced.
    """
    version = opset(graph)
    if version < 1:
        return 0
    folded = 0
    for node in list(graph):
        if node.domain not in ("", "ai.onnx") or node.op_type in _NOT_FOLDED or _has_subgraph(node):
            continue
        if not node.inputs or all(v is None for v in node.inputs):
            continue
        if any(o.is_graph_output() for o in node.outputs) or not any(o.name for o in node.outputs):
            continue
        args = []
        for v in node.inputs:
            arr = None if v is None else _small_const(v)
            if v is not None and arr is None:
                break
            args.append(arr)
        else:
            arrays = _evaluate(node, args, version)
            if arrays is not None:
                _replace_by_constants(graph, node, arrays, "folded")
                folded += 1
    return folded


def prepare_graph(graph: ir.Graph) -> int:
    """Normalise exporter idioms before the analysis (the model computes the same).

    Constants shared through Identity nodes are read directly; static shape reads and
    small constant-only subgraphs (index and shape arithmetic) become ``Constant`` nodes,
    and the attention idioms of :mod:`canonical` are rewritten.  Folding the one can unlock
    the other, so all run until nothing changes.  Shape
    reads fold only where shapes are known: run shape inference and call this again
    (``load.load_model`` does).  Returns the number of nodes replaced or removed.
    """
    changed = inline_constant_identities(graph)
    for _ in range(16):
        n = fold_static_shapes(graph) + fold_constant_nodes(graph) + fold_attention_idioms(graph)
        changed += n
        if not n:
            break
    return changed
