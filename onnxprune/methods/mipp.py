"""``mipp``: Mutual Information Preserving Pruning (Westphal, Hailes, Musolesi; seed 002, METHODS.md).

What is the paper's
-------------------
* Prune from the outputs back to the inputs: a layer's nodes are chosen so that the
  (already pruned) next layer's activations can still be predicted from the nodes that
  stay, i.e. the mutual information between adjacent layers is preserved.  The paper
  retrains afterwards; its argument is that a function mapping the kept upstream
  activations to the downstream ones exists.
* MI is estimated with a fitted predictor (Covert et al. 2020):
  ``I(X_S; Y) ≈ E[loss(f(∅), Y)] − E[loss(f(X_S), Y)]``, MSE loss; the paper fits a small MLP.
* Selection is TERC with an MI ordering: channels sorted by their single-channel MI with
  ``Y`` (descending) are visited from the least informative; each is tentatively removed and
  stays removed unless, with confidence ``x``, the loss without it exceeds the loss with it;
  the confidence comes from repeated estimates (the paper uses 5).  ``x`` is the only knob,
  per-layer ratios follow from it, and a FLOPs/params target is met by bisection on ``x``.

What is onnxprune's reading
---------------------------
* ``Y`` at a consumer is its pre-activation ``W x`` without bias (the predictor's intercept
  absorbs it), restricted to the consumer's *kept* outputs: groups are decided in reverse
  topological order of their latest producer, so a consumer's own group is already decided.
  A residual block is a cycle (the skip group is read by the block's first conv, whose
  outputs feed the conv that writes the skip group); that order breaks it: the skip group
  goes first and sees all of the inner conv's outputs.  An undecided or unprunable output
  counts as kept.
* Default predictor: linear, closed form from covariances:
  ``loss(S) = tr(Σ_YY − Σ_YS Σ_SS⁻¹ Σ_SY)``, ``Σ_YY = W H Wᵀ``, ``Σ_YS = W H[:, S]``,
  ``Σ_SS = H[S, S] + λI`` (``λ = RIDGE · mean diag H``, numerical only), i.e.
  ``tr(M (H − H[:, S] Σ_SS⁻¹ H[S, :]))`` with ``M = WᵀW``; H is a centred covariance.
  Features by consumer:

  - Gemm/MatMul reading channels one-to-one: ``x`` itself (exact; Gemm ``alpha`` included).
  - Conv (any kernel, grouped ones expanded block-diagonally), ConvTranspose, and a channel
    flattened into a Gemm/MatMul (H·W features per channel): *taps approximation*.  Only the
    channel covariance H (C×C over sampled positions) is gathered, and every kernel tap /
    flattened position ``t`` counts as its own output ``Y_t = W_t x`` with that same H:
    ``loss(S) = Σ_t tr(W_t (H − H[:, S] Σ_SS⁻¹ H[S, :]) W_tᵀ)``, ``M = Σ_t W_tᵀ W_t``.
    It is exact when neighbouring positions are uncorrelated and share one covariance
    (and for 1×1 kernels); summing the taps (``Σ_t W_t``) would instead assume fully
    correlated neighbours.  The exact im2col covariance (PatchGram) is *not* used: it needs
    far more rows than the evidence rule below allows (C·k·k features).  It is what
    ``--compensate lstsq`` uses to refit, which is the compensation MIPP's criterion presumes
    (see the last point).
* A channel class is judged as a whole: its features at every consumer that reads it leave
  together and the consumers' losses are summed.  Each consumer's loss is divided by the
  variance of its kept pre-activation (``tr(M H)``), so losses are *fractions of a
  consumer's kept output variance* and consumers count alike whatever their weight scale.
* Same evidence at every layer: every consumer's statistics come from at most
  ``ROWS_PER_SAMPLE`` rows per calibration sample (positions of a Conv input, tokens of a
  MatMul, positions of a flattened channel; a Gemm input has one), drawn per sample.  With
  all positions, a Conv's estimates are far more precise than a dense layer's, so one
  confidence level means "prune the dense layers flat": on the shipped CNN the budget then
  kept almost none of fc1's channels, which two rows per sample avoid
  (benchmarks/RESULTS.md, "Design measurements").
* Repeated estimates are cross-validated: calibration batches go round-robin to
  ``mi_estimates`` shards (ChannelGram); estimate ``f`` fits the predictor on all other
  shards and measures its loss on shard ``f`` (second moment about the training mean).  An
  in-sample loss never falls when a channel is dropped, so in-sample differences are
  "significant" for every channel with enough rows and zero for every channel without;
  held out, a useless channel can lower the loss.
* The keep test, exactly: for a candidate class with per-shard loss increases
  ``d_f = loss_f(S∖k) − loss_f(S)`` (summed over its consumers, ``n`` shards), a one-sided
  one-sample Student t-test of ``H0: E[d] <= δ`` against ``H1: E[d] > δ``:
  ``t = (mean(d) − δ) / (sd(d)/√n)`` (``sd`` with ddof 1) and ``p = P(T_{n−1} >= t)``
  (``scipy.special.stdtr``, the Student t CDF); when ``sd = 0``, ``p`` is 0 if
  ``mean(d) > δ`` else 1.  The class is kept iff ``1 − p >= x`` and removed otherwise.
  ``δ = REL_TOL`` (a millionth of the kept output variance) is a numerical floor so that an
  exact linear combination of kept channels, whose increase is rounding and ridge noise,
  goes.  Higher ``x`` demands more evidence to keep, so each single test removes no fewer
  channels; the sweep as a whole is monotone when channels do not interact and nearly so
  otherwise (removing one of two redundant channels makes the other significant), which is
  why the budget search keeps the best feasible selection instead of assuming monotonicity.
  Because ``Y = W x`` is exact, a non-redundant channel's increase is signal, not noise:
  its t-statistic reflects how steady its contribution is across shards far more than its
  size.  The knob therefore separates what the kept channels can predict (redundant,
  increase ≈ 0 or negative held out) from what they cannot, which is MIPP's principle; it
  is not a magnitude ranking.
  Dropped candidates are committed to every consumer in closed form (block-inverse
  downdates, :class:`_LinearFolds`), so a sweep costs little more than its tests.
* ``--confidence`` takes a fraction in (0, 1] or a percentage in (1, 100].  A MACs/params
  target bisects on ``log10(1 − x)`` (the significance levels that matter span many decades)
  and keeps the feasible selection closest to the target; the report gives ``x`` and
  ``log10_alpha``.  ``--ratio`` scores a class by its single-channel MI ``loss(∅) − loss({k})``
  (in-sample, all outputs kept), summed over its consumers.
* ``--mi-estimator mlp``: the paper's predictor in numpy/scipy: ``ŷ = x_S A + tanh(x_S W₁ + b₁)
  W₂ + c`` (``MLP_HIDDEN`` units; the linear skip makes it at least as good as the linear
  predictor, which matters because ``Y = W x`` is linear in the full ``x``), MSE plus a small
  weight decay, L-BFGS from a seeded start; a removal test warm-starts from the current fit
  without the candidate's inputs.  It needs rows, not covariances: a seeded reservoir of at
  most ``MLP_ROWS`` input rows per consumer (2-D Conv: exact im2col patches), split into
  ``mi_estimates`` folds (fit on the others, loss on the fold).  Small layers only
  (``MLP_MAX_CHANNELS`` input channels, ``MLP_MAX_OUTPUTS`` outputs, 2-D Conv/Gemm/MatMul);
  anything larger is refused with :class:`InputError` before calibration.
* ``--min-keep`` and the Split/Slice chunks (``Group.keep_any``) are honoured as in
  :func:`onnxprune.select.select`; a class that no measured consumer reads is kept.
* Compensation: MIPP removes a channel when the kept ones can *predict* what it gave the
  consumer; only a refit of the consumer realises that (retraining in the paper,
  ``--compensate lstsq`` here).  With ``--compensate bias`` the removed channels' variation
  is simply lost, and accuracy after a budget is erratic from seed to seed where lstsq's is
  steady (benchmarks/RESULTS.md, "Design measurements").
* Cost: a consumer with s predictor features holds five stacked ``[mi_estimates, s, s]``
  matrices while its group is decided, a test is O(|k|²·s) and a removal O(|k|·s²) per
  estimate; a budget runs at most ``BISECT_STEPS + 1`` sweeps, fewer where steps repeat a
  known sweep (``SweepCache``) or a selection lands within ``BUDGET_TOL`` of the target; a
  wide layer (ResNet-50's last stage) needs memory and minutes per sweep
  (benchmarks/RESULTS.md, "Design measurements").
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from .._graph import attr_int, node_label
from ..calibrate import InputRef, MethodKey, Statistics, StatRequest
from ..chunks import ChunkGuard
from ..consumers import ConsumerView
from ..errors import InputError
from ..gram import ChannelGram, PatchGram
from ..groups import Analysis, Group
from ..layout import SliceParam
from . import Criterion, MethodOptions, register_criterion

RIDGE = 1e-6  # λ = RIDGE · mean diag(H): numerical only, keeps Σ_SS invertible
REL_TOL = 1e-6  # δ of the keep test, in fractions of a consumer's kept output variance
ROWS_PER_SAMPLE = 2  # rows (positions, tokens) drawn per calibration sample at every consumer
DENSE_MAX_FEATURES = 4096  # Gemm/MatMul input features held as a dense covariance
BISECT_STEPS = 24  # bisection steps on log10 α in [LOG_ALPHA_MIN, 0]
# The bisection stops once a selection meets the target within this share of the original
# (MACs or params): the other budget paths land no closer (a rung or an alignment step), and
# each further sweep is costly on a wide group (benchmarks/RESULTS.md, "Design measurements").
BUDGET_TOL = 0.005
LOG_ALPHA_MIN = -300.0
MLP_MAX_CHANNELS = 64
MLP_MAX_OUTPUTS = 64
MLP_ROWS = 2000
MLP_HIDDEN = 16
MLP_ITERS = 150
MLP_DECAY = 1e-4

KEY = "mipp"  # MethodKey(KEY, view): a consumer's Gram or row reservoir
REPORT = MethodKey(KEY)  # Statistics.derived: the report of this run's own selection


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """Run with single-threaded BLAS when threadpoolctl is installed: the sweep and the MLP
    fits are thousands of tiny products, for which a multi-threaded BLAS is several times
    slower (benchmarks/RESULTS.md, "Design measurements").  A no-op otherwise."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


