"""Small helpers over onnx-ir shared by the stages: constants, shapes, attributes.

The passes built on them live in their own modules: ``fold`` (constant and shape-read
folding at load), ``canonical`` (exporter idioms rewritten for the analysis), ``shapes``
(symbolic shapes from onnxruntime).
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import onnx
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


def named_dims(value: ir.Value | None) -> list[int | str | None] | None:
    """Dims with ints where static, names where the symbol is a real one, None where
    unknown (an ``unk__N`` placeholder proves nothing); None when the rank is unknown."""
    if value is None:
        return None
    if value.shape is None:
        d = dims(value)  # a constant without a recorded shape
        return None if d is None else list(d)
    out: list[int | str | None] = []
    for x in value.shape:
        out.append(x if isinstance(x, int) else None if _generated(x) else x.value)
    return out


def const_ints(node: ir.Node, index: int, attr: str) -> list[int] | None:
    """An int list given as constant input ``index`` (newer opsets) or attribute ``attr``."""
    if index < len(node.inputs) and node.inputs[index] is not None:
        arr = const_array(node.inputs[index])
        return None if arr is None else [int(x) for x in np.asarray(arr).reshape(-1)]
    return attr_ints(node, attr)


def _generated(d) -> bool:
    """A dim no one named: unknown, or one of the ``unk__N`` placeholders onnx invents."""
    name = getattr(d, "value", d)
    return name is None or (isinstance(name, str) and name.startswith("unk__"))


def remove_dead(graph: ir.Graph, values: list[ir.Value | None]) -> int:
    """Remove what computed ``values`` once nothing reads it: the producing node (if in
    ``graph``) or the initializer, then, in turn, whatever only the removed nodes read.
    Graph inputs and outputs stay.  Returns how many nodes and initializers went.

    The one dead-node remover of onnxprune (the folds, the canonicalisations and the
    rewrite call it on the values they stopped reading).  Not onnx-ir's
    ``RemoveUnusedNodesPass``: that sweeps the whole model, so it would also delete the dead
    nodes and unused initializers the input already had (the counted params would change
    with whether a fold happened), and it strips unused optional outputs off live nodes,
    looking up every node's schema on each call.
    """
    todo = [v for v in values if v is not None]
    removed = 0
    while todo:
        v = todo.pop()
        if v.uses() or v.is_graph_output() or v.is_graph_input():
            continue
        node = v.producer()
        if node is None:
            if v.is_initializer() and graph.initializers.get(v.name) is v:
                graph.initializers.pop(v.name)  # a weight only the removed nodes read
                removed += 1
            continue
        if node.graph is not graph or any(o.uses() or o.is_graph_output() for o in node.outputs):
            continue
        inputs = [i for i in node.inputs if i is not None]
        graph.remove(node, safe=True)
        removed += 1
        todo.extend(inputs)
    return removed


def inline_external(proto: onnx.ModelProto, values: Iterable[ir.Value]) -> onnx.ModelProto:
    """``proto`` with the initializers among ``values`` that live in the input's external-data
    file given their bytes: a model handed to onnxruntime as bytes, saved elsewhere or sent to
    a worker finds nothing at the file's relative location (onnxruntime refused it)."""
    external = {v.name: v.const_value for v in values if isinstance(v.const_value, ir.ExternalTensor)}
    if external:
        for t in proto.graph.initializer:
            src = external.get(t.name)
            if src is not None and t.data_location == onnx.TensorProto.EXTERNAL:
                t.raw_data = src.tobytes()
                del t.external_data[:]
                t.data_location = onnx.TensorProto.DEFAULT
    return proto


def model_proto(model: ir.Model) -> onnx.ModelProto:
    """``ir.to_proto(model)`` with external tensors inline (see :func:`inline_external`)."""
    return inline_external(ir.to_proto(model), model.graph.initializers.values())


def copy_model(model: ir.Model) -> ir.Model:
    """A deep copy (through protobuf) whose external tensors still read the input's file:
    the copy's tensors keep the relative location but not the folder it is relative to."""
    out = ir.from_proto(ir.to_proto(model))
    base = next((v.const_value.base_dir for v in model.graph.initializers.values()
                 if isinstance(v.const_value, ir.ExternalTensor) and v.const_value.base_dir), None)
    if base:
        ir.external_data.set_base_dir(out.graph, base)
    return out
