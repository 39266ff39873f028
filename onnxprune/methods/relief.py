"""``relief``: Neural Network Relief (Dekhovich, Tax, Sluiter, Bessa; seed 001, METHODS.md).

What is the paper's
-------------------
* Connection score of output unit ``j`` of a dense layer:
  ``s_jk = |W_jk|·E|x_k| / S_j`` and, for its bias, ``|b_j| / S_j``, with
  ``S_j = Σ_i |W_ji|·E|x_i| + |b_j|``: the share of j's mean absolute input that arrives
  through connection k.  The scores of a unit (bias included) sum to 1.
* At a convolution the "connection" is the kernel ``W[j, k]`` between input channel k and
  filter j: ``s_jk = ‖ |W[j, k]| ∗ E|x_k| ‖_F / S_j`` (the mean absolute input map of
  channel k convolved once with the absolute kernel, Frobenius norm over the output
  positions); the bias scores ``|b_j|·sqrt(h·w)`` (it is added at all h·w positions).
* Per output unit, the scores are sorted descending and the shortest prefix whose
  cumulative sum reaches ``α`` is kept (α_conv 0.9-0.95, α_fc 0.95-0.99); the other
  connections are pruned.  Neurons/filters with nothing left are gone.  The paper
  iterates prune → retrain and reports connection-level compression.

What is onnxprune's reading
---------------------------
* Expectations come from the calibration data (``TensorStats``: ``Σ|x| / n`` per index; the
  mean |x| map of a Conv input from :class:`AbsMap`, requested here), not from the training
  set; there is no retraining: ``--steps N`` re-calibrates the pruned graph between rounds
  (done by the caller).
* Structured result: a channel class is removed only when its outgoing connections are
  pruned at *every* consumer that reads it (for a channel flattened into a dense layer:
  every one of its H·W features); a channel never active (mean |x| = 0 at every consumer)
  goes outright.  ``--min-keep`` and the Split/Slice chunks (``Group.keep_any``) keep the
  highest-importance channels of a group.
* Budget mode (``--ratio``/``--target-macs``): channel importance ``I_k = max_j s_jk``, the
  max over every consumer's output units and over the features of a flattened channel.
* ``--granularity connection`` also writes the pruned connections of the kept channels as
  zeros (whole kernels at a Conv).  Biases are never zeroed: without retraining, dropping a
  bias only moves every output off its mean.  Zeroed connections get no bias compensation
  (``pre_rewrite`` is not told whether ``--compensate bias`` is on).
* Cases the paper does not cover: a grouped Conv (output j of group g reads only that
  group's channels; local index k is one class across groups); a Conv input whose spatial
  size is not static, and ConvTranspose, use ``E|x_k|·‖W[j, k]‖₁`` (the map taken as
  constant: the convolution is then that value at every interior position, and the
  ``sqrt(h·w)`` it would carry cancels in the normalisation, so the bias scores ``|b_j|``);
  a MatMul's bias is a following single-use ``Add`` of a constant; Gemm's alpha/beta scale
  W and C.  A unit whose inputs were all zero on the data (``S_j = 0``) keeps nothing.
  Ties sort by index (the bias last) so results are deterministic; "reaches α" allows a
  1e-9 rounding slack.
"""

from __future__ import annotations

import itertools
import math
import operator
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from .._graph import attr_int, attr_ints, attr_str, const_array, dims, replace_const
from ..calibrate import MethodKey, StatRequest, Statistics
from ..chunks import ChunkGuard
from ..compensate import KEEP_ZEROS, ZEROED
from ..consumers import ConsumerView
from ..errors import InputError
from ..groups import Analysis, Group
from ..layout import SliceParam
from ..rewrite import removed_mask
from . import Criterion, MethodOptions, register_criterion

KEY = "relief"  # MethodKey(KEY, tensor=name): the mean |x| map of a Conv input
SCORES = MethodKey(KEY)  # Statistics.derived: this run's scores of every consumer
DEFAULT_ALPHA_CONV = 0.9
DEFAULT_ALPHA_FC = 0.95
_TOL = 1e-9  # cumulative sums "reach" α within this rounding slack
_CHUNK_BYTES = 64 * 2**20  # bound on each temporary of the score computation