# ----------------------------------------------------------------------------- geometry


@dataclass
class Geometry:
    """How a consumer's input becomes predictor features and its weight a target map.

    ``mode``: ``dense`` (Gemm/MatMul, x itself), ``patch`` (2-D Conv im2col, exact) or
    ``taps`` (channel covariance with each tap/position as its own output, approximate).
    ``index[f]``: the index along the view's channel axis that feature ``f`` belongs to.
    ``weight``: ``[O, R, F]``: output o, tap r, feature f (``Y_{o,r} = weight[o, r] · x``).
    ``perm``: for a flattened channel, ``[C', P]`` indices of each channel's positions.
    """

    mode: str
    index: np.ndarray
    weight: np.ndarray
    perm: np.ndarray | None = None


def geometry(view: ConsumerView, patches: bool = False) -> Geometry:
    """The feature/target layout of ``view`` (see the module docstring for the modes);
    ``patches``: a 2-D Conv gets exact im2col features (the MLP estimator) instead of the
    taps approximation (the linear estimator)."""
    node, op = view.node, view.node.op_type
    w = view.weight()
    c = len(view.atoms)
    if op == "Conv":
        group = attr_int(node, "group", 1)
        o, cg = int(w.shape[0]), int(w.shape[1])
        t = int(np.prod(w.shape[2:], dtype=np.int64))
        og = o // group
        dense = np.zeros((o, c, t))  # block-diagonal expansion of a grouped Conv
        for g in range(group):
            dense[g * og : (g + 1) * og, g * cg : (g + 1) * cg] = w[g * og : (g + 1) * og].reshape(og, cg, t)
        if patches and w.ndim == 4:
            # PatchGram columns are channel-major: c·kh·kw + tap.
            return Geometry("patch", np.repeat(np.arange(c), t), dense.reshape(o, 1, c * t))
        return Geometry("taps", np.arange(c), dense.transpose(0, 2, 1))
    if op == "ConvTranspose":  # W [C_in, C_out, k...] (group 1: the op table blocks others)
        t = int(np.prod(w.shape[2:], dtype=np.int64))
        return Geometry("taps", np.arange(c), w.reshape(w.shape[0], w.shape[1], t).transpose(1, 2, 0))
    if op == "Gemm":
        alpha = node.attributes.get("alpha")
        scale = 1.0 if alpha is None else float(alpha.value)
        dense = scale * (w if attr_int(node, "transB", 0) else w.T)  # [N, K]
    else:  # MatMul, W [K, N]
        dense = w.T
    atoms = view.atoms
    uniq, first, counts = np.unique(atoms, return_index=True, return_counts=True)
    if len(uniq) < len(atoms) and uniq[0] != 0 and counts[0] > 1 and (counts == counts[0]).all():
        # A channel flattened into H·W features: channels in first-appearance order.
        order = uniq[np.argsort(first, kind="stable")]
        perm = np.stack([np.flatnonzero(atoms == a) for a in order])  # [C', P]
        return Geometry("taps", perm[:, 0], dense[:, perm].transpose(0, 2, 1), perm)
    if len(atoms) > DENSE_MAX_FEATURES:
        raise InputError(
            f"mipp: {node_label(node)} reads {len(atoms)} features; the linear MI proxy keeps a dense covariance "
            f"only up to {DENSE_MAX_FEATURES}: exclude the group with --exclude or use another method"
        )
    return Geometry("dense", np.arange(len(atoms)), dense[:, None, :])


