"""The op table: how every ONNX op treats the channels flowing through it.

One entry per op, one small handler class per kind of behaviour (in the spirit of
Torch-Pruning's per-layer handlers):

- ``Unary``: pass-through (activations, Identity, Cast, Dropout ...).
- ``Elementwise``: broadcasting binary/variadic ops; a constant operand with one entry per
  channel is sliced, two computed operands carrying channels are *coupled*.
- ``NormParams``: BatchNormalization / InstanceNormalization, parameters sliced.
- ``Conv``, ``ConvTranspose``, ``Gemm``, ``MatMul``: *producers* of new channels and
  *consumers* of incoming ones (weights sliced on both axes).
- ``Concat``, ``Split``, ``Slice``, ``Flatten``, ``Reshape``, ``Transpose``, ``Squeeze``,
  ``Unsqueeze``, ``Gather``: *index mappings* (offsets, sub-ranges, blocks of H·W, heads, axis
  moves).
- ``Pool``, ``Reduce``, ``Resize``, ``Pad``, ``Softmax``, ``ShapeOf``: pass-through under
  a condition on the axes they touch; otherwise they block.
- ``Block``: ops known to forbid pruning the channels that reach them, with the reason.
- ``ControlFlow``: If/Loop/Scan bodies are never rewritten, so channels that enter one (an
  explicit input here, an outer-scope capture at any depth in ``groups``) block their group
  ("read inside the subgraph of If 'name'"); their outputs start without channels.

An op missing from :data:`OP_TABLE` blocks every group whose channels reach it; the
analysis reports that op by name.  Adding support for an op is one entry here, or, from
outside, :func:`register_op` (ops of any domain; README "Extending the op table").

Handlers talk to the analysis through a small context (see ``groups._Context``):
``layout(v)``, ``set_layout(v, L)``, ``new_atoms(n, node)``, ``fixed(n)``,
``union(a, b)``, ``block(atoms, node, reason)`` and ``edit(record)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from ._graph import attr_int, attr_ints, const_array, const_ints, dims, is_const, named_dims, node_label, rank
from .errors import InputError
from .layout import Layout, SetCount, SetGroup, SliceBounds, SliceParam, SplitSizes

Ctx = Any  # groups._Context; typed loosely to keep this module free of the analysis


def _layouts(node: ir.Node, ctx: Ctx) -> list[Layout | None]:
    return [ctx.layout(v) if v is not None else None for v in node.inputs]


def _block_all(node: ir.Node, ctx: Ctx, reason: str) -> None:
    for layout in _layouts(node, ctx):
        if layout is not None:
            ctx.block(layout.atoms, node, reason)


def _norm_axis(axis: int, r: int | None) -> int | None:
    if axis >= 0:
        return axis
    return None if r is None else axis + r


class Handler:
    """Base class: ``propagate`` reads input layouts and sets output layouts / edits."""

    creates_channels = False  # producers run even when no input carries channels

    def propagate(self, node: ir.Node, ctx: Ctx) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class Block(Handler):
    """An op known to make the channels reaching it unremovable."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def propagate(self, node: ir.Node, ctx: Ctx) -> None:
        _block_all(node, ctx, self.reason)


def subgraph_reason(value: ir.Value, owner: ir.Node) -> str:
    """The one wording for channels that reach an If/Loop/Scan body (as an input or a
    capture): the rewrite leaves subgraphs untouched, so a body would read removed channels."""
    return f"'{value.name}' is read inside the subgraph of {node_label(owner)}: onnxprune does not rewrite subgraphs"


class ControlFlow(Handler):
    """If/Loop/Scan: their explicit inputs are read inside the body, which is not rewritten;
    their outputs start without channels.  Outer-scope captures are blocked by the analysis."""

    def propagate(self, node: ir.Node, ctx: Ctx) -> None:
        for value in node.inputs:
            lay = ctx.layout(value)
            if lay is not None:
                ctx.block_reason(lay.atoms, subgraph_reason(value, node))


class Unary(Handler):
    """Elementwise on its first input; any other input must be a scalar-like operand."""

    def propagate(self, node: ir.Node, ctx: Ctx) -> None:
        ins = _layouts(node, ctx)
        if any(layout is not None for layout in ins[1:]):
            _block_all(node, ctx, "channels reach a parameter input")
            return
        if ins[0] is None:
            return
        for out in node.outputs:
            ctx.set_layout(out, ins[0])


class Elementwise(Handler):
    """Broadcasting ops (Add, Sub, Mul, Div, Pow, PRelu, Max, Min, Sum, Mean)."""

    def propagate(self, node: ir.Node, ctx: Ctx) -> None:
        ins = _layouts(node, ctx)
        out = node.outputs[0]
        ranks = [rank(v) for v in node.inputs]
        out_rank = rank(out)
        if out_rank is None:
            known = [r for r in ranks if r is not None]
            out_rank = max(known) if len(known) == len(ranks) else None
        carried = [(i, lay) for i, lay in enumerate(ins) if lay is not None]
        if out_rank is None or any(ranks[i] is None for i, _ in carried):
            _block_all(node, ctx, "rank unknown after shape inference")
            return
        aligned = {lay.axis + out_rank - ranks[i] for i, lay in carried}
        if len(aligned) != 1:
            _block_all(node, ctx, "two different channel axes meet")
            return
        axis = aligned.pop()
        first = carried[0][1]
        for _, lay in carried[1:]:
            if len(lay) != len(first):
                _block_all(node, ctx, "operands disagree on the channel count")
                return
        for i, value in enumerate(node.inputs):
            if value is None or ins[i] is not None:
                continue
            d = dims(value)
            if d is None:
                _block_all(node, ctx, f"shape of input '{value.name}' unknown")
                return
            k = axis - (out_rank - len(d))
            if k < 0 or d[k] == 1:
                continue  # broadcasts over the channels: nothing to slice
            if d[k] == len(first) and is_const(value):
                ctx.edit(SliceParam(node, i, k, first.atoms, "param"))
                continue
            _block_all(
                node,
                ctx,
                f"channels are combined with '{value.name}', which carries no prunable channels"
                + _why_no_channels(value),
            )
            return
        for _, lay in carried[1:]:
            ctx.union(first.atoms, lay.atoms, node)
        ctx.set_layout(out, Layout(axis, first.atoms))


