"""``relative``: relative importance from contribution distributions (Hussien et al., seed 000).

What is the paper's (confirmed in METHODS.md, from the abstract):

* importance is measured per *weight* from its contribution to its neuron's output,
  ``c_jk(n) = W_jk·x_k(n)``;
* a distribution of those contributions is built over the data set and its parameters
  guide the pruning;
* an "activation blind range": inputs where the activation's derivative is 0 (``z <= 0``
  for ReLU), inside which removing a weight changes nothing.

What is onnxprune's reading (METHODS.md marks it *inferred*; every item is one function
or constant here, so it is easy to change):

* the relative contribution is a ratio per sample,
  ``r_jk(n) = |c_jk(n)| / (Σ_i |c_ji(n)| + |b_j|)`` (:func:`relative_contributions`);
  a sample where the denominator is 0 (all inputs 0, no bias) counts as ``r = 0``;
* blind range: when the consumer's output reaches a flat region of its activation both
  with and without ``c_jk(n)``, ``r_jk(n) = 0`` for that sample.  The activation is found
  in the graph (:func:`blind_range`): the consumer's output, used once, may pass through
  BatchNormalization (inference), Add/Sub/Mul/Div by a per-channel constant,
  Identity/Dropout and MaxPool (only before a non-decreasing activation, with
  non-negative scales after the pool) on its way to one of ``Relu`` (flat ``u <= 0``),
  ``Clip`` (flat ``u <= min`` and ``u >= max``), ``HardSigmoid`` (``α > 0``: both ends),
  ``HardSwish`` (``u <= -3``) or ``ThresholdedRelu`` (``u <= α``).  ``u`` is the
  activation's *input*: the affine ops on the way are applied exactly, so a
  Conv→BN→Relu is judged by the BN output, not by the raw Conv output.  Anything else
  (a residual Add of a computed tensor, LeakyRelu, GELU, ...) has no blind range;
* the distribution's parameters are the mean ``μ_jk`` and the population standard
  deviation ``σ_jk`` of ``r_jk`` over the calibration rows, streamed as float64
  ``Σr``, ``Σr²`` and a row count (memory O×C per consumer, never a batch kept);
* a connection is kept when ``μ_jk + z·σ_jk >= τ``; structured, a channel's importance
  is ``I_k = max_j (μ_jk + z·σ_jk)`` over every consumer that reads it, and with ``τ``
  set a channel is removed when all its outgoing connections are prunable (``I_k < τ``);
* Conv consumers: a row is one sampled output position; the patch the kernel sees there
  is gathered (im2col, zero padding as the Conv does) and ``c_jk = Σ_taps W[j,k,tap]·
  patch[k,tap]``, so ``z_j = Σ_k c_jk + b_j`` is exactly the Conv's output at that
  position.  A grouped Conv's output j reads only its group's channels;
  ConvTranspose rows are output positions too (the taps that land there).
  Gemm/MatMul consumers: a row is one sample (MatMul: one token);
* a Gemm after Flatten reads every channel as a block of features: the distributions
  are per feature, and a channel's ``μ+zσ`` is the **max** over its features (and over
  its consumers), the same "all outgoing connections prunable" logic as ``I_k``;
* budgets: ``--ratio`` and ``--target-macs``/``--target-params`` rank channels by
  ``S_k = Σ_j (μ_jk + z·σ_jk)`` (summed over consumers and flattened features; the τ rule
  keeps ``I_k = max``, its "every connection prunable" meaning) through the generic selection (per-group standardised scores, one global threshold).
  A single *raw* global ``τ`` bisected to the budget was measured and rejected: ``r``
  scales like 1/fan-in (the shares of a unit's inputs sum to at most 1), so channels read
  by a wide consumer (the 3136-input Gemm of the shipped CNN) all fall below any ``τ``
  that touches the convs, and that layer collapses
  (benchmarks/RESULTS.md, "Design measurements").  An
  explicit ``--tau`` is absolute in the same way: choose it per model; ``min_keep``
  keeps every group alive.

Ranked by that max, the shipped CNN at a MACs budget fell below random selection
(benchmarks/RESULTS.md, "Design measurements").  With per-position
rows, background positions dominate ``μ``, and bias-like channels (nearly constant
activations, harmless to remove once their mean moves into the bias) get the largest
shares; the max over j rewards a channel that dominates any single unit.  Ranking by
``Σ_j (μ_jk + z·σ_jk)`` instead did far better, so budgets rank by that sum (onnxprune's
choice, a deviation from METHODS.md's ``I_k = max_j``, which the τ rule keeps).

Out of scope: the paper's pruning-aware (regularised) training.  onnxprune converts a
trained model and never trains, so it applies the criterion to the weights as they are.

Knobs: ``MethodOptions.z`` (``--z``, default 1), ``MethodOptions.tau`` (``--tau``; None:
rank by ``I_k`` for ``--ratio``/targets), ``MethodOptions.min_keep``, ``MethodOptions.seed``
(position sampling); module constants :data:`MAX_ROWS` (sampled rows per batch and
consumer), :data:`CHUNK_ELEMENTS` (work array size, bounds peak memory) and
:data:`WORK_DTYPE` (per-row arithmetic; the sums are float64).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_ir as ir

from .._graph import attr_int, attr_ints, const_array, rank
from ..calibrate import InputRef, MethodKey, StatRequest, Statistics
from ..consumers import ConsumerView
from ..groups import Analysis, Group
from ..select import select as select_by_scores
from . import Criterion, MethodOptions, register_criterion

MAX_ROWS = 1024  # rows (Conv: output positions) sampled per batch and consumer
CHUNK_ELEMENTS = 1 << 21  # rows are processed in chunks of about this many (j, k) entries
# Per-row work arrays (contributions, ratios) are float32 like the model's own arithmetic,
# which halves the memory traffic of the hot loop; every sum over rows is float64.
WORK_DTYPE = np.float32


# ----------------------------------------------------------------------------- the formula


@dataclass(frozen=True, eq=False)
class Blind:
    """The flat regions of the activation after a consumer, per output channel j.

    ``u = scale·z + shift`` is the activation's input for the consumer's output ``z``; the
    activation is flat (derivative 0) for ``u <= lo`` and for ``u >= hi``.
    """

    scale: np.ndarray  # [O]
    shift: np.ndarray  # [O]
    lo: float | None
    hi: float | None
    op: str = ""  # the activation found, for reports

    def take(self, j0: int, j1: int) -> "Blind":
        """The same activation for outputs j0..j1-1."""
        return Blind(self.scale[j0:j1], self.shift[j0:j1], self.lo, self.hi, self.op)

    def flat(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lo = u <= self.lo if self.lo is not None else np.zeros(u.shape, dtype=bool)
        hi = u >= self.hi if self.hi is not None else np.zeros(u.shape, dtype=bool)
        return lo, hi


def relative_contributions(c: np.ndarray, bias: np.ndarray, blind: Blind | None) -> tuple[np.ndarray, np.ndarray]:
    """``r_jk(n)`` for contributions ``c`` [rows, O, K] of one consumer with bias [O].

    Returns (r [rows, O, K], blind mask [rows, O, K]).  ``r`` is the per-sample share
    ``|c_jk| / (Σ_i |c_ji| + |b_j|)`` (0 where the denominator is 0), set to 0 where the
    activation is flat both with and without ``c_jk`` (the blind range).  Works in
    ``c``'s dtype with few full-size temporaries: this is the hot loop of calibration.
    """
    r = np.abs(c)
    den = r.sum(axis=2, dtype=np.float64) + np.abs(bias)[None, :]
    inv = np.divide(1.0, den, out=np.zeros_like(den), where=den > 0)
    r *= inv.astype(r.dtype)[:, :, None]
    mask = np.zeros(r.shape, dtype=bool)
    if blind is None:
        return r, mask
    z = c.sum(axis=2, dtype=np.float64) + bias[None, :]  # the consumer's output at this row
    u = blind.scale[None, :] * z + blind.shift[None, :]  # the activation's input
    # Without c_jk the input is u - s_j·c_jk.  For u <= lo that stays flat iff
    # s_j·c_jk >= u - lo, i.e. c_jk >= (u - lo)/s_j (<= when s_j < 0); for u >= hi iff
    # c_jk <= (u - hi)/s_j (>= when s_j < 0).  s_j = 0: u does not depend on z at all.
    s = blind.scale
    neg, zero = s < 0, s == 0
    safe = np.where(zero, 1.0, s)
    for bound, upper in ((blind.lo, False), (blind.hi, True)):
        if bound is None:
            continue
        inside = (u >= bound) if upper else (u <= bound)  # [rows, O]
        if not inside.any():
            continue
        thr = ((u - bound) / safe[None, :]).astype(c.dtype)[:, :, None]
        stays = (c <= thr) if upper else (c >= thr)
        if neg.any():
            stays[:, neg] = (c[:, neg] >= thr[:, neg]) if upper else (c[:, neg] <= thr[:, neg])
        stays[:, zero] = True
        stays &= inside[:, :, None]
        mask |= stays
    np.copyto(r, 0, where=mask)
    return r, mask


# ----------------------------------------------------------------------------- consumers


@dataclass
class Spec:
    """What a consumer needs to turn a batch of its input into contributions.

    ``weight`` is [O, K, T] in WORK_DTYPE: output j, input k (Conv: within j's group),
    kernel tap t (T = 1 for Gemm/MatMul).  Gemm's ``alpha`` is folded in, ``beta·C`` is
    ``bias`` (float64).
    """

    kind: str  # "dense", "conv" or "convT"
    weight: np.ndarray
    bias: np.ndarray
    blind: Blind | None
    channels: int  # C: length of the input's channel axis
    axis: int  # channel axis of the input
    group: int = 1
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()  # begins then ends (explicit pads)
    auto_pad: str = "NOTSET"
    output_padding: tuple[int, ...] = ()
    output_shape: tuple[int, ...] | None = None
    transpose_a: bool = False

    @property
    def outputs(self) -> int:
        return int(self.weight.shape[0])


def _per_channel(arr: np.ndarray | None, out_rank: int | None, axis: int, size: int) -> np.ndarray | None:
    """``arr`` as one value per channel of axis ``axis`` when it broadcasts that way, else None."""
    if arr is None or out_rank is None:
        return None
    a = np.asarray(arr, dtype=np.float64)
    if a.ndim > out_rank:
        return None
    a = a.reshape((1,) * (out_rank - a.ndim) + a.shape)
    if any(a.shape[d] != 1 for d in range(out_rank) if d != axis) or a.shape[axis] not in (1, size):
        return None
    return np.broadcast_to(a.reshape(-1), (size,)).copy()


def _flat_region(node: ir.Node) -> tuple[float | None, float | None, bool] | None:
    """(lo, hi, monotone) of an activation whose derivative is 0 somewhere, else None."""
    op = node.op_type
    if op == "Relu":
        return 0.0, None, True
    if op == "Clip":
        def bound(index: int, name: str) -> float | None:
            if len(node.inputs) > index and node.inputs[index] is not None:
                v = const_array(node.inputs[index])
                return None if v is None else float(np.asarray(v).reshape(-1)[0])
            a = node.attributes.get(name)  # opset < 11
            return None if a is None else float(a.value)

        if any(len(node.inputs) > i and node.inputs[i] is not None and const_array(node.inputs[i]) is None for i in (1, 2)):
            return None  # a bound computed at run time
        lo, hi = bound(1, "min"), bound(2, "max")
        return (lo, hi, True) if lo is not None or hi is not None else None
    if op == "HardSigmoid":
        a, b = node.attributes.get("alpha"), node.attributes.get("beta")
        alpha = 0.2 if a is None else float(a.value)
        beta = 0.5 if b is None else float(b.value)
        return (-beta / alpha, (1.0 - beta) / alpha, True) if alpha > 0 else None
    if op == "HardSwish":
        return -3.0, None, False
    if op == "ThresholdedRelu":
        a = node.attributes.get("alpha")
        alpha = 1.0 if a is None else float(a.value)
        return alpha, None, alpha >= 0
    return None


def blind_range(start: ir.Value, axis: int, size: int) -> Blind | None:
    """The activation flat regions seen from the consumer output ``start`` (channel axis
    ``axis``, ``size`` channels), or None when its output does not reach a ReLU-like
    activation through per-channel affine ops only (see the module docstring)."""
    scale, shift = np.ones(size), np.zeros(size)
    out_rank = rank(start)
    value, pooled = start, False
    for _ in range(16):
        uses = list(value.uses())
        if value.is_graph_output() or len(uses) != 1:
            return None  # another reader would see the change
        node, idx = uses[0].node, uses[0].idx
        if node.domain not in ("", "ai.onnx"):
            return None
        op = node.op_type
        if op == "BatchNormalization":
            params = [const_array(v) if v is not None else None for v in node.inputs[1:5]]
            if idx != 0 or axis != 1 or any(p is None for p in params) or attr_int(node, "training_mode", 0):
                return None
            gamma, beta, mean, var = (np.asarray(p, dtype=np.float64).reshape(-1) for p in params)
            eps = node.attributes.get("epsilon")
            k = gamma / np.sqrt(var + (1e-5 if eps is None else float(eps.value)))
            if pooled and (k < 0).any():
                return None
            scale, shift = scale * k, shift * k + (beta - mean * k)
        elif op in ("Add", "Sub", "Mul", "Div") and len(node.inputs) == 2:
            c = _per_channel(const_array(node.inputs[1 - idx]), out_rank, axis, size)
            if c is None:
                return None
            if op == "Add":
                shift = shift + c
            elif op == "Sub":
                scale, shift = (scale, shift - c) if idx == 0 else (-scale, c - shift)
            elif op == "Mul":
                scale, shift = scale * c, shift * c
            elif idx == 0 and (c != 0).all():
                scale, shift = scale / c, shift / c
            else:
                return None
            if pooled and (scale < 0).any():
                return None
        elif op in ("Identity", "Dropout") and idx == 0:
            pass
        elif op == "MaxPool" and idx == 0:
            # act(max_p u_p) = max_p act(u_p) for a non-decreasing act, so an element that
            # stays in the flat region leaves the pooled output unchanged.  Affine maps
            # before the pool act per element; after it they must keep the order.
            pooled = True
        else:
            found = _flat_region(node) if idx == 0 else None
            if found is None or (pooled and not found[2]):
                return None
            return Blind(scale, shift, found[0], found[1], op)
        if len(node.outputs) < 1 or any(o.uses() for o in node.outputs[1:]):
            return None  # MaxPool indices, BN training outputs
        value = node.outputs[0]
    return None


def consumer_spec(view: ConsumerView) -> Spec | None:
    """The :class:`Spec` of a consumer, or None for an op this method cannot read."""
    node = view.node
    op = node.op_type
    w = view.weight()
    c = len(view.atoms)
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    if op in ("Conv", "ConvTranspose"):
        nd = w.ndim - 2
        o = int(w.shape[0] if op == "Conv" else w.shape[1])
        bias = np.zeros(o) if bias_value is None else np.asarray(const_array(bias_value), np.float64).reshape(-1)
        kernel = tuple(attr_ints(node, "kernel_shape") or w.shape[2:])
        common = dict(
            bias=bias, blind=blind_range(node.outputs[0], 1, o), channels=c, axis=view.axis,
            kernel=tuple(int(k) for k in kernel), strides=tuple(attr_ints(node, "strides") or [1] * nd),
            dilations=tuple(attr_ints(node, "dilations") or [1] * nd), pads=tuple(attr_ints(node, "pads") or [0] * 2 * nd),
            auto_pad=str(node.attributes["auto_pad"].value) if "auto_pad" in node.attributes else "NOTSET",
        )
        if op == "Conv":
            return Spec("conv", w.reshape(o, w.shape[1], -1).astype(WORK_DTYPE), group=attr_int(node, "group", 1), **common)
        shape = attr_ints(node, "output_shape")
        return Spec(
            "convT", np.ascontiguousarray(np.moveaxis(w.reshape(w.shape[0], o, -1), 1, 0), dtype=WORK_DTYPE),
            output_padding=tuple(attr_ints(node, "output_padding") or [0] * nd),
            output_shape=tuple(shape[-nd:]) if shape else None, **common,
        )
    if op == "Gemm":
        alpha = node.attributes.get("alpha")
        beta = node.attributes.get("beta")
        alpha = 1.0 if alpha is None else float(alpha.value)
        beta = 1.0 if beta is None else float(beta.value)
        weight = alpha * (w if attr_int(node, "transB", 0) else w.T)  # [O, K]
        o = weight.shape[0]
        bias = np.zeros(o)
        if bias_value is not None:
            cb = np.asarray(const_array(bias_value), np.float64)
            per = _per_channel(cb, 2, 1, o)
            # A C with one row per sample has no per-channel bias: its mean stands in.
            bias = beta * (per if per is not None else cb.reshape(-1, o).mean(axis=0))
        return Spec("dense", weight[:, :, None].astype(WORK_DTYPE), bias, blind_range(node.outputs[0], 1, o), c, view.axis,
                    transpose_a=bool(attr_int(node, "transA", 0)))
    if op == "MatMul":
        weight = w.T  # [O, K]
        o = weight.shape[0]
        out = node.outputs[0]
        r = rank(out)
        bias, tail = np.zeros(o), out
        uses = list(out.uses())
        if r is not None and len(uses) == 1 and not out.is_graph_output() and uses[0].node.op_type == "Add":
            add = uses[0].node
            b = _per_channel(const_array(add.inputs[1 - uses[0].idx]), r, r - 1, o)
            if b is not None:  # MatMul + Add(constant) is the exporter's Linear: that is the bias
                bias, tail = b, add.outputs[0]
        blind = None if r is None else blind_range(tail, r - 1, o)
        return Spec("dense", weight[:, :, None].astype(WORK_DTYPE), bias, blind, c, view.axis)
    return None


# ----------------------------------------------------------------------------- rows


def _conv_padding(spec: Spec, spatial: tuple[int, ...]) -> list[int]:
    """Begin padding per spatial dim of a Conv (explicit or auto_pad)."""
    nd = len(spatial)
    if spec.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        out = []
        for size, k, s, d in zip(spatial, spec.kernel, spec.strides, spec.dilations):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            out.append(total // 2 if spec.auto_pad == "SAME_UPPER" else total - total // 2)
        return out
    if spec.auto_pad == "VALID":
        return [0] * nd
    return list(spec.pads[:nd])


def _conv_out(spec: Spec, spatial: tuple[int, ...], begin: list[int]) -> list[int]:
    nd = len(spatial)
    if spec.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return [-(-size // s) for size, s in zip(spatial, spec.strides)]
    ends = [0] * nd if spec.auto_pad == "VALID" else list(spec.pads[nd:])
    return [
        (size + b + e - (k - 1) * d - 1) // s + 1
        for size, b, e, k, d, s in zip(spatial, begin, ends, spec.kernel, spec.dilations, spec.strides)
    ]


def _convT_geometry(spec: Spec, spatial: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """(begin padding, output size) per spatial dim of a ConvTranspose (onnxruntime's rules)."""
    nd = len(spatial)
    full = [
        s * (size - 1) + op + (k - 1) * d + 1
        for size, s, op, k, d in zip(spatial, spec.strides, spec.output_padding, spec.kernel, spec.dilations)
    ]
    if spec.output_shape is not None or spec.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        out = list(spec.output_shape) if spec.output_shape is not None else [size * s for size, s in zip(spatial, spec.strides)]
        begin = []
        for f, o in zip(full, out):
            total = max(f - o, 0)
            begin.append(total - total // 2 if spec.auto_pad == "SAME_LOWER" else total // 2)
        return begin, out
    pads = [0] * 2 * nd if spec.auto_pad == "VALID" else list(spec.pads)
    return pads[:nd], [f - pads[i] - pads[nd + i] for i, f in enumerate(full)]


def _pick(total: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(total) if total <= limit else np.sort(rng.choice(total, limit, replace=False))


def sampled_patches(spec: Spec, x: np.ndarray, rng: np.random.Generator, limit: int = MAX_ROWS) -> np.ndarray:
    """The input a Conv/ConvTranspose sees at sampled output positions: [P, C, T].

    ``patch[p, k, t]`` is the input value kernel tap ``t`` multiplies for channel ``k`` at
    output position ``p`` (0 in the padding; ConvTranspose: 0 where no input lands).
    """
    spatial = tuple(int(s) for s in x.shape[2:])
    if spec.kind == "conv":
        begin = _conv_padding(spec, spatial)
        out = _conv_out(spec, spatial, begin)
    else:
        begin, out = _convT_geometry(spec, spatial)
    per = int(np.prod(out))
    pick = _pick(x.shape[0] * per, limit, rng)
    b, rest = np.divmod(pick, per)
    where = np.unravel_index(rest, out)
    taps = list(itertools.product(*[range(k) for k in spec.kernel]))
    patches = np.zeros((len(pick), x.shape[1], len(taps)), dtype=WORK_DTYPE)
    for ti, tap in enumerate(taps):
        valid = np.ones(len(pick), dtype=bool)
        index = []
        for dim, (o, t) in enumerate(zip(where, tap)):
            s, d, size = spec.strides[dim], spec.dilations[dim], spatial[dim]
            if spec.kind == "conv":
                i = o * s + t * d - begin[dim]
            else:  # output o gets input i through tap t when i·s + t·d - begin == o
                num = o + begin[dim] - t * d
                valid &= num % s == 0
                i = num // s
            valid &= (i >= 0) & (i < size)
            index.append(np.clip(i, 0, size - 1))
        vals = x[(b, slice(None), *index)]  # [P, C]: advanced indices first
        patches[:, :, ti] = np.where(valid[:, None], vals, 0.0)
    return patches


def contributions(spec: Spec, x: np.ndarray, rng: np.random.Generator, limit: int = MAX_ROWS) -> np.ndarray:
    """``c_jk`` at sampled rows of one batch: [P, O, K] (K: inputs per group).

    Dense: a row is a sample (MatMul: a token).  Conv: a row is an output position, and
    ``c_jk = Σ_t W[j,k,t]·patch[k,t]``.  The whole array at once (tests, inspection);
    the accumulator goes through :func:`row_chunks` instead.
    """
    blocks: dict[int, list[np.ndarray]] = {}
    for j0, _, c in row_chunks(spec, x, rng, limit):
        blocks.setdefault(j0, []).append(c)
    return np.concatenate([np.concatenate(blocks[j0], axis=0) for j0 in sorted(blocks)], axis=1)


def row_chunks(spec: Spec, x: np.ndarray, rng: np.random.Generator, limit: int = MAX_ROWS):
    """:func:`contributions` as ``(j0, j1, c[rows, j0:j1, K])`` pieces whose size stays
    near CHUNK_ELEMENTS, so peak memory does not grow with the batch or the layer width.
    Every row is yielded once per output block (dense consumers wider than the budget
    are split over outputs j; r_jk(n) only needs row j of c)."""
    o = spec.outputs
    if spec.kind == "dense":
        rows = np.moveaxis(x, spec.axis, -1).reshape(-1, spec.channels) if not spec.transpose_a else x.T
        rows = rows[_pick(rows.shape[0], limit, rng)]
        w = spec.weight[:, :, 0].astype(WORK_DTYPE, copy=False)
        block = max(1, min(o, CHUNK_ELEMENTS // max(spec.channels, 1)))
        step = max(1, CHUNK_ELEMENTS // max(block * spec.channels, 1))
        for s in range(0, rows.shape[0], step):
            part = rows[s : s + step].astype(WORK_DTYPE)[:, None, :]
            for j0 in range(0, o, block):
                yield j0, min(j0 + block, o), part * w[None, j0 : j0 + block]
        return
    patches = sampled_patches(spec, x, rng, limit)  # [P, C, T]
    g = spec.group
    k = spec.channels // g
    step = max(1, CHUNK_ELEMENTS // max(o * k * spec.weight.shape[2], 1))
    if spec.kind == "conv":
        # c[p, j, k] = Σ_t patch[p, g(j)·K + k, t]·W[j, k, t]: one batched matmul per (group, k).
        w = spec.weight.astype(WORK_DTYPE, copy=False).reshape(g, o // g, k, -1).transpose(0, 2, 3, 1)  # [G, K, T, O/G]
        for s in range(0, patches.shape[0], step):
            p = patches[s : s + step].reshape(-1, g, k, patches.shape[2]).transpose(1, 2, 0, 3)  # [G, K, P, T]
            c = np.matmul(p, w)  # [G, K, P, O/G]
            yield 0, o, c.transpose(2, 0, 3, 1).reshape(c.shape[2], o, k)
    else:
        w = spec.weight.astype(WORK_DTYPE, copy=False).transpose(1, 2, 0)  # [K, T, O]
        for s in range(0, patches.shape[0], step):
            c = np.matmul(patches[s : s + step].transpose(1, 0, 2), w)  # [K, P, O]
            yield 0, o, c.transpose(1, 2, 0)


# ----------------------------------------------------------------------------- accumulator


@dataclass
class RelativeStats:
    """Streaming ``Σr``, ``Σr²`` per connection (j, k) of one consumer, float64.

    ``k`` is the input index within j's group (Conv weight layout [O, C/group]).
    """

    spec: Spec
    seed: int = 0
    limit: int = MAX_ROWS
    n: int = 0
    s1: np.ndarray | None = None
    s2: np.ndarray | None = None
    blind: int = 0  # (row, j, k) entries zeroed by the blind range
    batches: int = 0

    def update(self, x: np.ndarray) -> None:
        # Seeded per batch, so a rerun samples the same positions.
        rng = np.random.default_rng([self.seed, self.batches])
        self.batches += 1
        if self.s1 is None:
            shape = self.spec.weight.shape[:2]
            self.s1, self.s2 = np.zeros(shape), np.zeros(shape)
        spec = self.spec
        for j0, j1, c in row_chunks(spec, np.asarray(x), rng, self.limit):
            blind = spec.blind if spec.blind is None or (j0, j1) == (0, spec.outputs) else spec.blind.take(j0, j1)
            r, mask = relative_contributions(c, spec.bias[j0:j1], blind)
            if j0 == 0:  # a row is seen once per output block
                self.n += r.shape[0]
            self.s1[j0:j1] += r.sum(axis=0, dtype=np.float64)
            self.s2[j0:j1] += np.square(r, out=r).sum(axis=0, dtype=np.float64)
            self.blind += int(np.count_nonzero(mask))

    def merge(self, other: "RelativeStats") -> "RelativeStats":
        if other.s1 is None:
            return self
        if self.s1 is None:
            return other
        return RelativeStats(self.spec, self.seed, self.limit, self.n + other.n, self.s1 + other.s1,
                             self.s2 + other.s2, self.blind + other.blind, self.batches + other.batches)

    @property
    def mean(self) -> np.ndarray:
        return self.s1 / max(self.n, 1)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(np.maximum(self.s2 / max(self.n, 1) - self.mean**2, 0.0))

    def bound(self, z: float) -> np.ndarray:
        """``μ_jk + z·σ_jk`` per connection [O, K]."""
        return self.mean + z * self.std

    def importance(self, z: float, how: str = "max") -> np.ndarray:
        """``max_j`` (or ``Σ_j``) of ``μ_jk + z·σ_jk`` per index of the input's channel axis [C]."""
        b = self.bound(z)
        spec = self.spec
        reduce = np.max if how == "max" else np.sum
        if spec.group == 1:
            return reduce(b, axis=0)
        k = spec.channels // spec.group
        per = reduce(b.reshape(spec.group, spec.outputs // spec.group, k), axis=1)  # [G, K]
        return per.reshape(spec.channels)


def _key(view: ConsumerView) -> MethodKey:
    return MethodKey("relative", InputRef.of(view))


def accumulator_for(stats: Statistics | None, view: ConsumerView) -> RelativeStats | None:
    """The calibrated :class:`RelativeStats` of one consumer (None when not gathered)."""
    return None if stats is None else stats.extra.get(_key(view))


# ----------------------------------------------------------------------------- the method


class Relative(Criterion):

    def requests(self, analysis: Analysis, views: list[ConsumerView], opts: MethodOptions) -> list[StatRequest]:
        out = []
        for i, view in enumerate(views):
            spec = consumer_spec(view)
            if spec is None:
                continue
            out.append(StatRequest(_key(view), view.value, _factory(spec, opts.seed * 1_000_003 + i)))
        return out

    def class_importance(
        self, analysis: Analysis, stats: Statistics, views: list[ConsumerView], z: float, how: str = "max"
    ) -> dict[int, float]:
        """Class root -> ``I_k``: the largest (``how="max"``) or the total (``"sum"``)
        ``μ+zσ`` of the connections leaving the class (every consumer, every flattened feature)."""
        measured = np.zeros(len(analysis.roots), dtype=bool)
        acc_total = np.full(len(analysis.roots), -np.inf) if how == "max" else np.zeros(len(analysis.roots))
        for view in views:
            acc = accumulator_for(stats, view)
            if acc is None or acc.s1 is None or acc.n == 0:
                continue
            roots = analysis.roots[view.atoms]
            if how == "max":
                np.maximum.at(acc_total, roots, acc.importance(z, "max"))
            else:
                np.add.at(acc_total, roots, acc.importance(z, "sum"))
            measured[roots] = True
        return {int(r): float(acc_total[r]) for r in np.flatnonzero(measured)}

    def scores(self, analysis: Analysis, stats: Statistics, views: list[ConsumerView], opts: MethodOptions) -> dict[int, float]:
        # Budgets rank by the total share a channel explains over all units it feeds:
        # far better than the max over units (benchmarks/RESULTS.md, "Design measurements").
        return self.class_importance(analysis, stats, views, opts.z, how="sum")

    def own_rule(self, opts: MethodOptions) -> bool:
        return opts.tau is not None

    def select(self, analysis: Analysis, stats: Statistics, views: list[ConsumerView], opts: MethodOptions,
               groups: list[Group]) -> dict[int, np.ndarray]:
        return self._threshold(analysis, groups, self.class_importance(analysis, stats, views, opts.z),
                               float(opts.tau), opts.min_keep)

    def _threshold(self, analysis: Analysis, groups: list[Group], imp: dict[int, float], tau: float,
                   min_keep: int) -> dict[int, np.ndarray]:
        """Remove every class with ``I_k < τ`` (all its outgoing connections prunable),
        keeping the ``min_keep`` strongest of each group and the last class of every
        Split/Slice chunk.  A class without a measured connection is kept."""
        todo = [g for g in groups if g.prunable]
        marked: dict[int, np.ndarray] = {}
        for g in todo:
            s = np.array([imp.get(int(c), np.inf) for c in g.classes])
            below = np.flatnonzero(s < tau)
            room = len(s) - min(len(s), max(1, min_keep))
            below = below[np.argsort(s[below], kind="stable")][:room]  # weakest first
            s = s.copy()
            s[below] = -np.inf  # the shared selector always removes -inf ("dead") classes
            marked[g.id] = s
        removed = select_by_scores(todo, marked, 0.0, min_keep=min_keep)
        # The chunk rule may skip a marked class and take the next one instead: never
        # remove a class whose connections are not all below τ.
        out = {}
        for g in todo:
            allowed = g.classes[np.isneginf(marked[g.id])]
            out[g.id] = np.intersect1d(removed.get(g.id, np.zeros(0, np.int64)), allowed).astype(np.int64)
        return out

    def pre_rewrite(self, analysis: Analysis, stats: Statistics, views: list[ConsumerView], opts: MethodOptions,
                    removed: np.ndarray) -> dict | None:
        """Per consumer: rows seen, the blind-range share, the activation found, and with
        ``τ`` the share of its connections that are prunable (μ+zσ < τ)."""
        per = {}
        for view in views:
            acc = accumulator_for(stats, view)
            if acc is None or acc.s1 is None:
                continue
            entry = {
                "rows": acc.n,
                "blind_share": acc.blind / max(acc.n * acc.s1.size, 1),
                "activation": acc.spec.blind.op if acc.spec.blind is not None else None,
            }
            if opts.tau is not None:
                entry["prunable_connections"] = float((acc.bound(opts.z) < opts.tau).mean())
            per[view.node.name or view.node.outputs[0].name] = entry
        return {"relative": {"z": opts.z, "tau": opts.tau, "consumers": per}}


def _factory(spec: Spec, seed: int) -> Callable[[], RelativeStats]:
    return lambda: RelativeStats(spec, seed)


register_criterion("relative", Relative())
