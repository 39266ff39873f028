"""Small helpers over onnx-ir shared by the stages: constants, shapes, attributes."""

from __future__ import annotations

import contextlib
import io
import logging
import math
from pathlib import Path
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


RESTRUCTURED = "onnxprune.restructured"  # graph.meta key: how many attention idioms load folded


def fold_attention_idioms(graph: ir.Graph) -> int:
    """The attention folds below, in the order one enables the next; returns how many, and
    counts them in ``graph.meta[RESTRUCTURED]`` (prune then checks the values they compute)."""
    n = fold_packed_projections(graph) + fold_batch_merge_transposes(graph)
    graph.meta[RESTRUCTURED] = graph.meta.get(RESTRUCTURED, 0) + n
    return n


def fold_batch_merge_transposes(graph: ir.Graph) -> int:
    """Replace ``Reshape → Transpose → Reshape`` chains that hide the head axis in the batch
    axis by the Transpose (and head split) they amount to.  Returns the number of folds.

    Two exporter idioms, both with shapes read at run time:

    - the dynamo exporter's kᵀ of attention: ``[B, H, T, d] → [B·H, T, d] → [B·H, d, T] →
      [B, H, d, T]`` (leading axes merged, moved behind, split back) is one Transpose;
    - ``nn.MultiheadAttention``'s heads: ``[T, B, H·d] → [T, B·H, d] → [B·H, T, d] →
      [B, H, T, d]`` (the head axis split off the channels and merged into the batch) is
      ``Reshape [T, B, H, d]`` then Transpose.

    Each fold is taken only when the dims prove it (equal static dims and equal named
    symbols); the graph computes the same values, and the head axis stays visible to the
    analysis.
    """
    folded = 0
    for r2 in list(graph):
        if r2.op_type != "Reshape" or r2.domain not in ("", "ai.onnx") or r2.graph is not graph:
            continue
        t = r2.inputs[0].producer() if r2.inputs[0] is not None else None
        if t is None or t.op_type != "Transpose" or len(t.outputs[0].uses()) != 1:
            continue
        r1 = t.inputs[0].producer() if t.inputs[0] is not None else None
        if r1 is None or r1.op_type != "Reshape" or len(r1.outputs[0].uses()) != 1:
            continue
        if any(v.is_graph_output() for v in (r1.outputs[0], t.outputs[0], r2.outputs[0])):
            continue
        x = r1.inputs[0]
        dx, d1, d2 = named_dims(x), named_dims(r1.outputs[0]), named_dims(r2.outputs[0])
        perm = attr_ints(t, "perm")
        if dx is None or d1 is None or d2 is None or perm is None or len(perm) != len(d1):
            continue
        plan = _merged_leading(dx, d1, d2, perm) or _heads_into_batch(dx, d1, d2, perm)
        if plan is None:
            continue
        split, new_perm = plan
        out = r2.outputs[0]
        src = x
        if split is not None:  # [lead..., B, H·d] -> [lead..., B, H, d]; 0 copies the input dim
            shape = new_initializer(graph, f"{r1.name or 'Reshape'}_heads_shape", np.array(split, dtype=np.int64))
            src = _new_node(graph, r2, "Reshape", [x, shape], f"{r1.name or 'Reshape'}_heads", x.dtype)
        y = _new_node(graph, r2, "Transpose", [src], f"{t.name or 'Transpose'}_unmerged", out.dtype,
                      [ir.AttrInt64s("perm", new_perm)])
        y.shape = out.shape
        ir.convenience.replace_all_uses_with(out, y)
        name = out.name
        dropped = [r2.inputs[1], r1.inputs[1]]
        graph.remove([r2, t, r1], safe=True)
        y.name = name
        _remove_dead(graph, dropped)
        folded += 1
    return folded