def graph_positions(analysis: Analysis) -> dict[int, int]:
    """Node id -> position in the (topologically sorted) main graph."""
    return {id(n): i for i, n in enumerate(analysis.model.graph)}


def request_key(view: ConsumerView) -> MethodKey:
    """Key of a consumer's statistics in ``Statistics.extra``."""
    return MethodKey(KEY, InputRef.of(view))


# ----------------------------------------------------------------------------- accumulators


def _per_sample(x: np.ndarray, axis: int, perm: np.ndarray | None) -> np.ndarray:
    """The tensor as [samples, rows per sample, channels]: a Conv input's positions, a
    MatMul's tokens, a flattened channel's H·W positions (``perm`` [C', P]); one row per
    sample for a plain Gemm input."""
    moved = np.moveaxis(x, axis, -1)
    b = moved.shape[0] if moved.ndim > 1 else 1
    rows = moved.reshape(b, -1, x.shape[axis])  # [B, T, F]
    if perm is not None:  # [B, T, F] -> [B, T, C', P] -> [B, T·P, C']
        c = perm.shape[0]
        rows = rows[:, :, perm].transpose(0, 1, 3, 2).reshape(b, -1, c)
    return rows


def _pick_rows(rows: np.ndarray, per_sample: int, rng: np.random.Generator) -> np.ndarray:
    """``per_sample`` rows of every sample, drawn without replacement (all when fewer)."""
    b, p, c = rows.shape
    if p <= per_sample:
        return rows.reshape(-1, c)
    pick = np.argsort(rng.random((b, p)), axis=1)[:, :per_sample]
    return np.take_along_axis(rows, pick[:, :, None], axis=1).reshape(-1, c)


@dataclass
class SampledGram(ChannelGram):
    """ChannelGram over ``rows_per_sample`` rows drawn from every calibration sample
    (stratified, seeded per batch), so every consumer's repeated estimates rest on the same
    amount of evidence per sample; ``perm`` views a flattened tensor as channels × positions."""

    rows_per_sample: int = 2
    perm: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        rng = np.random.default_rng(self.seed + self.batches)
        self.add_rows(_pick_rows(_per_sample(x, self.axis, self.perm), self.rows_per_sample, rng))

    # float64 products, unlike ChannelGram's float32 ones: the keep test weighs loss increases
    # of REL_TOL (a millionth of the output variance), the size of float32 rounding in a Gram.
    # In float32 a wide consumer's tests (the CIFAR-10 CNN's 1024-input Dense) read rounding
    # as evidence and removed systematically more (benchmarks/RESULTS.md, "The Keras CIFAR-10
    # CNN").  Two rows per sample: the cost is small.
    products: ClassVar[type] = np.float64


class RowReservoir:
    """A seeded uniform reservoir (algorithm R) of at most ``cap`` rows of a tensor's
    channel vectors: the MLP estimator needs samples, not covariances, and bounded memory."""

    def __init__(self, axis: int, cap: int = MLP_ROWS, seed: int = 0) -> None:
        self.axis, self.cap, self.seed = axis, cap, seed
        self.rows: np.ndarray | None = None
        self.seen = 0
        self.batches = 0
        self._rng = np.random.default_rng(seed)

    def update(self, x: np.ndarray) -> None:
        rng = np.random.default_rng(self.seed + 7919 * self.batches)
        self.add_rows(_pick_rows(_per_sample(x, self.axis, None), ROWS_PER_SAMPLE, rng))

    def add_rows(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float64)
        self.batches += 1
        if self.rows is None:
            self.rows = np.zeros((0, rows.shape[1]))
        room = max(self.cap - len(self.rows), 0)
        head, tail = rows[:room], rows[room:]
        if len(head):
            self.rows = np.concatenate([self.rows, head])
        start = self.seen + len(head)
        self.seen += len(rows)
        if len(tail):
            # Row i (0-based over the stream) replaces slot j ~ U{0..i} when j < cap; in order,
            # so a later row wins a slot drawn twice (sequential algorithm R).
            j = self._rng.integers(0, np.arange(start, start + len(tail)) + 1)
            hit = j < self.cap
            for slot, row in zip(j[hit].tolist(), tail[hit]):
                self.rows[slot] = row

    def merge(self, other: RowReservoir) -> RowReservoir:
        out = RowReservoir(self.axis, self.cap, self.seed)
        parts = [r.rows for r in (self, other) if r.rows is not None]
        if parts:
            rows = np.concatenate(parts)
            if len(rows) > self.cap:
                pick = np.sort(np.random.default_rng(self.seed).choice(len(rows), self.cap, replace=False))
                rows = rows[pick]
            out.rows = rows
        out.seen, out.batches = self.seen + other.seen, self.batches + other.batches
        return out


class PatchReservoir(PatchGram):
    """Reservoir of a 2-D Conv's im2col patches (PatchGram's exact patch extraction)."""

    def __init__(self, node, cap: int = MLP_ROWS, seed: int = 0) -> None:
        super().__init__(node, shards=1, max_rows=cap, seed=seed)
        self.reservoir = RowReservoir(axis=1, cap=cap, seed=seed)

    def update(self, x: np.ndarray) -> None:
        self.max_rows = ROWS_PER_SAMPLE * x.shape[0]  # about ROWS_PER_SAMPLE patches per sample
        super().update(x)

    def add_rows(self, rows: np.ndarray) -> None:
        self.reservoir.add_rows(rows)
        self.batches += 1  # PatchGram.update seeds its position sampling with this

    @property
    def rows(self) -> np.ndarray | None:
        return self.reservoir.rows

    def merge(self, other: PatchReservoir) -> PatchReservoir:
        out = PatchReservoir.__new__(PatchReservoir)
        out.__dict__.update(self.__dict__)
        out.reservoir = self.reservoir.merge(other.reservoir)
        out.batches = self.batches + other.batches
        return out


# ----------------------------------------------------------------------------- the keep test