@dataclass
class AbsMap:
    """Σ over the batch of |x| per (channel, position) of one Conv input ``[N, C, *spatial]``.

    ``ragged`` is set when batches disagree on the spatial size; the map is then unusable
    and the scores fall back to ``E|x_k|·‖W[j, k]‖₁``.
    """

    sum: np.ndarray | None = None
    n: int = 0
    ragged: bool = False

    def update(self, x: np.ndarray) -> None:
        a = np.abs(x.astype(np.float32, copy=False)).sum(axis=0, dtype=np.float64)
        if self.sum is None:
            self.sum = a
        elif self.sum.shape != a.shape:
            self.ragged = True
            return
        else:
            self.sum += a
        self.n += int(x.shape[0])

    def merge(self, other: "AbsMap") -> "AbsMap":
        if self.sum is None or other.sum is None:
            src = self if other.sum is None else other
            return AbsMap(None if src.sum is None else src.sum.copy(), src.n, self.ragged or other.ragged)
        if self.sum.shape != other.sum.shape:
            return AbsMap(self.sum.copy(), self.n, True)
        return AbsMap(self.sum + other.sum, self.n + other.n, self.ragged or other.ragged)

    @property
    def mean(self) -> np.ndarray | None:
        if self.sum is None or self.ragged or self.n == 0:
            return None
        return self.sum / self.n