def fold_packed_projections(graph: ir.Graph) -> int:
    """Split a packed projection (Q, K and V in one weight) into one MatMul (+ bias Add) per
    part.  Returns the number of packed projections split.

    ``x·W + b`` with ``W [C, k·E]`` is reshaped to ``[..., k, rest...]`` (``E = Π rest``) and
    each part is picked by ``Gather(axis 0, i)`` once the k axis is in front, in one of two
    ways the exporters write:

    - ``nn.MultiheadAttention``: ``Reshape [..., k, E] → Unsqueeze(0) → Transpose`` (k axis
      in front, the new axis in its place) ``→ Squeeze``;
    - Swin's ``qkv.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)``: one Transpose with the k
      axis first.

    A tensor whose channel axis holds a different channel at each of the k positions is
    beyond one channel axis per tensor; ``x·W[:, iE:(i+1)E] + b[iE:(i+1)E]`` (reshaped to
    ``rest`` and transposed like the packed tensor) computes part i directly.  Taken only
    when the whole chain is exactly that; the weights are the same numbers, split.
    """
    folded = 0
    for rs in list(graph):
        if rs.op_type != "Reshape" or rs.graph is not graph:
            continue
        chain = _packed_chain(rs)
        if chain is None:
            continue
        gathers, matmul, add, lead, k, rest, perm = chain
        e = int(np.prod(rest))
        x, w = matmul.inputs[0], const_array(matmul.inputs[1])
        bias = const_array(add.inputs[1 if add.inputs[0] is matmul.outputs[0] else 0]) if add is not None else None
        base = matmul.name or "MatMul"
        dead = [g.inputs[0] for g in gathers]
        for g in gathers:
            i = int(const_array(g.inputs[1])) % k
            y = _new_node(graph, g, "MatMul", [x, new_initializer(graph, f"{base}_part{i}_w",
                          np.ascontiguousarray(w[:, i * e:(i + 1) * e]))], f"{base}_part{i}", x.dtype)
            if bias is not None:
                y = _new_node(graph, g, "Add", [y, new_initializer(graph, f"{base}_part{i}_b",
                              np.ascontiguousarray(bias[i * e:(i + 1) * e]))], f"{base}_part{i}_bias", x.dtype)
            if len(rest) > 1:
                shape = new_initializer(graph, f"{base}_part{i}_shape", np.array([0] * lead + rest, dtype=np.int64))
                y = _new_node(graph, g, "Reshape", [y, shape], f"{base}_part{i}_split", x.dtype)
            if perm is not None and perm != sorted(perm):
                y = _new_node(graph, g, "Transpose", [y], f"{base}_part{i}_perm", x.dtype,
                              [ir.AttrInt64s("perm", perm)])
            out = g.outputs[0]
            y.shape = out.shape
            ir.convenience.replace_all_uses_with(out, y)
            name = out.name
            graph.remove(g, safe=True)
            y.name = name
        _remove_dead(graph, dead)
        folded += 1
    return folded


def _new_node(graph: ir.Graph, before: ir.Node, op: str, inputs: list, name: str, dtype, attrs=()) -> ir.Value:
    node = ir.Node("", op, inputs, attributes=list(attrs), name=name)
    graph.insert_before(before, node)
    node.outputs[0].dtype = dtype
    return node.outputs[0]