def keep_confidence(d: np.ndarray, tol: float = REL_TOL) -> float:
    """Confidence ``1 − p`` that the mean loss increase exceeds ``tol`` (one-sided
    one-sample t-test on the per-shard increases ``d``; see the module docstring)."""
    d = np.asarray(d, dtype=np.float64)
    n = len(d)
    mean = float(d.mean())
    sd = float(d.std(ddof=1)) if n > 1 else 0.0
    if not sd > 0.0 or not math.isfinite(sd):
        return 1.0 if mean > tol else 0.0
    t = (mean - tol) / (sd / math.sqrt(n))
    from scipy import special  # here, not at import: the CLI starts faster

    return float(special.stdtr(n - 1, t))


def _p_value(d: np.ndarray, tol: float = REL_TOL) -> float:
    d = np.asarray(d, dtype=np.float64)
    n = len(d)
    mean = float(d.mean())
    sd = float(d.std(ddof=1)) if n > 1 else 0.0
    if not sd > 0.0 or not math.isfinite(sd):
        return 0.0 if mean > tol else 1.0
    from scipy import special

    return float(special.stdtr(n - 1, -(mean - tol) / (sd / math.sqrt(n))))  # P(T_{n-1} >= t)


def confidence_value(x: float) -> float:
    """``--confidence`` as a fraction: (0, 1] as given, (1, 100] as a percentage."""
    if not (0.0 < x <= 100.0) or not math.isfinite(x):
        raise InputError(f"--confidence must be a fraction in (0, 1] or a percentage in (1, 100], got {x}")
    return x / 100.0 if x > 1.0 else x


# ----------------------------------------------------------------------------- linear estimator


class _FoldBase:
    """The S-only part of the repeated estimates (independent of the consumer's kept
    outputs, so it is cached across the sweeps of a bisection), stacked over folds ``f``:
    the ridge predictor of ``x`` from ``x_S`` fitted on the training shards,
    ``B_f = H_f[:, S] P_f`` with ``P_f = (H_f[S, S] + λ_f I)⁻¹``, the held-out residual
    cross-moment ``G_f = T_f[:, S] − B_f T_f[S, S]``, ``TP_f = T_f[S, S] P_f`` and
    ``Y2_f = P_f T_f[S, S] P_f``."""

    def __init__(self, folds: list[tuple[np.ndarray, np.ndarray, float]], idx: np.ndarray) -> None:
        self.idx = idx
        sub = np.ix_(idx, idx)
        P, B, G, TP, Y2 = [], [], [], [], []
        for h_tr, t, lam in folds:
            p = _inv(h_tr[sub] + lam * np.eye(len(idx)))
            b = h_tr[:, idx] @ p
            tss = t[sub]
            tp = tss @ p
            y2 = p @ tp
            P.append(p), B.append(b), G.append(t[:, idx] - b @ tss), TP.append(tp), Y2.append((y2 + y2.T) / 2)
        self.P, self.B, self.G, self.TP, self.Y2 = (np.stack(a) for a in (P, B, G, TP, Y2))


class _LinearFolds:
    """The repeated estimates at one consumer, downdated in closed form as classes leave S.

    Dropping regressors k changes the coefficients by ``E = U V`` with ``U = B[:, k] K``,
    ``K = P_kk⁻¹``, ``V = P[k, :]`` (block inverse), and the held-out loss
    ``tr(M (T − B T_S: − T_:S Bᵀ + B T_SS Bᵀ))`` by ``2 tr(M E Gᵀ) + tr(M E T_SS Eᵀ)`` =
    ``2 tr(V R[:, k] K) + ⟨K Z_kk K, Y2_kk⟩`` with ``Z = BᵀMB`` and ``R = GᵀMB``.  Only the
    s×s matrices P, Z, R, TP, Y2 are kept (stacked over folds, indexed by position in the
    current S, removed positions zeroed and dropped in batches) and updated in place, so a test
    costs O(|k|²·s) and a removal O(|k|·s²) with s shrinking as S does.
    """

    COMPACT = 8  # drop dead positions once 1/COMPACT of them are dead (0: never; benchmarks/mipp_downdate.py)

    def __init__(self, base: _FoldBase, w: np.ndarray) -> None:
        self.idx = base.idx
        wb, wg = w @ base.B, w @ base.G  # [f, L, s]
        self.P, self.TP, self.Y2 = base.P.copy(), base.TP.copy(), base.Y2.copy()
        self.Z = np.matmul(wb.transpose(0, 2, 1), wb)
        self.R = np.matmul(wg.transpose(0, 2, 1), wb)
        self._pending: tuple | None = None
        self.dead = np.zeros(len(self.idx), dtype=bool)  # removed, not yet dropped

    def delta(self, feats: np.ndarray) -> np.ndarray:
        """Held-out loss increase per fold (in M's units) when ``feats`` leave S."""
        pos = np.searchsorted(self.idx, feats)
        K = np.linalg.inv(self.P[:, pos][:, :, pos])  # [f, b, b]
        V = self.P[:, pos, :]  # [f, b, s]
        t1 = 2.0 * np.einsum("fbs,fsc,fcb->f", V, self.R[:, :, pos], K)
        zk = K @ self.Z[:, pos][:, :, pos] @ K
        t2 = np.einsum("fbc,fbc->f", zk, self.Y2[:, pos][:, :, pos])
        self._pending = (feats, pos, K, V, zk)
        return t1 + t2

    def commit(self, feats: np.ndarray) -> None:
        """Drop ``feats`` from S (reuses the factors of the last :meth:`delta` for them)."""
        if self._pending is None or not np.array_equal(self._pending[0], feats):
            self.delta(feats)
        _, pos, K, V, zk = self._pending
        self._pending = None
        tr = lambda a: a.transpose(0, 2, 1)
        cat = lambda *a: np.concatenate(a, axis=-1)
        KV = K @ V  # [f, b, s]
        tpk = self.TP[:, :, pos]  # T P[:, k] = T Vᵀ
        kz = K @ self.Z[:, pos, :]
        ky = K @ self.Y2[:, pos, :]
        Vt = tr(V)
        # Each matrix changes by a rank-≤3|k| term, applied as one product [s, 3b] @ [3b, s].
        dz = cat(-Vt, -self.Z[:, :, pos], Vt @ zk) @ cat(tr(kz), tr(KV), tr(V)).transpose(0, 2, 1)
        dr = cat(-self.R[:, :, pos], tpk, -tpk @ zk) @ cat(tr(KV), tr(kz), tr(V)).transpose(0, 2, 1)
        dy = cat(-Vt, -self.Y2[:, :, pos], tr(KV) @ self.Y2[:, pos][:, :, pos]) @ cat(tr(ky), tr(KV), tr(KV)).transpose(0, 2, 1)
        self.Z += dz
        self.R += dr
        self.Y2 += dy
        self.TP -= tpk @ KV
        self.P -= Vt @ KV
        self.P[:, pos, :] = 0.0
        self.P[:, :, pos] = 0.0
        self.dead[pos] = True
        # Removed positions are never read again: once an eighth of them are dead, drop them
        # (a copy of five s×s stacks), so the later updates work on smaller matrices.
        if self.COMPACT and self.dead.sum() * self.COMPACT >= len(self.dead):
            keep = ~self.dead
            self.idx, self.dead = self.idx[keep], np.zeros(int(keep.sum()), dtype=bool)
            for name in ("P", "Z", "R", "TP", "Y2"):
                a = getattr(self, name)
                setattr(self, name, np.ascontiguousarray(a[:, keep][:, :, keep]))