def _why_no_channels(value: ir.Value) -> str:
    """Why a computed operand carries no channels, when the op that made it says so.

    In a transformer the residual stream is ``LayerNorm(h + f(h))``: the producers feeding
    the Add meet the previous LayerNorm's output, whose hidden axis is normalised as a whole.
    """
    node = value.producer()
    handler = handler_for(node) if node is not None else None
    if isinstance(handler, Block):
        where = "it comes from"
        if node.op_type == "LayerNormalization":
            where = "the hidden (residual-stream) dimension comes from"
        return f"; {where} {node_label(node)}, which passes no channels on ({handler.reason})"
    return ""


class NormParams(Handler):
    """BatchNormalization / InstanceNormalization: per-channel parameters on axis 1."""

    def propagate(self, node: ir.Node, ctx: Ctx) -> None:
        ins = _layouts(node, ctx)
        lay = ins[0]
        if lay is None or any(x is not None for x in ins[1:]):
            _block_all(node, ctx, "channels reach a normalisation parameter")
            return
        if lay.axis != 1:
            ctx.block(lay.atoms, node, "normalises an axis other than the channel axis")
            return
        # The running statistics are per-channel too: read by a node or returned as a graph
        # output, they would change shape.
        if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
            ctx.block(lay.atoms, node, "training-mode outputs are used")
            return
        for i in range(1, len(node.inputs)):
            if node.inputs[i] is not None:
                if not is_const(node.inputs[i]):
                    ctx.block(lay.atoms, node, f"parameter '{node.inputs[i].name}' is computed")
                    return
                ctx.edit(SliceParam(node, i, 0, lay.atoms, "param"))
        ctx.set_layout(node.outputs[0], lay)