def _packed_chain(rs: ir.Node):
    """``(Gathers, MatMul, bias Add or None, len(lead), k, rest, perm of a part or None)`` of
    a packed projection reshaped by ``rs``, or None (see :func:`fold_packed_projections`)."""
    d, dp = named_dims(rs.outputs[0]), named_dims(rs.inputs[0])
    if d is None or dp is None or len(d) < 3 or rs.outputs[0].is_graph_output():
        return None
    lead = len(dp) - 1
    k, rest = d[lead] if lead < len(d) else None, d[lead + 1:]
    if (not isinstance(k, int) or k < 2 or not rest or not all(isinstance(r, int) for r in rest)
            or dp[-1] != k * int(np.prod(rest)) or None in dp[:-1] or d[:lead] != dp[:-1]):
        return None
    uses = rs.outputs[0].uses()
    if len(uses) != 1:  # (a Reshape [N, C] -> [N, C, 1, 1] read twice, say: not a packed projection)
        return None
    first = uses[0].node
    n = len(d)
    part_perm = None
    if first.op_type == "Unsqueeze" and len(rest) == 1:  # nn.MultiheadAttention
        tr = _only_user(first)
        sq = _only_user(tr) if tr is not None else None
        if (tr is None or sq is None or tr.op_type != "Transpose" or sq.op_type != "Squeeze"
                or const_ints(first, 1, "axes") != [0] or const_ints(sq, 1, "axes") not in ([lead + 1], [-2])
                or attr_ints(tr, "perm") != [lead + 1, *range(1, lead + 1), 0, lead + 2]):
            return None
        picked = sq.outputs[0]
    elif first.op_type == "Transpose":  # Swin: the k axis goes first
        perm = attr_ints(first, "perm")
        if perm is None or len(perm) != n or perm[0] != lead:
            return None
        part_perm = [p - (p > lead) for p in perm[1:]]
        picked = first.outputs[0]
    else:
        return None
    gathers = [u.node for u in picked.uses()]
    if not gathers or picked.is_graph_output():
        return None
    for g in gathers:
        idx = const_array(g.inputs[1]) if g.op_type == "Gather" and len(g.inputs) > 1 else None
        if idx is None or idx.ndim != 0 or attr_int(g, "axis", 0) != 0 or g.inputs[0] is not picked:
            return None
    # Besides the Reshape, only Shape reads of the packed tensor (TorchScript computes the
    # Reshape's shape from them): they die with the chain.
    if any(u.node is not rs and u.node.op_type != "Shape" for u in rs.inputs[0].uses()):
        return None
    p, add = rs.inputs[0].producer(), None
    if p is not None and p.op_type == "Add":
        a, b = p.inputs
        mm_out, bias = (a, b) if const_array(b) is not None else (b, a)
        bias_arr = const_array(bias)
        if bias_arr is None or bias_arr.shape != (dp[-1],) or len(mm_out.uses()) != 1:
            return None
        add, p = p, mm_out.producer()
    if p is None or p.op_type != "MatMul" or len(p.outputs[0].uses()) != 1:
        return None
    w = const_array(p.inputs[1])
    if w is None or w.ndim != 2 or w.shape[1] != dp[-1] or is_const(p.inputs[0]):
        return None
    return gathers, p, add, lead, k, [int(r) for r in rest], part_perm


def _only_user(node: ir.Node) -> ir.Node | None:
    uses = node.outputs[0].uses()
    return uses[0].node if len(uses) == 1 and not node.outputs[0].is_graph_output() else None


def const_ints(node: ir.Node, index: int, attr: str) -> list[int] | None:
    """An int list given as constant input ``index`` (newer opsets) or attribute ``attr``."""
    if index < len(node.inputs) and node.inputs[index] is not None:
        arr = const_array(node.inputs[index])
        return None if arr is None else [int(x) for x in np.asarray(arr).reshape(-1)]
    return attr_ints(node, attr)


def _merged_leading(dx: list, d1: list, d2: list, perm: list[int]) -> tuple[None, list[int]] | None:
    """The kᵀ idiom: the first m axes of x merged into axis 0, the rest permuted behind it,
    axis 0 split back into the same m dims.  Returns (no split, the Transpose perm)."""
    m = len(dx) - len(d1) + 1
    if m < 2 or perm[0] != 0 or None in dx or None in d1[1:] or None in d2 or d1[1:] != dx[m:]:
        return None
    if d2 != dx[:m] + [d1[p] for p in perm[1:]]:
        return None
    return None, list(range(m)) + [m - 1 + p for p in perm[1:]]


def _heads_into_batch(dx: list, d1: list, d2: list, perm: list[int]) -> tuple[list[int], list[int]] | None:
    """The ``nn.MultiheadAttention`` idiom: x ``[lead..., B, E]`` becomes ``[lead..., B·H, d]``
    (E = H·d, the heads merged into the axis before), is permuted, and the merged axis is
    split back into ``[B, H]``.  Returns (the split shape, the Transpose perm over
    ``[lead..., B, H, d]``)."""
    n = len(dx)
    if n < 2 or len(d1) != n or len(d2) != n + 1:
        return None
    e, d, b = dx[-1], d1[-1], dx[-2]
    if not isinstance(e, int) or not isinstance(d, int) or d <= 0 or e % d or e // d < 2 or b is None:
        return None
    if None in dx[:-2] or d1[:-2] != dx[:-2]:
        return None
    h = e // d
    expected: list = []
    new_perm: list[int] = []
    for k in perm:
        if k == n - 2:  # the merged axis comes back as [B, H]
            expected += [b, h]
            new_perm += [n - 2, n - 1]
        elif k == n - 1:
            expected.append(d)
            new_perm.append(n)
        else:
            expected.append(d1[k])
            new_perm.append(k)
    if None in d2 or d2 != expected:
        return None
    return [0] * (n - 1) + [h, d], new_perm


