"""Exporter-idiom canonicalisations: attention idioms the torch exporters write, rewritten
into the plain form the channel analysis follows (the model computes the same values).

- packed projections (Q, K and V in one weight, split by Gather) become one MatMul (+ bias
  Add) per part (:func:`fold_packed_projections`);
- batch-merge transposes (``Reshape → Transpose → Reshape`` chains that hide the head axis
  in the batch axis, the dynamo exporter's kᵀ among them) become the Transpose they amount
  to (:func:`fold_batch_merge_transposes`).

Each is taken only where the dims prove it; ``prune`` checks the values they compute
(``graph.meta[RESTRUCTURED]``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ._graph import attr_int, attr_ints, const_array, const_ints, is_const, named_dims, new_initializer, remove_dead


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
        remove_dead(graph, dropped)
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
        remove_dead(graph, dead)
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
