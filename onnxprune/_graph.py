"""Small helpers over onnx-ir shared by the stages: constants, shapes, attributes."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import onnx_ir as ir


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The array behind ``value`` if it is an initializer or a ``Constant`` output, else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
        for key, attr in node.attributes.items():
            if key == "value":
                return attr.value.numpy()
            if key in ("value_float", "value_int"):
                return np.asarray(attr.value, dtype=np.float32 if key == "value_float" else np.int64)
            if key in ("value_floats", "value_ints"):
                return np.asarray(list(attr.value), dtype=np.float32 if key == "value_floats" else np.int64)
    return None


def is_const(value: ir.Value | None) -> bool:
    """True when ``value`` holds a compile-time constant onnxprune can read and rewrite."""
    if value is None:
        return False
    if value.const_value is not None:
        return True
    node = value.producer()
    return node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx")


def replace_const(node: ir.Node, index: int, array: np.ndarray, graph: ir.Graph) -> None:
    """Give input ``index`` of ``node`` the constant ``array``.

    A constant read only by this node is rewritten where it lives (initializer or
    ``Constant`` node) so the model keeps its style; a shared one gets a private copy,
    because its other readers may need different slices.
    """
    value = node.inputs[index]
    assert value is not None
    shared = len(value.uses()) > 1 or value.is_graph_output()
    if not shared and value.const_value is not None and value.is_initializer():
        value.const_value = ir.tensor(array, name=value.name)
        value.shape = ir.Shape(array.shape)
        return
    producer = value.producer()
    if not shared and producer is not None and producer.op_type == "Constant":
        for key in list(producer.attributes):
            producer.attributes.pop(key)
        producer.attributes["value"] = ir.AttrTensor("value", ir.tensor(array, name=value.name))
        value.shape = ir.Shape(array.shape)
        return
    node.replace_input_with(index, new_initializer(graph, f"{value.name}_{node.name or node.op_type}_{index}", array))


def new_initializer(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as an initializer under a name no other value of ``graph`` uses."""
    name = _unique_name(graph, base)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), const_value=ir.tensor(array, name=name))
    value.dtype = value.const_value.dtype
    graph.register_initializer(value)
    return value


def _unique_name(graph: ir.Graph, base: str) -> str:
    taken = set(graph.initializers)
    for n in graph:
        taken.update(o.name for o in n.outputs if o.name)
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def dims(value: ir.Value | None) -> list[int | None] | None:
    """Static dims of ``value`` (None for symbolic ones), or None when the rank is unknown."""
    if value is None:
        return None
    if value.shape is None:
        arr_shape = value.const_value.shape if value.const_value is not None else None
        if arr_shape is None:
            return None
        return [int(d) for d in arr_shape]
    return [d if isinstance(d, int) else None for d in value.shape]


def rank(value: ir.Value | None) -> int | None:
    d = dims(value)
    return None if d is None else len(d)


def attr_int(node: ir.Node, name: str, default: int) -> int:
    a = node.attributes.get(name)
    return default if a is None else int(a.value)


def attr_ints(node: ir.Node, name: str) -> list[int] | None:
    a = node.attributes.get(name)
    return None if a is None else [int(x) for x in a.value]


def attr_str(node: ir.Node, name: str, default: str) -> str:
    a = node.attributes.get(name)
    return default if a is None else str(a.value)


def opset(model_or_graph: ir.Model | ir.Graph) -> int:
    """The default-domain opset the graph is written in."""
    imports = model_or_graph.opset_imports
    return int(imports.get("", imports.get("ai.onnx", 0)))


def node_label(node: ir.Node) -> str:
    """How reports name a node: ``OpType 'name'``."""
    return f"{node.op_type} '{node.name}'" if node.name else node.op_type


def all_graph_nodes(graph: ir.Graph) -> Iterator[ir.Node]:
    """Every node of ``graph`` and of its subgraphs, recursively."""
    for node in graph:
        yield node
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield from all_graph_nodes(attr.value)
            elif attr.type == ir.AttributeType.GRAPHS:
                for g in attr.value:
                    yield from all_graph_nodes(g)


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
        arr = np.asarray(arr)
        name = f"{node.name or node.op_type}_static"
        const = ir.node("Constant", [], attributes={"value": ir.tensor(arr)}, name=name)
        value = const.outputs[0]
        value.shape, value.dtype = ir.Shape(arr.shape), ir.tensor(arr).dtype
        graph.insert_before(node, const)
        ir.convenience.replace_all_uses_with(out, value)
        name = out.name
        graph.remove(node, safe=True)
        value.name = name
        derived.add(value)
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


def prepare_graph(graph: ir.Graph) -> None:
    """Normalise exporter idioms before the analysis (the model computes the same)."""
    inline_constant_identities(graph)
    fold_static_shapes(graph)