class Conv(Handler):
    """Conv: consumer of input channels (axis 1 of W), producer of output channels."""

    creates_channels = True

    def propagate(self, node: ir.Node, ctx: Ctx) -> None:
        lay = ctx.layout(node.inputs[0])
        w = const_array(node.inputs[1])
        if w is None:
            _block_all(node, ctx, "weight is computed at run time")
            return
        if any(ctx.layout(v) is not None for v in node.inputs[1:] if v is not None):
            _block_all(node, ctx, "channels reach the weight input")
            return
        if len(node.inputs) > 2 and node.inputs[2] is not None and not is_const(node.inputs[2]):
            _block_all(node, ctx, "bias is computed at run time")
            return
        if lay is not None and lay.axis != 1:
            ctx.block(lay.atoms, node, "channel axis is not axis 1")
            return
        o, per_group = int(w.shape[0]), int(w.shape[1])
        group = attr_int(node, "group", 1)
        bias = len(node.inputs) > 2 and node.inputs[2] is not None
        if group > 1 and per_group == 1:
            # Depthwise: output channel c·m+j reads only input channel c, so the channels
            # pass through; W rows, bias and `group` follow the input's kept channels.
            if lay is None:
                return
            out_atoms = np.repeat(lay.atoms, o // group)
            ctx.edit(SliceParam(node, 1, 0, out_atoms, "param"))
            if bias:
                ctx.edit(SliceParam(node, 2, 0, out_atoms, "param"))
            ctx.edit(SetGroup(node, lay.atoms))
            ctx.set_layout(node.outputs[0], Layout(1, out_atoms))
            return
        if lay is not None:
            if group > 1:
                # Grouped: W is shared across groups along axis 1, so local index j can
                # only go from every group at once: couple the j-th channel of each group.
                for g in range(1, group):
                    ctx.union(lay.atoms[:per_group], lay.atoms[g * per_group : (g + 1) * per_group], node)
            ctx.edit(SliceParam(node, 1, 1, lay.atoms[:per_group], "weight_in"))
        base = ctx.new_atoms(o // group, node)
        out_atoms = np.tile(base, group)
        ctx.edit(SliceParam(node, 1, 0, out_atoms, "weight_out"))
        if bias:
            ctx.edit(SliceParam(node, 2, 0, out_atoms, "param"))
        ctx.set_layout(node.outputs[0], Layout(1, out_atoms))


class ConvTranspose(Handler):
    """ConvTranspose: W is [C_in, C_out/group, k...]; consumer on axis 0, producer on axis 1."""

    creates_channels = True

    def propagate(self, node: ir.Node, ctx: Ctx) -> None:
        lay = ctx.layout(node.inputs[0])
        w = const_array(node.inputs[1])
        if w is None:
            _block_all(node, ctx, "weight is computed at run time")
            return
        if attr_int(node, "group", 1) != 1:
            _block_all(node, ctx, "grouped ConvTranspose is not supported")
            return
        if len(node.inputs) > 2 and node.inputs[2] is not None and not is_const(node.inputs[2]):
            _block_all(node, ctx, "bias is computed at run time")
            return
        if lay is not None:
            if lay.axis != 1:
                ctx.block(lay.atoms, node, "channel axis is not axis 1")
                return
            ctx.edit(SliceParam(node, 1, 0, lay.atoms, "weight_in"))
        out_atoms = ctx.new_atoms(int(w.shape[1]), node)
        ctx.edit(SliceParam(node, 1, 1, out_atoms, "weight_out"))
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            ctx.edit(SliceParam(node, 2, 0, out_atoms, "param"))
        ctx.set_layout(node.outputs[0], Layout(1, out_atoms))


def _bias_edit(node: ir.Node, index: int, out_atoms: np.ndarray, ctx: Ctx) -> bool:
    """Slice a broadcast bias (Gemm C, MatMul+Add is handled by Elementwise)."""
    if index >= len(node.inputs) or node.inputs[index] is None:
        return True
    c = const_array(node.inputs[index])
    if c is None:
        return False
    if c.ndim >= 1 and c.shape[-1] == len(out_atoms) and len(out_atoms) > 1:
        ctx.edit(SliceParam(node, index, c.ndim - 1, out_atoms, "param"))
    elif c.ndim >= 1 and c.shape[-1] not in (1, len(out_atoms)):
        return False
    return True


class Gemm(Handler):
    """Gemm with a constant B (either transB): Y = A·B (+C)."""

    creates_channels = True

    def propagate(self, node: ir.Node, ctx: Ctx) -> None:
        b = const_array(node.inputs[1])
        if b is None or b.ndim != 2:
            _block_all(node, ctx, "B is computed at run time")
            return
        if any(ctx.layout(v) is not None for v in node.inputs[1:] if v is not None):
            _block_all(node, ctx, "channels reach B or C")
            return
        trans_a, trans_b = attr_int(node, "transA", 0), attr_int(node, "transB", 0)
        lay = ctx.layout(node.inputs[0])
        if lay is not None:
            if lay.axis != (0 if trans_a else 1):
                ctx.block(lay.atoms, node, "channel axis is not the reduced axis of A")
                return
            ctx.edit(SliceParam(node, 1, 1 if trans_b else 0, lay.atoms, "weight_in"))
        out_atoms = ctx.new_atoms(int(b.shape[0] if trans_b else b.shape[1]), node)
        ctx.edit(SliceParam(node, 1, 0 if trans_b else 1, out_atoms, "weight_out"))
        if not _bias_edit(node, 2, out_atoms, ctx):
            ctx.block(out_atoms, node, "bias C is computed or has an unexpected shape")
        ctx.set_layout(node.outputs[0], Layout(1, out_atoms))


class MatMul(Handler):
    """MatMul of a computed tensor by a constant 2-D weight [K, N]."""

    creates_channels = True

    def propagate(self, node: ir.Node, ctx: Ctx) -> None:
        x, w_value = node.inputs[0], node.inputs[1]
        w = const_array(w_value)
        lay = ctx.layout(x)
        if w is None and not is_const(x):
            self._two_computed(node, ctx)
            return
        if w is None or is_const(x):
            _block_all(node, ctx, "constant left operand is not supported")
            return
        if w.ndim != 2:
            _block_all(node, ctx, "batched constant weight is not supported")
            return
        r = rank(x)
        if lay is not None:
            if r is None:
                ctx.block(lay.atoms, node, "rank unknown after shape inference")
                return
            if lay.axis != r - 1:
                if lay.axis == r - 2 or r < 2:
                    ctx.block(lay.atoms, node, "channel axis is the row axis of the product")
                    return
                ctx.set_layout(node.outputs[0], lay)  # a batch axis: passes through
                return
            ctx.edit(SliceParam(node, 1, 0, lay.atoms, "weight_in"))
        out_rank = rank(node.outputs[0]) or (r if r is not None else None)
        if out_rank is None:
            return
        out_atoms = ctx.new_atoms(int(w.shape[1]), node)
        ctx.edit(SliceParam(node, 1, 1, out_atoms, "weight_out"))
        ctx.set_layout(node.outputs[0], Layout(out_rank - 1, out_atoms))

    @staticmethod
    def _two_computed(node: ir.Node, ctx: Ctx) -> None:
        """A·B of two computed tensors (attention's QKᵀ and P·V): where both carry
        channels on the same axis of the product (the head axis of a batch dim, or the
        reduced axis) they are coupled; a row or column axis passes through."""
        a, b = node.inputs[0], node.inputs[1]
        ra, rb = rank(a), rank(b)
        la, lb = ctx.layout(a), ctx.layout(b)
        if la is None and lb is None:
            return
        if ra is None or rb is None or ra < 2 or rb < 2:
            _block_all(node, ctx, "rank unknown or below 2 in a MatMul of two computed tensors")
            return
        r = max(ra, rb)
        da, db = dims(a), dims(b)

        def place(lay: Layout, rr: int, which: str) -> int | None:
            if lay.axis < rr - 2:
                return lay.axis + r - rr  # a batch axis, aligned from the right
            if which == "a":
                return r - 2 if lay.axis == rr - 2 else -1  # rows; -1: the reduced axis
            return r - 1 if lay.axis == rr - 1 else -1  # columns; -1: the reduced axis

        pa = place(la, ra, "a") if la is not None else None
        pb = place(lb, rb, "b") if lb is not None else None
        if pa is not None and pb is not None:
            if pa != pb or len(la) != len(lb):
                _block_all(node, ctx, "the operands carry channels on different axes")
                return
            ctx.union(la.atoms, lb.atoms, node)
            if pa >= 0:
                ctx.set_layout(node.outputs[0], Layout(pa, la.atoms))
            return
        lay, p, other, ro = (la, pa, db, rb) if la is not None else (lb, pb, da, ra)
        if p == -1:
            ctx.block(lay.atoms, node, "the reduced axis meets an operand that carries no channels")
            return
        if p < r - 2:
            # A batch axis: the other operand must broadcast over it.
            k = p - (r - ro)
            if k >= 0 and (other is None or other[k] != 1):
                ctx.block(lay.atoms, node, "the channels meet a batch axis of an operand that carries none")
                return
        ctx.set_layout(node.outputs[0], Layout(p, lay.atoms))


class Concat(Handler):
    """Concat: on the channel axis the layouts are joined with offsets."""

    def propagate(self, node: ir.Node, ctx: Ctx) -> None:
        ins = _layouts(node, ctx)
        r = rank(node.outputs[0]) or next((rank(v) for v in node.inputs if rank(v)), None)
        axis = _norm_axis(attr_int(node, "axis", 0), r)
        if axis is None:
            _block_all(node, ctx, "rank unknown after shape inference")
            return
        carried = [lay for lay in ins if lay is not None]
        if all(lay.axis == axis for lay in carried):
            parts = []
            for value, lay in zip(node.inputs, ins):
                if lay is not None:
                    parts.append(lay.atoms)
                    continue
                d = dims(value)
                if d is None or len(d) <= axis or d[axis] is None:
                    _block_all(node, ctx, f"size of '{value.name}' on the concat axis unknown")
                    return
                parts.append(ctx.fixed(d[axis]))
            ctx.set_layout(node.outputs[0], Layout(axis, np.concatenate(parts)))
            return
        # Concatenated along another axis: every operand must carry the same channels.
        if len(carried) != len(ins) or len({lay.axis for lay in carried}) != 1:
            _block_all(node, ctx, "channels concatenated along another axis with a tensor that has none")
            return
        if len({len(lay) for lay in carried}) != 1:
            _block_all(node, ctx, "operands disagree on the channel count")
            return
        for lay in carried[1:]:
            ctx.union(carried[0].atoms, lay.atoms, node)
        ctx.set_layout(node.outputs[0], carried[0])


class Split(Handler):
    """Split: on the channel axis each output takes its sub-range; sizes are rewritten."""

    def propagate(self, node: ir.Node, ctx: Ctx) -> None:
        ins = _layouts(node, ctx)
        lay = ins[0]
        if lay is None or any(x is not None for x in ins[1:]):
            _block_all(node, ctx, "channels reach the split sizes")
            return
        axis = _norm_axis(attr_int(node, "axis", 0), rank(node.inputs[0]))
        if axis is None:  # a negative axis of unknown rank may well be the channel axis
            ctx.block(lay.atoms, node, "rank unknown after shape inference")
            return
        if axis != lay.axis:
            for out in node.outputs:
                ctx.set_layout(out, lay)
            return
        n_out = len(node.outputs)
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            arr = const_array(node.inputs[1])
            if arr is None:
                ctx.block(lay.atoms, node, "split sizes are computed at run time")
                return
            sizes = [int(s) for s in arr.reshape(-1)]
        elif attr_ints(node, "split") is not None:
            sizes = attr_ints(node, "split")
        else:
            size = -(-len(lay) // n_out)  # ceil, as opset 18's num_outputs does
            sizes = [min(size, len(lay) - i * size) for i in range(n_out)]
        if sum(sizes) != len(lay) or len(sizes) != n_out:
            ctx.block(lay.atoms, node, "split sizes do not match the channel count")
            return
        bounds = np.cumsum([0] + sizes)
        chunks = [lay.atoms[bounds[i] : bounds[i + 1]] for i in range(n_out)]
        ctx.edit(SplitSizes(node, chunks))
        for out, chunk in zip(node.outputs, chunks):
            ctx.set_layout(out, Layout(axis, chunk))


class Slice(Handler):
    """Slice with constant bounds: a step-1 slice of the channel axis is a sub-range."""

    def propagate(self, node: ir.Node, ctx: Ctx) -> None:
        ins = _layouts(node, ctx)
        lay = ins[0]
        if lay is None or any(x is not None for x in ins[1:]):
            _block_all(node, ctx, "channels reach the slice bounds")
            return
        r = rank(node.inputs[0])
        starts, ends = const_ints(node, 1, "starts"), const_ints(node, 2, "ends")
        axes = const_ints(node, 3, "axes")
        steps = const_ints(node, 4, "steps") if len(node.inputs) > 4 else None
        if starts is None or ends is None or r is None:
            ctx.block(lay.atoms, node, "slice bounds are computed at run time")
            return
        axes = [_norm_axis(a, r) for a in (axes if axes is not None else range(len(starts)))]
        if lay.axis not in axes:
            ctx.set_layout(node.outputs[0], lay)
            return
        pos = axes.index(lay.axis)
        if steps is not None and steps[pos] != 1:
            ctx.block(lay.atoms, node, "strided slice of the channel axis")
            return
        start, end, _ = slice(starts[pos], ends[pos]).indices(len(lay))
        end = max(start, end)
        ctx.edit(SliceBounds(node, pos, lay.atoms, start, end))
        ctx.set_layout(node.outputs[0], Layout(lay.axis, lay.atoms[start:end]))


class Gather(Handler):
    """Gather along an axis other than the channel axis (a ViT's class token ``x[:, 0]``):
    the channels pass through; the gathered axis is replaced by the indices' dims."""

    def propagate(self, node: ir.Node, ctx: Ctx) -> None:
        lay = ctx.layout(node.inputs[0])
        if lay is None or ctx.layout(node.inputs[1]) is not None:
            _block_all(node, ctx, "channels reach the gather indices")
            return
        r, r_idx = rank(node.inputs[0]), rank(node.inputs[1])
        axis = _norm_axis(attr_int(node, "axis", 0), r)
        if axis is None or r_idx is None:
            ctx.block(lay.atoms, node, "rank unknown after shape inference")
            return
        if axis == lay.axis:
            ctx.block(lay.atoms, node, "gathers along the channel axis")
            return
        out_axis = lay.axis if lay.axis < axis else lay.axis - 1 + r_idx
        ctx.set_layout(node.outputs[0], Layout(out_axis, lay.atoms))


class Transpose(Handler):
    """Transpose: the channel axis moves to where the permutation puts it."""

    def propagate(self, node: ir.Node, ctx: Ctx) -> None:
        lay = ctx.layout(node.inputs[0])
        perm = attr_ints(node, "perm")
        if perm is None:
            r = rank(node.inputs[0])
            if r is None:
                ctx.block(lay.atoms, node, "rank unknown after shape inference")
                return
            perm = list(reversed(range(r)))
        ctx.set_layout(node.outputs[0], Layout(perm.index(lay.axis), lay.atoms))


class Unsqueeze(Handler):
    def propagate(self, node: ir.Node, ctx: Ctx) -> None:
        lay = ctx.layout(node.inputs[0])
        axes = const_ints(node, 1, "axes")
        out_r = rank(node.outputs[0])
        if lay is None or axes is None or out_r is None:
            _block_all(node, ctx, "axes or rank unknown")
            return
        axes = sorted(_norm_axis(a, out_r) for a in axes)
        axis = lay.axis
        for a in axes:
            if a <= axis:
                axis += 1
        ctx.set_layout(node.outputs[0], Layout(axis, lay.atoms))


class Squeeze(Handler):
    def propagate(self, node: ir.Node, ctx: Ctx) -> None:
        lay = ctx.layout(node.inputs[0])
        d = dims(node.inputs[0])
        axes = const_ints(node, 1, "axes")
        if lay is None or d is None:
            _block_all(node, ctx, "axes or rank unknown")
            return
        if axes is None:
            if any(x is None for x in d):
                ctx.block(lay.atoms, node, "squeezed axes unknown")
                return
            axes = [i for i, x in enumerate(d) if x == 1]
        axes = [_norm_axis(a, len(d)) for a in axes]
        if lay.axis in axes:
            ctx.block(lay.atoms, node, "squeezes the channel axis")
            return
        ctx.set_layout(node.outputs[0], Layout(lay.axis - sum(a < lay.axis for a in axes), lay.atoms))


def _prod(xs: list[int | None]) -> int | None:
    out = 1
    for x in xs:
        if x is None:
            return None
        out *= x
    return out


class Flatten(Handler):
    """Flatten: each channel becomes a block of the features that follow it."""

    def propagate(self, node: ir.Node, ctx: Ctx) -> None:
        lay = ctx.layout(node.inputs[0])
        d = dims(node.inputs[0])
        if d is None:
            ctx.block(lay.atoms, node, "rank unknown after shape inference")
            return
        axis = _norm_axis(attr_int(node, "axis", 1), len(d))
        if lay.axis < axis:
            ctx.block(lay.atoms, node, "channel axis merged into the leading (batch) axis")
            return
        inner, outer = _prod(d[lay.axis + 1 :]), _prod(d[axis : lay.axis])
        if inner is None or outer is None:
            ctx.block(lay.atoms, node, "flattened dims are not static")
            return
        ctx.set_layout(node.outputs[0], Layout(1, np.tile(np.repeat(lay.atoms, inner), outer)))


class Reshape(Handler):
    """Reshape that keeps the channel axis whole, merges it with the dims after it, or
    splits it into heads (``[B, T, H·d] → [B, T, H, d]``: the d channels of a head go
    together, so the heads are the channels from there on)."""

    def propagate(self, node: ir.Node, ctx: Ctx) -> None:
        lay = ctx.layout(node.inputs[0])
        if ctx.layout(node.inputs[1]) is not None:
            _block_all(node, ctx, "channels reach the shape input")
            return
        s_in, s_out = named_dims(node.inputs[0]), named_dims(node.outputs[0])
        if s_in is None or s_out is None:
            ctx.block(lay.atoms, node, "shapes unknown after shape inference")
            return
        recovered = _reshape_out_dims(node)
        if recovered is not None and len(recovered) == len(s_out):
            s_out = [r if d is None and r is not None else d for d, r in zip(s_out, recovered)]
        c = len(lay)
        after = s_in[lay.axis + 1 :]
        # Find the output axis j whose elements start where the channel axis does: the
        # dims from there on must be the channel axis (whole, merged with whole static dims
        # after it, or split into heads of whole static dims) followed by the same dims the
        # input has after its channel axis.  The dims before (a symbolic batch·time, say)
        # need not be compared: the element count already makes them agree.
        for j in range(len(s_out)):
            dj = s_out[j]
            if not isinstance(dj, int):
                continue
            for t in range(len(after) + 1):
                merged = _static_prod(after[:t])
                if merged is None or dj != c * merged or not _same_dims(s_out[j + 1 :], after[t:]):
                    continue
                if not self._shape_edit(node, j, lay, merged, ctx):
                    return
                ctx.set_layout(node.outputs[0], Layout(j, np.repeat(lay.atoms, merged)))
                return
            if dj <= 1 or c % dj:
                continue
            inner = c // dj
            for s in range(1, len(s_out) - j):
                if _static_prod(s_out[j + 1 : j + 1 + s]) != inner or not _same_dims(s_out[j + 1 + s :], after):
                    continue
                heads = lay.atoms.reshape(dj, inner)
                for i in range(1, inner):
                    ctx.union(heads[:, 0], heads[:, i], node)
                head_layout = Layout(j, heads[:, 0].copy())
                if not self._shape_edit(node, j, head_layout, 1, ctx):
                    return
                ctx.set_layout(node.outputs[0], head_layout)
                return
        ctx.block(lay.atoms, node, "reshape splits or moves the channel axis")

    @staticmethod
    def _shape_edit(node: ir.Node, j: int, lay: Layout, merged: int, ctx: Ctx) -> bool:
        shape = const_array(node.inputs[1])
        if shape is not None:
            entry = int(shape.reshape(-1)[j])
            # -1 is inferred; 0 copies input dim j, which is the channel dim only at the
            # channel axis itself (elsewhere it merely has the same size): rewrite it then.
            copied = entry == 0 and not attr_int(node, "allowzero", 0) and j == lay.axis and merged == 1
            if entry == -1 or copied:
                return True  # follows the pruned input by itself
            ctx.edit(SetCount(node, 1, None, j, lay.atoms, merged))
            return True
        # A shape computed at run time (Shape→Gather→Concat): the entry must come from a
        # constant piece of a Concat; a -1 there needs no edit.
        src = node.inputs[1].producer()
        if src is not None and src.op_type == "Concat":
            offset = 0
            for k, piece in enumerate(src.inputs):
                pd = dims(piece)
                n = pd[0] if pd and len(pd) == 1 and pd[0] is not None else None
                if n is None:
                    break
                if offset <= j < offset + n:
                    arr = const_array(piece)
                    if arr is None:
                        break
                    entry = int(arr.reshape(-1)[j - offset])
                    if entry == -1:
                        return True
                    ctx.edit(SetCount(src, k, None, j - offset, lay.atoms, merged))
                    return True
                offset += n
        ctx.block(lay.atoms, node, "shape input is computed and its channel entry cannot be traced")
        return False


def _static_prod(xs: list) -> int | None:
    return _prod([x if isinstance(x, int) else None for x in xs])


def _same_dims(a: list, b: list) -> bool:
    """Two dim lists that provably hold as many elements: the same static product and the
    same named symbols (an unnamed unknown proves nothing)."""
    if any(x is None for x in a) or any(x is None for x in b):
        return False
    sa = sorted(x for x in a if isinstance(x, str))
    sb = sorted(x for x in b if isinstance(x, str))
    return sa == sb and _static_prod([x for x in a if isinstance(x, int)]) == _static_prod(
        [x for x in b if isinstance(x, int)]
    )


def _reshape_out_dims(node: ir.Node) -> list[int | None] | None:
    """Output dims of a Reshape, one unknown dim recovered from the element count.

    ``x.view(x.size(0), -1)`` with a dynamic batch leaves the flattened size unknown to
    onnx's inference (``[batch, unk]``); a symbolic dim named on both sides cancels, and a
    single unknown left over is the quotient of the static products.
    """
    d_out = dims(node.outputs[0])
    s_in, s_out = node.inputs[0].shape, node.outputs[0].shape
    if d_out is None or s_in is None or s_out is None or None not in d_out:
        return d_out
    names_in = [getattr(x, "value", None) for x in s_in if not isinstance(x, int)]
    left = []
    for i, x in enumerate(s_out):
        if isinstance(x, int):
            continue
        name = getattr(x, "value", None)
        if name is not None and name in names_in:
            names_in.remove(name)
        else:
            left.append(i)
    if names_in or len(left) != 1:
        return d_out
    p_in = _prod([x for x in s_in if isinstance(x, int)])
    p_out = _prod([x for x in s_out if isinstance(x, int)])
    if not p_out or p_in % p_out:
        return d_out
    d_out = list(d_out)
    d_out[left[0]] = p_in // p_out
    return d_out


class Pool(Handler):
    """Pooling over spatial axes (channel axis 1)."""

    def propagate(self, node: ir.Node, ctx: Ctx) -> None:
        lay = ctx.layout(node.inputs[0])
        if lay.axis != 1:
            ctx.block(lay.atoms, node, "pools an axis other than the spatial ones")
            return
        # Indices are flat offsets into the input, so they change with the channel count,
        # whether a node reads them or the graph returns them.
        if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
            ctx.block(lay.atoms, node, "MaxPool indices depend on the channel count")
            return
        ctx.set_layout(node.outputs[0], lay)


class Reduce(Handler):
    """Reduce* over axes that do not include the channel axis."""

    def propagate(self, node: ir.Node, ctx: Ctx) -> None:
        lay = ctx.layout(node.inputs[0])
        r = rank(node.inputs[0])
        axes = const_ints(node, 1, "axes")
        if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
            ctx.block(lay.atoms, node, "reduced axes are computed at run time")
            return
        if r is None:
            ctx.block(lay.atoms, node, "rank unknown after shape inference")
            return
        if not axes:
            if attr_int(node, "noop_with_empty_axes", 0):
                ctx.set_layout(node.outputs[0], lay)
            else:
                ctx.block(lay.atoms, node, "reduces over every axis, the channel axis included")
            return
        axes = [_norm_axis(a, r) for a in axes]
        if lay.axis in axes:
            ctx.block(lay.atoms, node, "reduces over the channel axis")
            return
        keep = attr_int(node, "keepdims", 1)
        axis = lay.axis if keep else lay.axis - sum(a < lay.axis for a in axes)
        ctx.set_layout(node.outputs[0], Layout(axis, lay.atoms))


class Softmax(Handler):
    """Softmax-like ops normalise over an axis; the channel axis must not be it."""

    def propagate(self, node: ir.Node, ctx: Ctx) -> None:
        lay = ctx.layout(node.inputs[0])
        r = rank(node.inputs[0])
        if r is None:
            ctx.block(lay.atoms, node, "rank unknown after shape inference")
            return
        new_semantics = ctx.opset >= 13
        axis = _norm_axis(attr_int(node, "axis", -1 if new_semantics else 1), r)
        touches = lay.axis == axis if new_semantics else lay.axis >= axis
        if touches:
            ctx.block(lay.atoms, node, "normalises over the channel axis")
            return
        ctx.set_layout(node.outputs[0], lay)


class Resize(Handler):
    """Resize/Upsample: scale 1 on the channel axis; constant sizes are rewritten."""

    def propagate(self, node: ir.Node, ctx: Ctx) -> None:
        ins = _layouts(node, ctx)
        lay = ins[0]
        if lay is None or any(x is not None for x in ins[1:]):
            _block_all(node, ctx, "channels reach the resize parameters")
            return
        scales_index = 1 if node.op_type == "Upsample" else 2
        if node.op_type == "Resize" and len(node.inputs) > 3 and node.inputs[3] is not None:
            sizes = const_array(node.inputs[3])
            if sizes is None:
                ctx.block(lay.atoms, node, "output sizes are computed at run time")
                return
            if node.attributes.get("axes") is not None:
                ctx.block(lay.atoms, node, "Resize with explicit axes is not supported")
                return
            ctx.edit(SetCount(node, 3, None, lay.axis, lay.atoms))
        elif len(node.inputs) > scales_index and node.inputs[scales_index] is not None:
            scales = const_array(node.inputs[scales_index])
            if scales is not None and scales.size == 0:
                pass
            elif scales is None or node.attributes.get("axes") is not None:
                ctx.block(lay.atoms, node, "scales are computed at run time")
                return
            elif float(scales.reshape(-1)[lay.axis]) != 1.0:
                ctx.block(lay.atoms, node, "resizes the channel axis")
                return
        ctx.set_layout(node.outputs[0], lay)


class Pad(Handler):
    """Pad on spatial axes only."""

    def propagate(self, node: ir.Node, ctx: Ctx) -> None:
        ins = _layouts(node, ctx)
        lay = ins[0]
        if lay is None or any(x is not None for x in ins[1:]):
            _block_all(node, ctx, "channels reach the pad parameters")
            return
        r = rank(node.inputs[0])
        pads = const_ints(node, 1, "pads")
        if pads is None or r is None:
            ctx.block(lay.atoms, node, "pads are computed at run time")
            return
        axes = const_ints(node, 3, "axes") if len(node.inputs) > 3 else None
        axes = [_norm_axis(a, r) for a in axes] if axes is not None else list(range(r))
        n = len(axes)
        if lay.axis in axes:
            k = axes.index(lay.axis)
            if pads[k] != 0 or pads[k + n] != 0:
                ctx.block(lay.atoms, node, "pads the channel axis")
                return
        ctx.set_layout(node.outputs[0], lay)


class ShapeOf(Handler):
    """Shape: harmless while its result is only read at positions other than the channels'."""

    def propagate(self, node: ir.Node, ctx: Ctx) -> None:
        lay = ctx.layout(node.inputs[0])
        r = rank(node.inputs[0])
        if r is None:
            ctx.block(lay.atoms, node, "rank unknown after shape inference")
            return
        # Opset 15 start/end: negative values count from the back, then clamp to [0, r].
        start, end = attr_int(node, "start", 0), attr_int(node, "end", r)
        start = min(max(start + r if start < 0 else start, 0), r)
        end = min(max(end + r if end < 0 else end, 0), r)
        if not start <= lay.axis < end:
            return  # the channel axis is not part of the result
        pos, n = lay.axis - start, end - start
        if node.outputs[0].is_graph_output():
            # Its value would change although its shape does not: verify cannot see it.
            ctx.block(lay.atoms, node, "the channel count is a graph output")
            return
        for use in node.outputs[0].uses():
            if pos in _shape_positions_read(use, n):
                ctx.block(lay.atoms, node, "the channel count is read at run time")
                return


def _shape_positions_read(use, n: int) -> set[int] | range:
    """Which entries of a Shape output of length ``n`` its reader ``use`` reads: a Gather or
    a step-1 Slice with constant indices reads those; any other reader reads them all."""
    user = use.node
    if use.idx == 0 and user.op_type == "Gather" and attr_int(user, "axis", 0) == 0:
        idx = const_array(user.inputs[1])
        if idx is not None:
            return {int(i) % n for i in np.asarray(idx).reshape(-1)}
    if use.idx == 0 and user.op_type == "Slice" and len(user.inputs) >= 3:
        bounds = [const_array(v) if v is not None else None for v in user.inputs[1:]]
        starts, ends = bounds[0], bounds[1]
        axes = bounds[2] if len(bounds) > 2 else None
        steps = bounds[3] if len(bounds) > 3 else None
        if (starts is not None and ends is not None and starts.size == 1
                and (axes is None or int(np.asarray(axes).reshape(-1)[0]) in (0, -1))
                and (steps is None or int(np.asarray(steps).reshape(-1)[0]) == 1)):
            lo, hi, _ = slice(int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])).indices(n)
            return set(range(lo, hi))
    return range(n)


_UNARY = Unary()
_ELEMENTWISE = Elementwise()
_POOL = Pool()
_REDUCE = Reduce()
_SOFTMAX = Softmax()
_CONTROL = ControlFlow()

OP_TABLE: dict[str, Handler] = {
    # pass-through
    **{
        op: _UNARY
        for op in (
            "Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Clip", "Elu",
            "Selu", "Celu", "Softplus", "Softsign", "Gelu", "Erf", "Mish", "ThresholdedRelu",
            "Shrink", "Identity", "Dropout", "Cast", "Neg", "Abs", "Sqrt", "Exp", "Log", "Swish",
            "Reciprocal", "Floor", "Ceil", "Round", "Sin", "Cos", "Sign", "IsNaN", "IsInf", "Not",
        )
    },
    # broadcasting: sliced constants, coupled computed operands
    **{
        op: _ELEMENTWISE
        for op in (
            "Add", "Sub", "Mul", "Div", "Pow", "PRelu", "Max", "Min", "Sum", "Mean", "Where",
            "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor",
        )
    },
    "BatchNormalization": NormParams(),
    "InstanceNormalization": NormParams(),
    # producers / consumers
    "Conv": Conv(),
    "ConvTranspose": ConvTranspose(),
    "Gemm": Gemm(),
    "MatMul": MatMul(),
    # index mappings
    "Concat": Concat(),
    "Split": Split(),
    "Slice": Slice(),
    "Transpose": Transpose(),
    "Gather": Gather(),
    "Flatten": Flatten(),
    "Reshape": Reshape(),
    "Squeeze": Squeeze(),
    "Unsqueeze": Unsqueeze(),
    # conditional pass-through
    **{op: _POOL for op in ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool")},
    **{
        op: _REDUCE
        for op in (
            "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1",
            "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
        )
    },
    **{op: _SOFTMAX for op in ("Softmax", "LogSoftmax", "Hardmax")},
    "Resize": Resize(),
    "Upsample": Resize(),
    "Pad": Pad(),
    "Shape": ShapeOf(),
    # known blockers, with the reason the report gives
    "LayerNormalization": Block("normalises over the channel (hidden) axis: every kept value would change"),
    "GroupNormalization": Block("channel groups are normalised together"),
    "LpNormalization": Block("normalises over an axis that may carry the channels"),
    "If": _CONTROL,
    "Loop": _CONTROL,
    "Scan": _CONTROL,
}


_DEFAULT_DOMAINS = ("", "ai.onnx")
# Ops of other domains (contrib or custom ops), by (domain, op_type): only register_op adds here.
DOMAIN_TABLE: dict[tuple[str, str], Handler] = {}


def handler_for(node: ir.Node) -> Handler | None:
    """The table entry for ``node``, or None for an op onnxprune does not know."""
    if node.domain in _DEFAULT_DOMAINS:
        return OP_TABLE.get(node.op_type)
    return DOMAIN_TABLE.get((node.domain, node.op_type))


def register_op(op_type: str, domain: str, handler: Handler, *, replace: bool = False) -> None:
    """Tell onnxprune how ``domain::op_type`` treats channels (``""`` or ``"ai.onnx"``: the
    default domain).  Registering an op that already has a handler (a built-in one or an
    earlier registration) raises :class:`~onnxprune.InputError` unless ``replace=True``.

    The table is read by the analysis, which runs in the calling process only (with Ray too):
    register before calling ``prune``/``analyze``.
    """
    if not isinstance(op_type, str) or not op_type:
        raise InputError(f"register_op: op_type must be a non-empty string, got {op_type!r}")
    if not isinstance(domain, str):
        raise InputError(f"register_op: domain must be a string, got {domain!r}")
    if not isinstance(handler, Handler):
        kind = f"the class {handler.__name__}: pass an instance" if isinstance(handler, type) else type(handler).__name__
        raise InputError(f"register_op: handler must be an onnxprune.Handler instance, got {kind}")
    default = domain in _DEFAULT_DOMAINS
    table, key = (OP_TABLE, op_type) if default else (DOMAIN_TABLE, (domain, op_type))
    if key in table and not replace:
        where = op_type if default else f"{domain}::{op_type}"
        raise InputError(f"register_op: '{where}' already has a handler ({type(table[key]).__name__}); "
                         "pass replace=True to replace it")
    table[key] = handler