@dataclass
class _LinearItem:
    """Fixed per-consumer statistics: total covariance and the cross-validation folds."""

    H: np.ndarray
    lam: float
    folds: list[tuple[np.ndarray, np.ndarray, float]]  # (H_train, T_test second moment, λ)
    bases: dict[bytes, _FoldBase] = field(default_factory=dict)  # by S mask

    def fold_base(self, in_s: np.ndarray) -> _FoldBase:
        """The S-only fold factors for predictor set ``in_s``, cached: in a bisection the
        same S recurs every sweep (usually "all features"), only the kept outputs change."""
        key = np.packbits(in_s).tobytes()
        if key not in self.bases:
            if len(self.bases) >= 2:  # bounded: the common key plus the latest
                self.bases.pop(next(k for k in self.bases if k != next(iter(self.bases))))
            self.bases[key] = _FoldBase(self.folds, np.flatnonzero(in_s))
        return self.bases[key]


def _linear_item(acc: ChannelGram) -> _LinearItem | None:
    if acc.empty:
        return None
    H = acc.covariance()
    g_all, s_all, n_all = acc.total()
    folds = []
    for f in range(acc.gram.shape[0]):
        n_f = float(acc.n[f])
        n_tr = n_all - n_f
        if n_f <= 0 or n_tr <= 0:
            continue
        mu_tr = (s_all - acc.sum[f]) / n_tr
        h_tr = (g_all - acc.gram[f]) / n_tr - np.outer(mu_tr, mu_tr)
        mu_f = acc.sum[f] / n_f
        t = acc.gram[f] / n_f - np.outer(mu_f, mu_tr) - np.outer(mu_tr, mu_f) + np.outer(mu_tr, mu_tr)
        folds.append((h_tr, (t + t.T) / 2, _ridge(h_tr)))
    return _LinearItem(H, _ridge(H), folds)


_EMPTY = np.zeros(0, dtype=np.int64)


def _by_class(cls: np.ndarray) -> dict[int, np.ndarray]:
    """Feature positions of every class (computed once per consumer)."""
    order = np.argsort(cls, kind="stable")
    keys, starts = np.unique(cls[order], return_index=True)
    return {int(k): np.sort(f) for k, f in zip(keys, np.split(order, starts[1:]))}


def _ridge(h: np.ndarray) -> float:
    m = float(np.mean(np.diag(h))) if h.size else 0.0
    return RIDGE * m if m > 0 else 1e-30


def _inv(a: np.ndarray) -> np.ndarray:
    try:
        out = np.linalg.inv(a)
    except np.linalg.LinAlgError:
        out = np.linalg.pinv(a)
    return (out + out.T) / 2


class LinearConsumer:
    """The linear MI proxy at one consumer, for one group decision.

    ``cls[f]``: channel class of feature f (0: fixed, always kept); ``kept_rows``: the
    consumer's outputs still in the model; ``in_s``: features still available as predictors.
    Losses from :meth:`deltas` and :meth:`single_mi` are normalised by ``norm`` (the in-sample
    variance of the kept pre-activation); :meth:`loss` gives the raw closed form.
    """

    def __init__(self, view: ConsumerView, geo: Geometry, item: _LinearItem, cls: np.ndarray,
                 kept_rows: np.ndarray, in_s: np.ndarray, by_class: dict[int, np.ndarray] | None = None) -> None:
        self.view, self.geo, self.item, self.cls = view, geo, item, cls
        self.by_class = _by_class(cls) if by_class is None else by_class
        w = geo.weight[kept_rows].reshape(-1, len(cls))  # [kept outputs · taps, F]
        self.M_raw = w.T @ w
        self.norm = float(np.sum(self.M_raw * item.H))
        self.active = self.norm > 0 and len(item.folds) > 0
        self.M = self.M_raw / self.norm if self.active else self.M_raw
        if self.active and w.shape[0] > w.shape[1]:  # a square factor of M is cheaper
            e, q = np.linalg.eigh(self.M)
            w = (q * np.sqrt(np.maximum(e, 0.0))).T
        else:
            w = w / math.sqrt(self.norm) if self.active else w
        self.factor = w  # factorᵀ factor = M
        self.in_s = in_s.copy()
        self._folds: _LinearFolds | None = None

    # -- closed form -------------------------------------------------------------------
    def loss(self, keep: np.ndarray | None = None) -> float:
        """``tr(Σ_YY − Σ_YS Σ_SS⁻¹ Σ_SY)`` (raw, ridge-regularised, in-sample on all rows)
        for the features ``keep`` (boolean, default all), computed directly."""
        H = self.item.H
        s = np.flatnonzero(np.ones(len(self.cls), bool) if keep is None else keep)
        total = float(np.sum(self.M_raw * H))
        if not len(s):
            return total
        hs = H[:, s]
        expl = hs @ _inv(H[np.ix_(s, s)] + self.item.lam * np.eye(len(s))) @ hs.T
        return total - float(np.sum(self.M_raw * expl))

    def features(self, k: int) -> np.ndarray:
        return self.by_class.get(k, _EMPTY)

    def _alive(self, k: int) -> np.ndarray:
        f = self.features(k)
        return f[self.in_s[f]]

    def reads(self, k: int) -> bool:
        return self.active and len(self._alive(k)) > 0

    def single_mi(self, k: int) -> float:
        """``loss(∅) − loss({k})`` (normalised), in-sample on the total covariance."""
        if not self.active:
            return 0.0
        K = self.features(k)
        H = self.item.H
        hk = H[:, K]
        q = _inv(H[np.ix_(K, K)] + self.item.lam * np.eye(len(K)))
        return float(np.sum((hk.T @ self.M @ hk) * q))

    # -- repeated estimates --------------------------------------------------------------
    def _ensure(self) -> _LinearFolds:
        if self._folds is None:
            self._folds = _LinearFolds(self.item.fold_base(self.in_s), self.factor)
        return self._folds

    def deltas(self, k: int) -> np.ndarray:
        """Per-shard held-out loss increases (normalised) when class ``k`` leaves S."""
        return self._ensure().delta(self._alive(k))

    def commit(self, k: int) -> None:
        feats = self._alive(k)
        self._ensure().commit(feats)
        self.in_s[feats] = False


