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
    new_name = _unique_name(graph, f"{value.name}_{node.name or node.op_type}_{index}")
    new_value = ir.Value(name=new_name, shape=ir.Shape(array.shape), const_value=ir.tensor(array, name=new_name))
    new_value.dtype = new_value.const_value.dtype
    graph.register_initializer(new_value)
    node.replace_input_with(index, new_value)


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