def _remove_dead(graph: ir.Graph, values: list[ir.Value | None]) -> None:
    """Remove the nodes that computed ``values`` and whatever only they read."""
    todo = [v for v in values if v is not None]
    while todo:
        v = todo.pop()
        node = v.producer()
        if node is None and v.is_initializer() and not v.uses() and v not in graph.inputs:
            graph.initializers.pop(v.name, None)  # a weight only the removed nodes read
            continue
        if node is None or node.graph is not graph:
            continue
        if any(o.uses() or o.is_graph_output() for o in node.outputs):
            continue
        inputs = list(node.inputs)
        graph.remove(node, safe=True)
        todo.extend(i for i in inputs if i is not None)


def prepare_graph(graph: ir.Graph) -> int:
    """Normalise exporter idioms before the analysis (the model computes the same).

    Constants shared through Identity nodes are read directly; static shape reads and
    small constant-only subgraphs (index and shape arithmetic) become ``Constant`` nodes.
    Folding the one can unlock the other, so both run until nothing changes.  Shape
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


# -- constant folding -----------------------------------------------------------------

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
    inputs = [v for v in dict.fromkeys(node.inputs) if v is not None]
    graph.remove(node, safe=True)
    for value, name in new_values:
        value.name = name
    for v in inputs:
        if v.uses() or v.is_graph_output() or v.is_graph_input():
            continue
        producer = v.producer()
        if producer is not None and producer.op_type == "Constant" and producer.graph is graph:
            graph.remove(producer, safe=True)
        elif v.is_initializer() and graph.initializers.get(v.name) is v:
            graph.initializers.pop(v.name)
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


# -- symbolic shapes ---------------------------------------------------------------------

_SMALL_INIT = 1024  # larger initializers travel to the symbolic pass as typed inputs only


def _symbolic_shape_inference():
    """onnxruntime's ``SymbolicShapeInference`` class, loaded from its file alone: the
    ``onnxruntime.tools`` package imports torch whenever torch is installed, seconds of
    start-up for one class that needs only onnx and numpy."""
    import importlib.util
    import sys

    name = "onnxprune._ort_symbolic_shape_infer"
    if name not in sys.modules:
        spec = importlib.util.find_spec("onnxruntime")
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(list(spec.submodule_search_locations)[0]) / "tools" / "symbolic_shape_infer.py"
        if not path.is_file():
            return None
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception:  # noqa: BLE001 - a build without the tools' dependencies
            return None
        sys.modules[name] = module
    return getattr(sys.modules[name], "SymbolicShapeInference", None)


def _symbolic_infer(cls, proto):
    """``SymbolicShapeInference.infer_shapes(proto, auto_merge=True)`` without its file write.

    When the inference is incomplete, onnxruntime's ``infer_shapes`` saves the model as
    ``sym_shape_infer_temp.onnx`` (+ data) into the current directory, following any
    symlink planted there, before it raises.  Its steps are run here instead, returning
    None where it would save; if onnxruntime's internals ever change, the public call
    runs with the current directory switched to a private temporary folder.
    """
    steps = ("_preprocess", "_infer_impl", "_update_output_from_vi")
    if not all(hasattr(cls, step) for step in steps):
        return _in_private_cwd(lambda: cls.infer_shapes(proto, auto_merge=True, guess_output_rank=False))
    engine = cls(2**31 - 1, True, False, 0)  # int_max, auto_merge, guess_output_rank, verbose
    engine._preprocess(proto)
    complete = False
    while engine.run_:
        complete = engine._infer_impl()
    engine._update_output_from_vi()
    return engine.out_mp_ if complete else None


def _in_private_cwd(call):
    """Run ``call`` with the current directory in a fresh temporary folder (removed after)."""
    import os
    import tempfile

    here = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="onnxprune-cwd-") as d:
        os.chdir(d)
        try:
            return call()
        finally:
            os.chdir(here)


def supplement_shapes(model: ir.Model) -> int:
    """Fill the dims onnx's shape inference left unknown from onnxruntime's symbolic
    shape inference; returns the number of values whose shape got more specific.

    onnx's inference loses track of a transformer's shapes at the first Reshape whose
    shape is assembled at run time (``Shape → Gather → Concat``): every attention tensor
    ends up ``[unk, unk, unk, unk]``.  onnxruntime's symbolic pass computes through that
    arithmetic (``[batch, seq, 12, 32]``).  Only dims onnx left unknown are taken; a value
    whose static dims disagree between the two keeps onnx's shape.  Anything the symbolic
    pass cannot handle leaves the shapes as they were: it only ever adds knowledge.
    """
    graph = model.graph
    unknown = [
        v for node in graph for v in node.outputs
        if v.shape is None or any(not isinstance(d, int) and _generated(d) for d in v.shape)
    ]
    if not unknown:
        return 0
    SymbolicShapeInference = _symbolic_shape_inference()
    if SymbolicShapeInference is None:  # onnxruntime missing or built without its tools
        return 0
    proto = _structure_proto(model)
    try:
        logging.getLogger("onnxruntime.tools.symbolic_shape_infer").setLevel(logging.CRITICAL)
        with contextlib.redirect_stdout(io.StringIO()):
            inferred = _symbolic_infer(SymbolicShapeInference, proto)
    except Exception:
        return 0
    if inferred is None:
        return 0
    found: dict[str, list[int | str | None]] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            found[vi.name] = [
                d.dim_value if d.HasField("dim_value") else _ort_symbol(d.dim_param)
                for d in t.shape.dim
            ]
    changed = 0
    for value in unknown:
        sym = found.get(value.name)
        if sym is None or (value.shape is not None and len(sym) != len(value.shape)):
            continue
        old = list(value.shape) if value.shape is not None else [None] * len(sym)
        merged: list = []
        for a, b in zip(old, sym):
            if isinstance(a, int):
                if isinstance(b, int) and b != a:
                    break  # the two passes disagree: trust neither more than onnx
                merged.append(a)
            elif b is not None and _generated(a):  # a dim onnx named is never overridden
                merged.append(b)
            else:
                merged.append(a)
        else:
            if merged != old:
                value.shape = ir.Shape(merged)
                changed += 1
    return changed


def _ort_symbol(name: str) -> str | None:
    # onnxruntime numbers its own placeholders like onnx does: keep the two apart.
    if not name:
        return None
    return f"ort_{name}" if name.startswith("unk__") else name


def _generated(d) -> bool:
    """A dim no one named: unknown, or one of the ``unk__N`` placeholders onnx invents."""
    name = getattr(d, "value", d)
    return name is None or (isinstance(name, str) and name.startswith("unk__"))



def _structure_proto(model: ir.Model):
    """The graph as a ModelProto without its weights: large initializers become typed
    graph inputs, so the symbolic pass sees their shapes without a copy of their data."""
    import onnx

    graph = model.graph
    g = onnx.GraphProto(name=graph.name or "main")
    g.node.extend(ir.serde.serialize_node(node) for node in graph)
    g.input.extend(ir.serde.serialize_value(v) for v in graph.inputs)
    g.output.extend(ir.serde.serialize_value(v) for v in graph.outputs)
    inputs = {v.name for v in graph.inputs}
    for name, value in graph.initializers.items():
        tensor = value.const_value
        if tensor is None or name in inputs:
            continue
        if tensor.size <= _SMALL_INIT:
            g.initializer.append(ir.serde.serialize_tensor(tensor))
        else:
            g.input.append(onnx.helper.make_tensor_value_info(name, int(tensor.dtype), list(tensor.shape)))
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    proto = onnx.helper.make_model(g, opset_imports=opsets)
    proto.ir_version = model.ir_version
    return proto