# ----------------------------------------------------------------------------- MLP estimator


def _mlp_fit(x: np.ndarray, y: np.ndarray, seed: int, start: dict | None = None) -> dict:
    """Fit ``ŷ = x A + tanh(x W1 + b1) W2 + c`` with MSE + weight decay by L-BFGS."""
    n, d = x.shape
    m = y.shape[1]
    h = MLP_HIDDEN
    if start is None:
        rng = np.random.default_rng(seed)
        a = np.linalg.solve(x.T @ x / n + 1e-6 * np.eye(d), x.T @ y / n)  # linear part first
        start = {"A": a, "W1": rng.standard_normal((d, h)) / math.sqrt(max(d, 1)), "b1": np.zeros(h),
                 "W2": 0.01 * rng.standard_normal((h, m)), "c": y.mean(axis=0)}
    shapes = [("A", (d, m)), ("W1", (d, h)), ("b1", (h,)), ("W2", (h, m)), ("c", (m,))]
    theta0 = np.concatenate([np.asarray(start[k], dtype=np.float64).reshape(-1) for k, _ in shapes])

    def unpack(theta: np.ndarray) -> dict:
        out, i = {}, 0
        for k, s in shapes:
            size = int(np.prod(s))
            out[k] = theta[i : i + size].reshape(s)
            i += size
        return out

    def fun(theta: np.ndarray) -> tuple[float, np.ndarray]:
        p = unpack(theta)
        z = np.tanh(x @ p["W1"] + p["b1"])
        r = x @ p["A"] + z @ p["W2"] + p["c"] - y
        loss = float(np.sum(r * r)) / n + MLP_DECAY * (float(np.sum(p["W1"] ** 2)) + float(np.sum(p["W2"] ** 2)))
        dr = 2.0 * r / n
        dz = (dr @ p["W2"].T) * (1 - z * z)
        grads = {"A": x.T @ dr, "W1": x.T @ dz + 2 * MLP_DECAY * p["W1"], "b1": dz.sum(0),
                 "W2": z.T @ dr + 2 * MLP_DECAY * p["W2"], "c": dr.sum(0)}
        return loss, np.concatenate([grads[k].reshape(-1) for k, _ in shapes])

    from scipy import optimize

    res = optimize.minimize(fun, theta0, jac=True, method="L-BFGS-B", options={"maxiter": MLP_ITERS})
    return unpack(res.x)


def _mlp_predict(p: dict, x: np.ndarray) -> np.ndarray:
    return x @ p["A"] + np.tanh(x @ p["W1"] + p["b1"]) @ p["W2"] + p["c"]