@dataclass
class ViewScores:
    """Normalised connection scores of one consumer, oriented ``[output unit j, input k]``.

    ``k`` indexes the consumer's weight along its input axis: an input channel (a
    flattened feature for a dense layer after Flatten; the local index within its group
    for a grouped Conv).  ``cls[k]`` is its channel class.
    """

    view: ConsumerView
    conv: bool  # α_conv applies (Conv, ConvTranspose), else α_fc
    s: np.ndarray  # [O, K]
    bias: np.ndarray  # [O]
    cls: np.ndarray  # [K] class roots
    taps: int  # weights per connection (kernel size; 1 for dense)
    alive: np.ndarray  # [K] index was non-zero on some calibration sample
    zero: np.ndarray  # [O, K] connection's weights are all 0 already (an earlier round's zeros)
    masks: dict[float, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def keep(self, alpha: float) -> np.ndarray:
        """The α rule's kept connections [O, K] (computed once per α)."""
        if alpha not in self.masks:
            self.masks[alpha] = alpha_masks(self.s, self.bias, alpha)
        return self.masks[alpha][0]


class Relief(Criterion):
    """NNrelief connection scores, the per-unit cumulative α rule, ``I_k = max_j s_jk``."""

    statistics = ("sum", "sumsq", "sumabs")  # E|x| of the dense consumers' inputs

    # -- calibration ---------------------------------------------------------------
    def requests(self, analysis: Analysis, views: list[ConsumerView], opts: MethodOptions) -> list[StatRequest]:
        """The mean |x| map of every Conv input whose spatial size is static."""
        out, seen = [], set()
        for v in views:
            if v.node.op_type != "Conv" or v.tensor in seen or not _static_spatial(v.value):
                continue
            seen.add(v.tensor)
            out.append(StatRequest(MethodKey(KEY, tensor=v.tensor), v.value, AbsMap))
        return out

    # -- budget mode -----------------------------------------------------------------
    def scores(
        self, analysis: Analysis, stats: Statistics, views: list[ConsumerView], opts: MethodOptions
    ) -> dict[int, float]:
        """Class root -> ``I_k = max_j s_jk`` over every consumer and flattened feature."""
        best = np.full(len(analysis.roots), -1.0)
        for vs in self._scores(analysis, stats, views):
            if vs.s.size:
                np.maximum.at(best, vs.cls, vs.s.max(axis=0))
        return {int(r): float(best[r]) for r in np.flatnonzero(best >= 0)}

    # -- the α rule --------------------------------------------------------------------
    def own_rule(self, opts: MethodOptions) -> bool:
        return opts.alpha_conv is not None or opts.alpha_fc is not None

    def select(
        self, analysis: Analysis, stats: Statistics, views: list[ConsumerView], opts: MethodOptions,
        groups: list[Group],
    ) -> dict[int, np.ndarray]:
        """Group id -> class roots whose outgoing connections the α rule prunes everywhere,
        and dead classes; each group keeps ``min_keep`` and every Split/Slice chunk keeps one."""
        n = len(analysis.roots)
        measured = np.zeros(n, dtype=bool)
        kept = np.zeros(n, dtype=bool)
        alive = np.zeros(n, dtype=bool)
        importance = np.full(n, -1.0)
        alphas = _alphas(opts)
        scored = self._scores(analysis, stats, views)
        done = {id(vs.view.node) for vs in scored}
        for v in views:  # a consumer without statistics: nothing known, its channels stay
            if id(v.node) not in done:
                kept[analysis.roots[v.atoms]] = True
        for vs in scored:
            keep = vs.keep(alphas[0 if vs.conv else 1])
            measured[vs.cls] = True
            np.logical_or.at(kept, vs.cls, keep.any(axis=0))
            np.logical_or.at(alive, vs.cls, vs.alive)
            if vs.s.size:
                np.maximum.at(importance, vs.cls, vs.s.max(axis=0))
        dead = measured & ~alive
        importance[dead] = -np.inf  # dead first, then the least important
        candidates = measured & ~kept
        return _limited(groups, candidates | dead, importance, opts.min_keep)

    # -- connection granularity and the report -------------------------------------------
    def pre_rewrite(
        self, analysis: Analysis, stats: Statistics, views: list[ConsumerView], opts: MethodOptions,
        removed: np.ndarray,
    ) -> dict | None:
        """Zero the α-pruned connections of kept channels (``--granularity connection``) and
        report the connection-level compression.

        A consumer connection ``(j, k)`` counts as pruned when its input channel or its
        output unit is removed, when it is written as zero here, or when its weights were
        all zero already (an earlier ``--steps`` round wrote them: ``connections_remaining``
        of the last round over ``connections_total`` of the first is the overall share).
        ``rule_*`` is what the α rule prunes (removed channels included), written or not.
        """
        if stats is None:
            return None
        gone = removed_mask(analysis, removed)
        out_atoms = {
            id(e.node): e.atoms for e in analysis.edits if isinstance(e, SliceParam) and e.role == "weight_out"
        }
        rule = self.own_rule(opts)
        alphas = _alphas(opts) if rule else None
        write = opts.granularity == "connection"
        graph = analysis.model.graph
        n = {"total": 0, "removed": 0, "zeroed": 0, "already": 0, "pruned": 0, "rule": 0, "w_total": 0, "w_pruned": 0}
        for vs in self._scores(analysis, stats, views):
            o, k = vs.s.shape
            node_id = id(vs.view.node)
            out_gone = gone[analysis.roots[out_atoms[node_id]]] if node_id in out_atoms else np.zeros(o, bool)
            struct = out_gone[:, None] | gone[vs.cls][None, :]
            by_rule = (~vs.keep(alphas[0 if vs.conv else 1]) & ~struct) if rule else np.zeros_like(struct)
            written = by_rule & ~vs.zero if write else np.zeros_like(struct)
            if written.any():
                _zero_connections(vs.view, written, graph)
            elif write and (vs.zero & ~struct).any():
                # Zeros an earlier round (--steps reloads the file) or an earlier prune wrote:
                # a refit must keep them too, however few they are.
                vs.view.node.meta[KEEP_ZEROS] = True
            pruned = struct | written | vs.zero
            n["total"] += o * k
            n["removed"] += int(struct.sum())
            n["zeroed"] += int(written.sum())
            n["already"] += int((vs.zero & ~struct).sum())
            n["pruned"] += int(pruned.sum())
            n["rule"] += int((pruned | by_rule).sum())
            n["w_total"] += o * k * vs.taps
            n["w_pruned"] += int(pruned.sum()) * vs.taps
        stats.derived.pop(SCORES, None)  # the weights may have changed
        total = n["total"]
        report = {
            "granularity": opts.granularity,
            "connections_total": total,
            "connections_pruned": n["pruned"],
            "connections_removed": n["removed"],
            "connections_zeroed": n["zeroed"],
            "connections_already_zero": n["already"],
            "connections_remaining": total - n["pruned"],
            "connection_compression": n["pruned"] / total if total else 0.0,
            "weights_total": n["w_total"],
            "weights_pruned": n["w_pruned"],
        }
        if rule:
            report.update({
                "alpha_conv": alphas[0], "alpha_fc": alphas[1],
                "rule_connections_pruned": n["rule"],
                "rule_connection_compression": n["rule"] / total if total else 0.0,
            })
        return report

    # -- scores ------------------------------------------------------------------------
    def _scores(self, analysis: Analysis, stats: Statistics, views: list[ConsumerView]) -> list[ViewScores]:
        """The scores of every consumer, computed once per run: ``scores``, ``select`` and
        ``pre_rewrite`` of one prune all need them, so they are kept with the run's
        statistics (a new round of --steps or a new prune calibrates anew)."""
        nodes = [v.node for v in views]  # held by the entry: compared by identity
        c = stats.derived.get(SCORES)
        if c is not None and c[0] is analysis and len(c[1]) == len(nodes) and all(map(operator.is_, c[1], nodes)):
            return c[2]
        out = []
        for v in views:
            vs = view_scores(analysis, stats, v)
            if vs is not None:
                out.append(vs)
        stats.derived[SCORES] = (analysis, nodes, out)
        return out


def _alphas(opts: MethodOptions) -> tuple[float, float]:
    """(α_conv, α_fc), the unset one at its default."""
    a_conv = DEFAULT_ALPHA_CONV if opts.alpha_conv is None else float(opts.alpha_conv)
    a_fc = DEFAULT_ALPHA_FC if opts.alpha_fc is None else float(opts.alpha_fc)
    for flag, a in (("--alpha-conv", a_conv), ("--alpha-fc", a_fc)):
        # Scores of a unit sum to 1: above 1 no prefix reaches α, at 0 nothing is kept.
        if not (0.0 < a <= 1.0):
            raise InputError(f"{flag} is the share of each unit's importance to keep, in (0, 1]; got {a}")
    return a_conv, a_fc


def alpha_masks(s: np.ndarray, bias: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Per row j of ``s`` (bias as one more item): keep the shortest prefix of the scores
    sorted descending whose cumulative sum reaches ``alpha``.  Returns (keep [O, K], keep_bias [O]).

    A row of zeros (``S_j = 0``) keeps nothing: nothing reached j on the data.
    """
    o, k = s.shape
    keep = np.zeros((o, k + 1), dtype=bool)
    rows = max(1, _CHUNK_BYTES // max(8 * (k + 1) * 3, 1))
    for a in range(0, o, rows):
        items = np.concatenate([s[a : a + rows], bias[a : a + rows, None]], axis=1)
        order = np.argsort(-items, axis=1, kind="stable")  # ties: lower index first, bias last
        cum = np.cumsum(np.take_along_axis(items, order, axis=1), axis=1)
        reach = cum >= alpha - _TOL
        n_keep = np.where(reach[:, -1] & (cum[:, -1] > 0), reach.argmax(axis=1) + 1, 0)
        sorted_keep = np.arange(k + 1)[None, :] < n_keep[:, None]
        np.put_along_axis(keep[a : a + rows], order, sorted_keep, axis=1)
    return keep[:, :k], keep[:, k]


def view_scores(analysis: Analysis, stats: Statistics, view: ConsumerView) -> ViewScores | None:
    """NNrelief scores of one consumer, or None when it was not calibrated."""
    st = stats.tensors.get(view.tensor)
    if st is None:
        return None
    m = st.mean_abs  # E|x| per index of the tensor's channel axis
    alive = ~st.dead
    op = view.node.op_type
    roots = analysis.roots[view.atoms]
    w = np.asarray(const_array(view.node.inputs[1]), dtype=np.float64)
    if op == "Conv":
        group = attr_int(view.node, "group", 1)
        per = w.shape[1]  # input channels per group (the tensor has group·per)
        absmap = stats.extra.get(MethodKey(KEY, tensor=view.tensor))
        mean_map = absmap.mean if isinstance(absmap, AbsMap) else None
        if mean_map is not None and mean_map.shape[0] != group * per:
            mean_map = None
        if mean_map is not None:
            contrib, positions = _conv_contrib(view.node, np.abs(w), mean_map, group)
        else:
            # Spatial size not static (or no map): take the map as the constant E|x_k|.
            contrib = np.abs(w).reshape(w.shape[0], per, -1).sum(axis=2)
            contrib = contrib * _per_output_inputs(m, group, w.shape[0])
            positions = 1
        bias = _bias(view.node, 2, w.shape[0]) * math.sqrt(positions)
        # Local index k is one class across groups (ops.py unites them): the tensor's
        # layout holds all C = group·per indices, the weight only ``per``.
        roots = roots[:per]
        alive = alive.reshape(group, per).any(axis=0)
        zero = ~(w != 0).reshape(w.shape[0], per, -1).any(axis=2)
        return _normalise(view, True, contrib, bias, roots, int(np.prod(w.shape[2:], dtype=np.int64)), alive, zero)
    if op == "ConvTranspose":  # W [C_in, C_out, k...], group 1 (ops.py blocks the others)
        contrib = np.abs(w).reshape(w.shape[0], w.shape[1], -1).sum(axis=2).T * m[None, :]
        bias = _bias(view.node, 2, w.shape[1])
        zero = ~(w != 0).reshape(w.shape[0], w.shape[1], -1).any(axis=2).T
        return _normalise(view, True, contrib, bias, roots, int(np.prod(w.shape[2:], dtype=np.int64)), alive, zero)
    if op == "Gemm":
        alpha = view.node.attributes.get("alpha")
        beta = view.node.attributes.get("beta")
        wo = w if attr_int(view.node, "transB", 0) else w.T  # [O, K]
        wo = np.abs(wo) * abs(float(alpha.value) if alpha is not None else 1.0)
        bias = _bias(view.node, 2, wo.shape[0]) * abs(float(beta.value) if beta is not None else 1.0)
    else:  # MatMul: W [K, O], bias from a following Add
        wo = np.abs(w.T)
        bias = _matmul_bias(view.node, wo.shape[0])
    return _normalise(view, False, _dense_contrib(wo, m), bias, roots, 1, alive, wo == 0)


def _dense_contrib(abs_w: np.ndarray, m: np.ndarray) -> np.ndarray:
    """|W_jk|·E|x_k| ([O, K]), in row chunks so no second full-size temporary appears."""
    out = np.empty_like(abs_w)
    rows = max(1, _CHUNK_BYTES // max(8 * abs_w.shape[1], 1))
    for a in range(0, abs_w.shape[0], rows):
        np.multiply(abs_w[a : a + rows], m[None, :], out=out[a : a + rows])
    return out


def _per_output_inputs(values: np.ndarray, group: int, o: int) -> np.ndarray:
    """``values`` per input channel -> [O, C/group]: row j holds its group's channels."""
    per_group = values.reshape(group, -1)
    return np.repeat(per_group, o // group, axis=0)


def _normalise(view: ConsumerView, conv: bool, contrib: np.ndarray, bias: np.ndarray, roots: np.ndarray,
               taps: int, alive: np.ndarray, zero: np.ndarray) -> ViewScores:
    """Divide every row (and its bias) by ``S_j``; a row with ``S_j = 0`` scores 0."""
    total = contrib.sum(axis=1) + bias
    inv = np.divide(1.0, total, out=np.zeros_like(total), where=total > 0)
    contrib *= inv[:, None]
    return ViewScores(view, conv, contrib, bias * inv, roots, max(taps, 1), np.asarray(alive, dtype=bool), zero)


def _bias(node: ir.Node, index: int, o: int) -> np.ndarray:
    """|b_j| of a Conv/ConvTranspose/Gemm bias input, broadcast to [O] (zeros if absent)."""
    if index >= len(node.inputs) or node.inputs[index] is None:
        return np.zeros(o)
    b = const_array(node.inputs[index])
    if b is None:
        return np.zeros(o)
    b = np.abs(np.asarray(b, dtype=np.float64))
    if b.size == 1:
        return np.full(o, float(b.reshape(-1)[0]))
    if b.shape[-1] == o:
        return b.reshape(-1, o).mean(axis=0)  # a per-row Gemm C: its mean magnitude
    return np.zeros(o)


def _matmul_bias(node: ir.Node, o: int) -> np.ndarray:
    """|b| of ``MatMul → Add(constant)`` when the Add is the product's only reader."""
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output() or uses[0].node.op_type != "Add":
        return np.zeros(o)
    add = uses[0].node
    other = add.inputs[1 - uses[0].idx]
    b = const_array(other)
    if b is None or b.size not in (1, o) or (b.size == o and b.shape[-1] != o):
        return np.zeros(o)
    return np.broadcast_to(np.abs(np.asarray(b, dtype=np.float64)).reshape(-1), (o,)).copy()


# -- convolution of the mean map -------------------------------------------------------------
def _static_spatial(value: ir.Value) -> bool:
    d = dims(value)
    return d is not None and len(d) >= 3 and all(isinstance(x, int) and x > 0 for x in d[1:])


def _conv_geometry(node: ir.Node, kernel: list[int], spatial: tuple[int, ...]) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """(strides, dilations, pads per spatial axis) of a Conv, auto_pad resolved."""
    n = len(kernel)
    strides = attr_ints(node, "strides") or [1] * n
    dilations = attr_ints(node, "dilations") or [1] * n
    auto = attr_str(node, "auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
            pads.append((lo, total - lo))
    elif auto == "VALID":
        pads = [(0, 0)] * n
    else:
        p = attr_ints(node, "pads") or [0] * (2 * n)
        pads = [(p[i], p[i + n]) for i in range(n)]
    return strides, dilations, pads


def _out_size(spatial, kernel: list[int], strides: list[int], dilations: list[int],
              pads: list[tuple[int, int]]) -> list[int]:
    """Output size of a Conv per spatial axis."""
    return [
        max((n + lo + hi - (k - 1) * d - 1) // s + 1, 0)
        for n, k, s, d, (lo, hi) in zip(spatial, kernel, strides, dilations, pads)
    ]


def _patches(mean_map: np.ndarray, kernel: list[int], strides: list[int], dilations: list[int],
             pads: list[tuple[int, int]]) -> np.ndarray:
    """im2col of a single [C, *spatial] map: [C, taps, positions], taps in W's row-major order."""
    xp = np.pad(mean_map, [(0, 0), *pads])
    out = _out_size(mean_map.shape[1:], kernel, strides, dilations, pads)
    cols = []
    for offs in itertools.product(*(range(k) for k in kernel)):
        sl = tuple(slice(o * d, o * d + s * (n - 1) + 1, s) for o, d, s, n in zip(offs, dilations, strides, out))
        cols.append(xp[(slice(None), *sl)].reshape(mean_map.shape[0], -1))
    return np.stack(cols, axis=1)


def _conv_contrib(node: ir.Node, abs_w: np.ndarray, mean_map: np.ndarray, group: int) -> tuple[np.ndarray, int]:
    """``‖ |W[j, k]| ∗ E|x_k| ‖_F`` for every filter j and local input k, and the number of
    output positions.  Chunked over input and output channels: each temporary stays
    within ``_CHUNK_BYTES`` (512×512 channels at 28×28 never holds the full [O, C, P])."""
    o, per = abs_w.shape[0], abs_w.shape[1]
    kernel = list(abs_w.shape[2:])
    strides, dilations, pads = _conv_geometry(node, kernel, tuple(mean_map.shape[1:]))
    og = o // group
    taps = int(np.prod(kernel))
    w_flat = abs_w.reshape(o, per, taps)
    out = np.zeros((o, per))
    p = int(np.prod(_out_size(mean_map.shape[1:], kernel, strides, dilations, pads)))
    if p <= 0:
        return out, 0
    kc = max(1, _CHUNK_BYTES // max(8 * taps * p, 1))
    jc = max(1, _CHUNK_BYTES // max(8 * min(kc, per) * p, 1))
    for g in range(group):
        for k0 in range(0, per, kc):
            k1 = min(per, k0 + kc)
            cols = _patches(mean_map[g * per + k0 : g * per + k1], kernel, strides, dilations, pads)  # [kc, T, P]
            for j0 in range(g * og, (g + 1) * og, jc):
                j1 = min((g + 1) * og, j0 + jc)
                a = np.ascontiguousarray(w_flat[j0:j1, k0:k1].transpose(1, 0, 2))  # [kc, jc, T]
                conv = np.matmul(a, cols)  # [kc, jc, P]: |W[j,k]| ∗ map_k at every output position
                out[j0:j1, k0:k1] = np.sqrt(np.einsum("kjp,kjp->jk", conv, conv))
    return out, p


# -- connection granularity ---------------------------------------------------------------------
def _zero_connections(view: ConsumerView, pruned: np.ndarray, graph: ir.Graph) -> None:
    """Write zeros into the consumer's weight for every pruned ``(j, k)`` (whole kernel at a Conv)."""
    node = view.node
    old = node.inputs[1]
    before = np.array(const_array(old), dtype=np.float64)  # a copy: replace_const may write in place
    w = np.array(const_array(old), copy=True)
    op = node.op_type
    if op == "Conv":
        w[pruned] = 0  # W [O, C/group, k...]
    elif op == "ConvTranspose":
        w[pruned.T] = 0  # W [C_in, O, k...]
    elif op == "Gemm" and attr_int(node, "transB", 0):
        w[pruned] = 0
    else:  # Gemm without transB, MatMul: W [K, O]
        w[pruned.T] = 0
    replace_const(node, 1, w, graph)
    node.meta[KEEP_ZEROS] = True  # compensation must not write these connections back
    node.meta[ZEROED] = before - w  # ... but puts back their mean
    # A shared weight got a private copy: drop the original once nothing reads it.
    if node.inputs[1] is not old and not old.uses() and not old.is_graph_output() and old.is_initializer() \
            and old not in graph.inputs:
        graph.initializers.pop(old.name)


# -- selection with the group limits ------------------------------------------------------------
def _limited(groups: list[Group], remove: np.ndarray, importance: np.ndarray, min_keep: int) -> dict[int, np.ndarray]:
    """Group id -> the classes of ``remove``, least important first, while the group keeps
    ``max(1, min_keep)`` classes and every Split/Slice chunk keeps one (as select.py does)."""
    todo = [g for g in groups if g.prunable]
    chunks = ChunkGuard(todo)
    out: dict[int, np.ndarray] = {}
    for g in todo:
        n = len(g.classes)
        cand = [i for i in range(n) if remove[int(g.classes[i])]]
        cand.sort(key=lambda i: (importance[int(g.classes[i])], i))
        limit = n - min(n, max(1, min_keep))
        chosen: list[int] = []
        for i in cand:
            if len(chosen) >= limit:
                break
            c = int(g.classes[i])
            if chunks.last_of_chunk(c):
                continue
            chunks.remove(c)
            chosen.append(c)
        out[g.id] = np.sort(np.array(chosen, dtype=np.int64))
    return out


register_criterion("relief", Relief())