class MLPConsumer:
    """The MLP MI proxy at one consumer: k-fold held-out MSE of the MLP predicting the kept
    pre-activation from the kept features (reservoir rows), normalised like the linear one."""

    def __init__(self, view: ConsumerView, geo: Geometry, rows: np.ndarray, cls: np.ndarray,
                 kept_rows: np.ndarray, in_s: np.ndarray, folds: int, seed: int) -> None:
        self.view, self.cls, self.seed = view, cls, seed
        x = np.asarray(rows, dtype=np.float64)
        y = x @ geo.weight[kept_rows][:, 0, :].T
        self.norm = float(y.var(axis=0).sum()) if len(y) else 0.0
        n = len(x)
        self.active = self.norm > 0 and n >= 2 * folds
        self.in_s = in_s.copy()
        self.x, self.y = x, y / math.sqrt(self.norm) if self.norm > 0 else y
        order = np.random.default_rng(seed).permutation(n)
        self.splits = [np.sort(s) for s in np.array_split(order, folds)] if self.active else []
        self._state: list[dict] | None = None
        self._pending: tuple | None = None

    def _fold_data(self, f: int, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        test = self.splits[f]
        train = np.setdiff1d(np.arange(len(self.x)), test)
        xt = self.x[train][:, cols]
        mu, sd = xt.mean(0), xt.std(0)
        sd = np.where(sd > 0, sd, 1.0)
        return (xt - mu) / sd, self.y[train], (self.x[test][:, cols] - mu) / sd, self.y[test]

    def _null(self, f: int) -> float:
        test = self.splits[f]
        train = np.setdiff1d(np.arange(len(self.x)), test)
        return float(np.mean(np.sum((self.y[test] - self.y[train].mean(0)) ** 2, axis=1)))

    def _loss(self, f: int, cols: np.ndarray, start: dict | None = None) -> tuple[float, dict | None]:
        if not len(cols):
            return self._null(f), None
        xtr, ytr, xte, yte = self._fold_data(f, cols)
        p = _mlp_fit(xtr, ytr, self.seed + f, start)
        return float(np.mean(np.sum((_mlp_predict(p, xte) - yte) ** 2, axis=1))), p

    def reads(self, k: int) -> bool:
        return self.active and bool(np.any((self.cls == k) & self.in_s))

    def single_mi(self, k: int) -> float:
        if not self.active:
            return 0.0
        cols = np.flatnonzero(self.cls == k)
        return float(np.mean([self._null(f) - self._loss(f, cols)[0] for f in range(len(self.splits))]))

    def _ensure(self) -> list[dict]:
        if self._state is None:
            cols = np.flatnonzero(self.in_s)
            self._state = []
            for f in range(len(self.splits)):
                loss, p = self._loss(f, cols)
                self._state.append({"cols": cols, "loss": loss, "p": p})
        return self._state

    def deltas(self, k: int) -> np.ndarray:
        out, fits = [], []
        for f, st in enumerate(self._ensure()):
            keep = self.cls[st["cols"]] != k
            start = None
            if st["p"] is not None and keep.any():  # warm start: the current fit without k's inputs
                start = dict(st["p"], A=st["p"]["A"][keep], W1=st["p"]["W1"][keep])
            loss, p = self._loss(f, st["cols"][keep], start)
            out.append(loss - st["loss"])
            fits.append({"cols": st["cols"][keep], "loss": loss, "p": p})
        self._pending = (k, fits)
        return np.array(out)

    def commit(self, k: int) -> None:
        if self._pending is None or self._pending[0] != k:
            self.deltas(k)
        self._state = self._pending[1]
        self._pending = None
        self.in_s[self.cls == k] = False


# ----------------------------------------------------------------------------- the sweep


@dataclass
class _Item:
    view: ConsumerView
    geo: Geometry
    cls: np.ndarray  # class root per feature
    linear: _LinearItem | None = None
    rows: np.ndarray | None = None
    by_class: dict[int, np.ndarray] = field(default_factory=dict)


@dataclass
class Context:
    """Everything a sweep needs that does not depend on the confidence: consumers' fixed
    statistics, graph order, output atoms; built once per select/select_budget call."""

    analysis: Analysis
    opts: MethodOptions
    items: list[_Item]
    out_atoms: dict[int, np.ndarray]
    pos: dict[int, int]
    trace: list[dict] | None = None
    estimates: int = 0

    def consumer(self, item: _Item, removed: np.ndarray) -> LinearConsumer | MLPConsumer:
        out = self.out_atoms.get(id(item.view.node))
        kept_rows = np.ones(item.geo.weight.shape[0], bool) if out is None else ~removed[self.analysis.roots[out]]
        in_s = ~removed[item.cls]
        if item.linear is not None:
            return LinearConsumer(item.view, item.geo, item.linear, item.cls, kept_rows, in_s, item.by_class)
        return MLPConsumer(item.view, item.geo, item.rows, item.cls, kept_rows, in_s,
                           self.opts.mi_estimates, self.opts.seed)


def _check_estimates(opts: MethodOptions) -> None:
    if opts.mi_estimates < 2:
        raise InputError(f"mipp: --mi-estimates must be at least 2 (the keep test needs repeated estimates), got {opts.mi_estimates}")
    if opts.mi_estimator not in ("linear", "mlp"):
        raise InputError(f"mipp: --mi-estimator must be linear or mlp, got '{opts.mi_estimator}'")


def build_context(analysis: Analysis, stats: Statistics, views: list[ConsumerView], opts: MethodOptions) -> Context:
    """Collect every consumer whose statistics were gathered."""
    _check_estimates(opts)
    items = []
    estimates: set[int] = set()
    for view in views:
        acc = stats.extra.get(request_key(view)) if stats is not None else None
        if acc is None:
            continue
        mlp = isinstance(acc, (PatchReservoir, RowReservoir))
        geo = geometry(view, patches=mlp)
        cls = analysis.roots[view.atoms[geo.index]]
        if mlp:
            if acc.rows is None or not len(acc.rows):
                continue
            items.append(_Item(view, geo, cls, rows=acc.rows, by_class=_by_class(cls)))
        else:
            lin = _linear_item(acc)
            if lin is None:
                continue
            estimates.add(len(lin.folds))
            items.append(_Item(view, geo, cls, linear=lin, by_class=_by_class(cls)))
    if estimates and min(estimates) < 2:
        raise InputError(
            "mipp: the keep test needs at least 2 calibration batches (one per repeated estimate); "
            "give more samples or a smaller --batch-size"
        )
    out_atoms = {id(e.node): e.atoms for e in analysis.edits if isinstance(e, SliceParam) and e.role == "weight_out"}
    return Context(analysis, opts, items, out_atoms, graph_positions(analysis), estimates=min(estimates) if estimates else opts.mi_estimates)


def backward_order(ctx: Context, groups: list[Group]) -> list[Group]:
    """Prunable groups, latest producer first (reverse topological order)."""
    todo = [g for g in groups if g.prunable]
    return sorted(todo, key=lambda g: -max(ctx.pos.get(id(p), -1) for p in g.producers))


def decide_group(ctx: Context, group: Group, removed: np.ndarray, alpha: float,
                 chunks: ChunkGuard | None = None, p_values: list[float] | None = None) -> np.ndarray:
    """TERC on one group: visit its classes from the least informative (single-channel MI
    summed over the consumers that read it) and remove each unless the keep test is
    confident at level ``1 − alpha``.  Updates ``removed`` (a mask over class roots) and
    returns the removed roots; every p-value the test computed is appended to ``p_values``."""
    chunks = ChunkGuard([]) if chunks is None else chunks
    classes = [int(c) for c in group.classes]
    wanted = set(classes)
    consumers = [ctx.consumer(it, removed) for it in ctx.items if wanted.intersection(it.by_class)]
    consumers = [c for c in consumers if c.active]
    mi = np.array([sum(c.single_mi(k) for c in consumers if c.reads(k)) for k in classes])
    order = np.argsort(mi, kind="stable")  # ascending: least informative first
    floor = min(len(classes), max(1, ctx.opts.min_keep))
    kept = len(classes)
    gone: list[int] = []
    for i in order.tolist():
        if kept <= floor:
            break
        k = classes[i]
        readers = [c for c in consumers if c.reads(k)]
        if not readers:
            continue  # nothing measures it: keep
        if chunks.last_of_chunk(k):
            continue  # the last kept class of a Split/Slice chunk
        d = np.sum([c.deltas(k) for c in readers], axis=0)
        p = _p_value(d)
        if p_values is not None:
            p_values.append(p)
        drop = p > alpha  # confidence 1 − p < x
        if ctx.trace is not None:
            ctx.trace.append({"group": group.id, "class": k, "mi": float(mi[i]), "deltas": d.tolist(),
                              "confidence": 1.0 - p, "removed": bool(drop)})
        if drop:
            for c in readers:
                c.commit(k)
            chunks.remove(k)
            removed[k] = True
            gone.append(k)
            kept -= 1
    return np.sort(np.array(gone, dtype=np.int64))


def sweep(ctx: Context, groups: list[Group], alpha: float, p_values: list[float] | None = None) -> dict[int, np.ndarray]:
    """Decide every prunable group, outputs first; group id -> removed class roots.  The
    p-values of every keep test on the way are appended to ``p_values``."""
    removed = np.zeros(len(ctx.analysis.roots), dtype=bool)
    chunks = ChunkGuard(g for g in groups if g.prunable)
    out: dict[int, np.ndarray] = {}
    for g in backward_order(ctx, groups):
        out[g.id] = decide_group(ctx, g, removed, alpha, chunks, p_values)
    return out


class SweepCache:
    """Sweeps at several α without repeating one whose outcome is already known.

    A sweep is deterministic and its only use of α is ``drop = p > α`` at each keep test,
    so a sweep at α' takes exactly the path of a finished sweep at α (same decisions, same
    state, hence the same next p-values) when none of that path's p-values lies in
    ``(min(α, α'), max(α, α')]``.  A budget bisection narrows onto one threshold, and most of
    its late steps fall in such a gap, where each sweep on a wide group is costly."""

    def __init__(self, ctx: Context, groups: list[Group]) -> None:
        self.ctx, self.groups = ctx, groups
        self.done: list[tuple[float, dict[int, np.ndarray], np.ndarray]] = []
        self.sweeps = 0

    def __call__(self, alpha: float) -> dict[int, np.ndarray]:
        for a, sel, p in self.done:
            lo, hi = min(a, alpha), max(a, alpha)
            if not np.any((p > lo) & (p <= hi)):
                return sel
        p_values: list[float] = []
        sel = sweep(self.ctx, self.groups, alpha, p_values)
        self.sweeps += 1
        self.done.append((alpha, sel, np.asarray(p_values, dtype=np.float64)))
        return sel


# ----------------------------------------------------------------------------- the plug-in


class Mipp(Criterion):
    """Mutual Information Preserving Pruning (see the module docstring)."""

    def requests(self, analysis: Analysis, views: list[ConsumerView], opts: MethodOptions) -> list[StatRequest]:
        _check_estimates(opts)
        out = []
        mlp = opts.mi_estimator == "mlp"
        for view in views:
            geo = geometry(view, patches=mlp)
            key = request_key(view)
            node = view.node
            if mlp:
                c, o = len(view.atoms), int(geo.weight.shape[0])
                if c > MLP_MAX_CHANNELS or o > MLP_MAX_OUTPUTS or geo.mode == "taps":
                    raise InputError(
                        f"--mi-estimator mlp is for small layers only (2-D Conv/Gemm/MatMul with at most "
                        f"{MLP_MAX_CHANNELS} input channels and {MLP_MAX_OUTPUTS} outputs); {node_label(node)} reads "
                        f"{c} input channels into {o} outputs: use --mi-estimator linear"
                    )
                if geo.mode == "patch":
                    factory = lambda n=node, s=opts.seed: PatchReservoir(n, MLP_ROWS, s)
                else:
                    factory = lambda a=view.axis, s=opts.seed: RowReservoir(a, MLP_ROWS, s)
            else:
                factory = lambda a=view.axis, p=geo.perm, k=opts.mi_estimates, s=opts.seed: SampledGram(
                    axis=a, shards=k, seed=s, rows_per_sample=ROWS_PER_SAMPLE, perm=p)
            out.append(StatRequest(key, view.value, factory))
        return out

    def scores(self, analysis: Analysis, stats: Statistics, views: list[ConsumerView], opts: MethodOptions) -> dict[int, float]:
        """Single-channel MI ``loss(∅) − loss({k})`` summed over the consumers (all outputs kept)."""
        with _one_blas_thread():
            return self._scores(analysis, stats, views, opts)

    def _scores(self, analysis: Analysis, stats: Statistics, views: list[ConsumerView], opts: MethodOptions) -> dict[int, float]:
        ctx = build_context(analysis, stats, views, opts)
        none = np.zeros(len(analysis.roots), dtype=bool)
        total: dict[int, float] = {}
        for it in ctx.items:
            c = ctx.consumer(it, none)
            for k in np.unique(it.cls).tolist():
                if k != 0:
                    total[k] = total.get(k, 0.0) + c.single_mi(k)
        return total

    def own_rule(self, opts: MethodOptions) -> bool:
        return opts.confidence is not None

    def select(self, analysis: Analysis, stats: Statistics, views: list[ConsumerView], opts: MethodOptions,
               groups: list[Group]) -> dict[int, np.ndarray]:
        x = confidence_value(opts.confidence)
        with _one_blas_thread():
            ctx = build_context(analysis, stats, views, opts)
            sel = sweep(ctx, groups, 1.0 - x)
        _remember(stats, groups, sel, x, math.log10(1.0 - x) if x < 1 else -math.inf, ctx, "confidence")
        return sel

    def select_budget(self, analysis: Analysis, stats: Statistics, views: list[ConsumerView], opts: MethodOptions,
                      groups: list[Group], measure: Callable[[dict[int, np.ndarray]], float], target: float,
                      ) -> tuple[dict[int, np.ndarray], float]:
        """Bisection on ``log10 α`` (``α = 1 − x``): the largest α (least removal) whose
        selection meets ``measure(selection) <= target``; the best selection that meets it is
        kept, so a non-monotone step cannot return a miss."""
        with _one_blas_thread():
            return self._select_budget(analysis, stats, views, opts, groups, measure, target)

    def _select_budget(self, analysis: Analysis, stats: Statistics, views: list[ConsumerView], opts: MethodOptions,
                       groups: list[Group], measure: Callable[[dict[int, np.ndarray]], float], target: float,
                       ) -> tuple[dict[int, np.ndarray], float]:
        ctx = build_context(analysis, stats, views, opts)
        run = SweepCache(ctx, groups)
        lo, hi = LOG_ALPHA_MIN, 0.0  # lo removes the most
        best = run(10.0**lo)
        best_a, best_m = lo, measure(best)
        if best_m <= target:
            for _ in range(BISECT_STEPS):
                mid = (lo + hi) / 2
                sel = run(10.0**mid)
                m = measure(sel)
                if m <= target:
                    lo = mid
                    if m >= best_m:  # the feasible selection closest to the target
                        best, best_a, best_m = sel, mid, m
                    if target - best_m <= BUDGET_TOL:
                        break
                else:
                    hi = mid
        x = 1.0 - 10.0**best_a
        _remember(stats, groups, best, x, best_a, ctx, "budget")["mipp"]["sweeps"] = run.sweeps
        return best, x

    def pre_rewrite(self, analysis: Analysis, stats: Statistics, views: list[ConsumerView], opts: MethodOptions,
                    removed: np.ndarray) -> dict | None:
        """The report of this run's own selection (confidence rule or budget), if it made one."""
        return None if stats is None else stats.derived.get(REPORT)


def _remember(stats: Statistics | None, groups: list[Group], sel: dict[int, np.ndarray], x: float, log_alpha: float,
              ctx: Context, how: str) -> dict:
    """Keep the report of a selection with the run's statistics, for ``pre_rewrite``; returns it."""
    report = {
        "mipp": {
            "estimator": ctx.opts.mi_estimator,
            "estimates": ctx.estimates,
            "confidence": x,
            "log10_alpha": log_alpha,
            "chosen_by": how,
            "kept": {str(g.id): [int(len(g.classes) - len(sel.get(g.id, ()))), len(g.classes)]
                     for g in groups if g.prunable},
        }
    }
    if stats is not None:
        stats.derived[REPORT] = report
    return report


register_criterion("mipp", Mipp())
