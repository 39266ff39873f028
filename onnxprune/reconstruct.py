"""Compensate stage, second half of ``--compensate lstsq``: refit each consumer again, from
the inputs it really receives in the pruned graph.

The first refit (:func:`onnxprune.compensate.lstsq_refits`) works from the original graph's
statistics: it assumes every kept input of a consumer still carries its original values,
which is false as soon as an earlier layer was pruned too, so errors pile up with depth.
This pass runs the original and the pruned graph on the calibration batches and fits, at
every refitted consumer,

    W', b' = argmin E‖(W x + b) − (W' x' + b')‖²

where ``x`` is the consumer's input in the original graph and ``x'`` its (kept) input in the
pruned graph, on the same samples and positions (for a k×k Conv: im2col patches of both).
In closed form, with ``y = W x`` at sampled rows:
``W' = C_yx' (C_x'x' + λI)⁻¹`` and ``b' = b + E[y] − W' E[x']`` (C: centred covariances),
the reconstruction of ThiNet / channel pruning (He et al. 2017) without the selection step.

When the consumer's output is added to a residual stream (``Add(W x + b, s)``, through at
most its own bias ``Add``), the target also carries the error the stream brings along,
``y = W x + (s − s')`` with ``s'`` the stream in the pruned graph: the skip path passes
upstream errors on unchanged, and this is the one layer that can take them out, so the
refit matches the sum the block hands on rather than its own branch.

Consumers are refitted in waves, front to back; each wave sees the previous waves' refits.

``--compensate bias`` uses the same pass, bias only, at the consumers whose output goes
straight into a ``Relu``: matching the mean of the pre-activation is not enough there.
Removing inputs takes variance out of the pre-activation, and with its mean held fixed a
ReLU then passes on less (Jensen: ``E[relu(E[y|x'])] <= E[relu(y)]``), so the next layer reads
inputs whose means drifted, and the drift compounds with depth.  Those consumers get the
shift that keeps the post-ReLU mean instead, ``E[relu(y' + c)] = E[relu(y)]`` per output,
with both sides Gaussian from the first two moments (``E[relu(N(m, s²))] = m·Φ(m/s) + s·φ(m/s)``),
``y`` the original pre-activation and ``y'`` the pruned graph's, on the calibration set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from ._ahead import Ahead
from ._graph import const_array, copy_model
from .calibrate import SHARD_BLOCK, InputRef, StatRequest
from .compensate import ZEROED, _lstsq_kind, holds_zeros, loses_inputs, rows_to_weight, weight_rows, write_consumer
from .consumers import consumer_views
from .data import Sample, samples_in
from .errors import InputError
from .gram import ChannelGram, PatchGram, rows_at, solve_spd, solve_spd_fast
from .groups import Analysis
from .layout import SliceParam
from .rewrite import removed_mask
from .segments import SegmentPass, TensorCache

# Sampled rows (positions, tokens) per batch and consumer: as many as a Conv's Gram samples
# (gram.PatchGram), so the two sample the same rows and gather them once.  Half the 4096 of
# before: the refit's sums and the record halve, and the small models' lstsq cells chose
# about as well (RESULTS "The allocation's probes, A against B", the refit's settings).
REFIT_ROWS = 2048
# Folds of the lstsq-or-bias choice: each fit leaves one fold out, so it sees (K-1)/K of the
# samples.  With two folds least squares was judged on half the data and lost to the bias
# fit at consumers where the full-data refit wins by far (benchmarks/RESULTS.md,
# "EfficientNet-Lite0", the folds table); four folds (each fit on 3/4) choose as well as eight
# did at half the solves (RESULTS "Cost").
REFIT_FOLDS = 4
# Each fold keeps its own F×F and O×F sums: the fold count drops (to 2 at least) where 4 folds
# of a wide consumer would pass this many bytes (a 4096-input MatMul: 134 MB a fold).
REFIT_FOLD_BYTES = 512 * 2**20


# The least-squares refit is shrunk toward the original kept weights, ``min ‖y − A x'‖² +
# λ‖A − W_kept‖²``, λ a factor of the kept inputs' mean variance; the K folds pick the factor
# per consumer, or the bias fit (λ = ∞).  Shrinking toward W_kept, not 0, is what keeps a
# consumer fitted on few distinct images near the weights it was trained with.
REFIT_SHRINK = (1e-3, 1e-2, 1e-1, 1.0)


def _extractor(kind: str, node: ir.Node, axis: int) -> ChannelGram:
    """What samples a consumer's refit rows: its input's channel rows (``"rows"``) or
    im2col patches (``"patch"``), REFIT_ROWS a batch."""
    if kind == "patch":
        return PatchGram(node, shards=1, max_rows=REFIT_ROWS)
    return ChannelGram(axis, shards=1, max_rows=REFIT_ROWS)


def _input_rows(kind: str, ext: ChannelGram, x: np.ndarray, batch: int, samples: bool = False):
    """A consumer's input rows (im2col patches for a Conv) sampled for ``batch`` by ``ext``
    (:func:`_extractor`); with ``samples``, (rows, the sample each row comes from)."""
    if kind == "patch":
        return ext.patch_rows(x, batch, samples=samples)
    return ext.sampled_rows(x, batch, samples=samples)


def _out_rows(kind: str, ext: ChannelGram, x: np.ndarray) -> int:
    """Output rows (positions, tokens) of a consumer for an input ``x``."""
    if kind == "patch":
        return x.shape[0] * math.prod(ext.out_size(x.shape))
    return x.size // max(x.shape[ext.axis], 1)


def fold_count(outputs: int, features: int) -> int:
    """Folds of the lstsq-or-bias choice for a consumer of this size (see REFIT_FOLDS)."""
    per_fold = 8 * (features * features + outputs * features)
    return int(max(2, min(REFIT_FOLDS, REFIT_FOLD_BYTES // max(per_fold, 1))))


@dataclass
class RefitTarget:
    """One consumer to refit: its node (pruned in place later), the name of its input in
    the original graph, and its original weights restricted to the outputs it keeps."""

    node: ir.Node
    source: str
    kind: str  # "rows" (Gemm, MatMul: channels one to one) or "patch" (Conv, im2col)
    axis: int
    w: np.ndarray  # [O_kept, F]: rows are kept outputs, columns input features (Conv: c·kh·kw + tap)
    b: np.ndarray  # [O_kept]
    keep_cols: np.ndarray  # bool [F]: the features the pruned consumer still reads
    skip: str | None = None  # residual stream added to the output (same name in both graphs)
    keep_rows: np.ndarray | None = None  # bool [O]: the outputs kept (the original skip's channels)
    rows_seen: int = 0
    samples_seen: int = 0
    sums: list = field(default_factory=list)  # fold_count() folds of samples (sample index mod K)
    mode: str = ""  # "lstsq" or "bias": what the held-out comparison chose
    shrink: float | None = None  # the chosen REFIT_SHRINK factor (mode "lstsq")
    relu: bool = False  # the bias fit keeps the post-ReLU mean (--compensate bias; zero-keeping targets before a Relu)
    keep_zeros: bool = False  # sparse on purpose (compensate.holds_zeros): the bias fit only
    # The weights as written, where connections were zeroed this round (compensate.ZEROED):
    # ``w`` is then the weight before the zeroing (the target), and the fits start from these.
    written: np.ndarray | None = None
    shift_y: np.ndarray | None = None  # the first batch's means, subtracted before summing
    shift_p: np.ndarray | None = None
    _w32: np.ndarray | None = None
    _pending: list = field(default_factory=list, repr=False)  # (y, x', fold) rows not yet summed
    _pending_rows: int = 0
    _kept_w: np.ndarray | None = field(default=None, repr=False)  # _kept(), sliced from _kept_of
    _kept_of: np.ndarray | None = field(default=None, repr=False)
    key: str = ""  # the consumer's InputRef name (its first output in the original graph): its recorded rows

    def extractor(self) -> ChannelGram:
        return _extractor(self.kind, self.node, self.axis)

    def for_shard(self, node: ir.Node, shift: tuple[np.ndarray, np.ndarray] | None) -> "RefitTarget":
        """A copy with no sums, for one shard's batches: its own graph's ``node``, and the
        shift every shard uses (see :meth:`original_rows`), so the sums add up exactly."""
        return replace(self, node=node, sums=[], rows_seen=0, samples_seen=0, _pending=[], _pending_rows=0,
                       shift_y=None if shift is None else shift[0], shift_p=None if shift is None else shift[1])

    def _input_rows(self, ext: ChannelGram, x: np.ndarray, batch: int, samples: bool = False):
        return _input_rows(self.kind, ext, x, batch, samples)

    def _out_rows(self, ext: ChannelGram, x: np.ndarray) -> int:
        return _out_rows(self.kind, ext, x)

    def stores_inputs(self) -> bool:
        """Whether :meth:`original_rows` keeps the input rows (fewer columns than ``W x``,
        and no stream to add) rather than ``W x``."""
        return self.skip is None and len(self.keep_cols) < len(self.b)

    def original_rows(self, ext: ChannelGram, x: np.ndarray, s: np.ndarray | None, batch: int):
        """The original graph's side of one batch: ``(rows, owner, streamed, shift)``.

        ``rows`` (float32): at the rows sampled for ``batch``, the target ``W x`` plus the
        kept channels of the stream ``s`` the output is added to (when ``s`` has one value
        per output row: ``streamed``), or the input rows themselves where
        :meth:`stores_inputs`.  ``owner``: the sample (along axis 0) each row comes from.
        ``shift``: this batch's means of ``W x`` and of the kept inputs, the values every
        shard's sums are taken around (batch 0's), so centring later loses nothing."""
        r, owner = self._input_rows(ext, x, batch, samples=True)
        r = r.astype(np.float32, copy=False)
        y = r @ self.w32.T
        shift = (y.mean(axis=0, dtype=np.float64), r[:, self.keep_cols].mean(axis=0, dtype=np.float64))
        if s is None and self.stores_inputs():
            return np.ascontiguousarray(r), owner, False, shift
        sr = None if s is None else self._stream_rows(ext, s, self._out_rows(ext, x), batch, len(self.keep_rows))
        if sr is not None:
            y += sr[:, self.keep_rows]
        return y, owner, sr is not None, shift

    def _stream_rows(self, ext: ChannelGram, s: np.ndarray, out_rows: int, batch: int, width: int) -> np.ndarray | None:
        """The stream ``s`` at the sampled output rows; None where ``s`` is not one value
        per output row and channel (a broadcasting Add: the branch is fitted alone)."""
        axis = 1 if self.kind == "patch" else self.axis
        if (s.size // max(s.shape[axis], 1), s.shape[axis]) != (out_rows, width):
            return None
        return rows_at(s, axis, ext.positions(out_rows, batch))

    def update(self, ext: ChannelGram, x: np.ndarray, xp: np.ndarray, batch: int,
               skip: tuple[np.ndarray, np.ndarray] | None = None, first_sample: int | None = None) -> None:
        """Fold in one batch: ``x`` from the original graph, ``xp`` from the pruned one, and
        the residual stream the output is added to in each (``skip``), if any.  ``batch``
        and ``first_sample``: the batch's number and its first sample's index among all
        batches (default: counted here), which choose the sampled rows and the folds.
        The sums are taken around the first batch's shift unless one was given."""
        inputs = skip is None and self.stores_inputs()
        rows, owner, streamed, shift = self.original_rows(ext, x, None if skip is None else skip[0], batch)
        if self.shift_y is None:
            self.shift_y, self.shift_p = shift
        if skip is not None and not streamed:
            self.skip = None  # a broadcasting Add: not one stream value per output; fit the branch alone
        self.add(ext, rows, owner, xp, batch, skip[1] if streamed else None, first_sample, inputs=inputs)

    def add(self, ext: ChannelGram, rows: np.ndarray, owner: np.ndarray, xp: np.ndarray, batch: int,
            sp: np.ndarray | None = None, first_sample: int | None = None, inputs: bool = False) -> None:
        """Fold in one batch from its :meth:`original_rows` (``rows``: input rows where
        ``inputs``) and the pruned graph's input ``xp`` and stream ``sp`` (where the
        original's stream was added), around the shift given (:meth:`for_shard`)."""
        rp = self._input_rows(ext, xp, batch)
        if rp.shape[1] != int(self.keep_cols.sum()):
            raise ValueError(f"pruned input of {self.node.name!r} has {rp.shape[1]} features, expected {int(self.keep_cols.sum())}")
        # Products in float32 (twice the speed of float64), summed into float64 per batch,
        # on values shifted by the first batch's means so centring later loses nothing.
        y = (rows @ self.w32.T if inputs else rows).astype(np.float64)
        if sp is not None:
            kept = int(self.keep_rows.sum())
            srp = self._stream_rows(ext, sp, self._out_rows(ext, xp), batch, kept)
            if srp is None:
                raise ValueError(f"the pruned stream added to {self.node.name!r} does not match the original's")
            y -= srp
        if not self.sums:
            o, f = y.shape[1], rp.shape[1]
            self.sums = [dict(n=0, yy=0.0, y=np.zeros(o), y2=np.zeros(o), p=np.zeros(f), pp=np.zeros((f, f)),
                              yp=np.zeros((o, f))) for _ in range(fold_count(o, f))]
        ys = (y - self.shift_y).astype(np.float32)
        ps = (rp - self.shift_p.astype(np.float32)).astype(np.float32, copy=False)
        # Folds by sample, not by row: the tokens (positions) of one sentence (image) are
        # alike, and a fold that shares samples with the other flatters the refit.
        start = self.samples_seen if first_sample is None else first_sample
        fold_of = (start + owner) % len(self.sums)
        self.samples_seen += xp.shape[0]
        self.rows_seen += len(rp)
        # Buffered up to REFIT_ROWS rows: a batch of a few rows (a Gemm's samples) split in
        # K folds would pay K F×F accumulations for a handful of rows each.
        self._pending.append((ys, ps, fold_of))
        self._pending_rows += len(ys)
        if self._pending_rows >= REFIT_ROWS:
            self.flush()

    def flush(self) -> None:
        """Fold the buffered rows into the per-fold sums."""
        if not self._pending:
            return
        ys, ps, fold_of = (np.concatenate(parts) if len(parts) > 1 else parts[0] for parts in zip(*self._pending))
        self._pending, self._pending_rows = [], 0
        order = np.argsort(fold_of, kind="stable")
        ends = np.cumsum(np.bincount(fold_of, minlength=len(self.sums)))
        ys, ps = ys[order], ps[order]
        for fold, s in enumerate(self.sums):
            lo = ends[fold - 1] if fold else 0
            yf, pf = ys[lo : ends[fold]], ps[lo : ends[fold]]
            if not len(yf):
                continue
            s["n"] += len(yf)
            yd = yf.astype(np.float64)  # cast once for the three sums (numpy cast it for each)
            y2 = np.einsum("ij,ij->j", yd, yd)
            s["yy"] += float(y2.sum())
            s["y"] += yd.sum(axis=0)
            s["y2"] += y2
            s["p"] += pf.sum(axis=0, dtype=np.float64)
            yd = None
            s["pp"] += pf.T @ pf
            s["yp"] += yf.T @ pf

    @property
    def w32(self) -> np.ndarray:
        if self._w32 is None:
            self._w32 = self.w.astype(np.float32)
        return self._w32

    def _kept(self) -> np.ndarray:
        """The kept weights the fits start from (as written, where this round zeroed some):
        a read-only array, sliced once (every fit of the held-out comparison starts there)."""
        source = self.w if self.written is None else self.written
        if self._kept_of is not source:
            self._kept_w = source[:, self.keep_cols]
            self._kept_w.flags.writeable = False
            self._kept_of = source
        return self._kept_w

    def _fit(self, s: dict, shrink: float | None, fast: bool = False,
             moments: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(A, c) with ``W x ≈ A x' + c`` on the rows summed in ``s``: the least-squares fit
        shrunk toward the original kept weights by ``shrink`` (see REFIT_SHRINK), or, with
        ``None``, those weights with the mean difference moved into the bias.  ``fast``:
        solved in float32 (the held-out comparison; the weights written are solved in float64).
        ``moments``: :meth:`_moments` of ``s``, where several fits share them."""
        n, mp, my, cpp, cyp = moments or self._moments(s)
        a = self._kept()
        if shrink is None:
            if self.relu:
                v0 = np.maximum(s["y2"] / n - my * my, 0.0)
                v1 = np.maximum(np.einsum("of,fg,og->o", a, cpp, a), 0.0)
                m0, m1 = my + self.shift_y, a @ (mp + self.shift_p)
                return a, relu_mean_shift(m0 + self.b, v0, m1 + self.b, v1)
        else:
            lam = shrink * max(float(np.trace(cpp)) / max(len(cpp), 1), 1e-12)
            m = cpp.copy()  # the shared moments stay as they are
            m[np.diag_indices_from(m)] += lam
            a = (solve_spd_fast if fast else solve_spd)(m, (cyp + lam * a).T).T
        return a, (my + self.shift_y) - a @ (mp + self.shift_p)

    @staticmethod
    def _moments(s: dict) -> tuple:
        """(n, mean of x', mean of y, covariance of x', cross-covariance of y and x') of the
        rows summed in ``s`` (shifted values: the covariances need no shift)."""
        n = max(s["n"], 1)
        mp, my = s["p"] / n, s["y"] / n
        return n, mp, my, s["pp"] / n - np.outer(mp, mp), s["yp"] / n - np.outer(my, mp)

    def _error(self, a: np.ndarray, c: np.ndarray, s: dict, quad: float | None = None) -> float:
        """Σ‖y − (A x' + c)‖² over the rows summed in ``s``, from the sums alone (in
        float64: a good fit's error is a small difference of large sums).  ``quad``:
        ``Σ (A pp) ∘ A``, or that less a term the caller leaves out (:meth:`held_out_errors`)."""
        c = c - self.shift_y + a @ self.shift_p  # the sums are of shifted values
        fit = float(np.sum(a * s["yp"])) + float(c @ s["y"])
        if quad is None:
            quad = float(np.sum((a @ s["pp"]) * a))
        sq = quad + 2.0 * float(c @ (a @ s["p"])) + s["n"] * float(c @ c)
        return s["yy"] - 2.0 * fit + sq

    def held_out_errors(self, rest: dict, s: dict, grid: list) -> list[float]:
        """Per grid entry (a shrink factor, or None: the bias fit), the squared error on the
        rows summed in ``s`` of the fit to ``rest``, less ``Σ (W₀ pp) ∘ W₀`` (``W₀`` the kept
        weights): a term every entry of the fold shares, which the comparison does not need.
        With it gone, each fit's quadratic form is that of its change ``D = A − W₀`` only,
        ``Σ (D pp) ∘ (2 W₀ + D)``: one float32 product a shrink factor, none for the bias fit."""
        moments = self._moments(rest)
        a0 = self._kept()
        pp32 = s["pp"].astype(np.float32) if any(e is not None for e in grid) else None
        out = []
        for shrink in grid:
            a, c = self._fit(rest, shrink, fast=True, moments=moments)
            quad = 0.0
            if shrink is not None:
                d = (a - a0).astype(np.float32)
                quad = float(np.sum((d @ pp32) * (2 * a0 + d), dtype=np.float64))
            out.append(self._error(a, c, s, quad))
        return out

    def solve(self, modes: tuple[str, ...] = ("lstsq", "bias"), fold_errors: Callable | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(W' [O_kept, F'], b' [O_kept]): the least-squares refit shrunk toward the kept
        weights by the REFIT_SHRINK factor, or the plain bias fit, whichever predicts held-out
        samples best (K-fold by sample, each fit leaving one fold out) — with few rows per
        feature the plain refit overfits (all-MiniLM-L6-v2 on 24 sentences).
        ``modes=("bias",)``: the bias fit only (``--compensate bias``); ``("lstsq",)``: a
        shrink factor only; a target that keeps its zeros (``keep_zeros``) gets the bias fit
        whatever ``modes`` says.  ``fold_errors``: computes :func:`fold_errors` elsewhere (on
        Ray workers), with the same result."""
        if self.keep_zeros:
            modes = ("bias",)
        self.flush()
        total = {k: sum(s[k] for s in self.sums) for k in self.sums[0]}
        filled = [s for s in self.sums if s["n"]]
        grid = ([None] if "bias" in modes else []) + (list(REFIT_SHRINK) if "lstsq" in modes else [])
        if len(grid) == 1 or len(filled) < 2:  # nothing to compare on: bias if allowed, else the plain fit
            self.shrink = grid[0]
        else:
            self.shrink = self._choose(total, filled, grid, fold_errors or globals()["fold_errors"])
        self.mode = "bias" if self.shrink is None else "lstsq"
        a, c = self._fit(total, self.shrink)
        return a, self.b + c

    def _choose(self, total: dict, filled: list[dict], grid: list, errors_of: Callable) -> float | None:
        """The grid entry (a shrink factor, or None: the bias fit) with the least held-out
        error, summed over the folds in fold order.  The held-out error is unimodal in the
        shrink factor on every consumer measured (RESULTS "Cost"), so the factors are
        searched as a unimodal sequence: three solves a fold instead of four, and the entry
        the whole grid would choose.  The bias fit needs no solve and is always measured."""
        err: dict[float | None, float] = {}

        def measure(entries: list) -> None:
            entries = [e for e in entries if e not in err]
            if entries:
                per_fold = errors_of(self, total, filled, entries)
                for k, e in enumerate(entries):
                    err[e] = sum(errors[k] for errors in per_fold)

        shrinks = [g for g in grid if g is not None]
        lo, hi = 0, len(shrinks) - 1
        first = [g for g in grid if g is None]  # measured with the first pair: one call fewer
        while hi - lo >= 2:
            m1, m2 = lo + (hi - lo) // 3, hi - (hi - lo) // 3
            measure(first + [shrinks[m1], shrinks[m2]])
            first = []
            if err[shrinks[m1]] <= err[shrinks[m2]]:
                hi = m2 - 1
            else:
                lo = m1 + 1
        measure(first + shrinks[lo : hi + 1])
        return min((g for g in grid if g in err), key=lambda g: err[g])  # ties: the first in grid order


def fold_errors(target: RefitTarget, total: dict, folds: list[dict], grid: list) -> list[list[float]]:
    """Per fold, per grid entry (a shrink factor, or None for the bias fit): the squared
    error on that fold of the fit to the other folds, less a term common to the fold's
    entries (:meth:`RefitTarget.held_out_errors`): comparable across entries only."""
    return [target.held_out_errors({k: total[k] - s[k] for k in s}, s, grid) for s in folds]


def relu_mean_shift(m0: np.ndarray, v0: np.ndarray, m1: np.ndarray, v1: np.ndarray) -> np.ndarray:
    """Per output, the shift ``c`` with ``E[relu(N(m1 + c, v1))] = E[relu(N(m0, v0))]``
    (``E[relu(N(m, s²))] = m·Φ(m/s) + s·φ(m/s)``, increasing in m: bisection)."""
    def g(m, s):
        s = np.maximum(s, 1e-12)
        z = m / s
        import scipy.special  # here, not at import: the CLI starts faster

        return m * scipy.special.ndtr(z) + s * np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)

    s0, s1 = np.sqrt(v0), np.sqrt(v1)
    target = g(m0, s0)
    span = np.abs(m0) + np.abs(m1) + 10.0 * (s0 + s1) + 1.0
    lo, hi = -span, span.copy()
    for _ in range(100):
        mid = (lo + hi) / 2
        up = g(m1 + mid, s1) < target
        lo, hi = np.where(up, mid, lo), np.where(up, hi, mid)
    return (lo + hi) / 2


def _feeds_relu(node: ir.Node) -> bool:
    out = node.outputs[0]
    uses = list(out.uses())
    return len(uses) == 1 and uses[0].node.op_type == "Relu" and not out.is_graph_output()


def refit_targets(analysis: Analysis, removed: np.ndarray, relu_only: bool = False) -> list[RefitTarget]:
    """The consumers that lose inputs and that least squares can refit, with their
    original weights; call before the rewrite.  ``relu_only`` (``--compensate bias``): only
    the consumers whose output goes straight into a Relu, marked to keep the post-ReLU mean."""
    from .rewrite import keep_function

    gone = removed_mask(analysis, removed)
    keep = keep_function(analysis, removed)
    out_atoms = {id(e.node): e.atoms for e in analysis.edits if isinstance(e, SliceParam) and e.role == "weight_out"}
    targets = []
    for view in consumer_views(analysis):
        drop = gone[analysis.roots[view.atoms]]
        kind = _lstsq_kind(view)
        node = view.node
        if not loses_inputs(view, drop) or not refittable(view, relu_only):
            continue
        wf = weight_rows(view)
        written = None
        if ZEROED in node.meta:  # the target is the output before relief zeroed connections
            written = wf
            wf = wf + weight_rows(view, node.meta[ZEROED])
        keep_cols = np.repeat(~drop, wf.shape[1] // len(drop))  # k·k columns per channel of a Conv
        b = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        b = np.zeros(wf.shape[0]) if b is None else np.broadcast_to(np.asarray(b, np.float64).reshape(-1), (wf.shape[0],))
        rows = keep(out_atoms[id(node)]) if id(node) in out_atoms else np.ones(wf.shape[0], dtype=bool)
        skip = _residual(node)
        keep_zeros = holds_zeros(node, wf if written is None else written)
        # A target held to the bias fit keeps the post-ReLU mean where a Relu follows, as
        # --compensate bias does.
        relu = relu_only or (keep_zeros and _feeds_relu(node))
        targets.append(RefitTarget(node, view.value.name, kind, view.axis, wf[rows], b[rows].copy(), keep_cols,
                                   skip=skip.name if skip is not None else None, keep_rows=rows, relu=relu,
                                   keep_zeros=keep_zeros,
                                   written=None if written is None else written[rows], key=InputRef.of(view).consumer))
    return targets


def refittable(view, relu_only: bool = False) -> bool:
    """Whether the refit can take ``view``'s consumer on, should it lose inputs: least
    squares supports it, its input is computed (not a graph input), a Gemm scales nothing;
    with ``relu_only`` (``--compensate bias``), its output goes straight into a Relu."""
    node = view.node
    if _lstsq_kind(view) is None or view.value.is_graph_input():
        return False
    if relu_only and not _feeds_relu(node):
        return False
    return not (node.op_type == "Gemm" and (_fattr(node, "alpha") != 1.0 or _fattr(node, "beta") != 1.0))


def _residual(node: ir.Node) -> ir.Value | None:
    """The stream the node's output is added to: the other operand of the ``Add`` it feeds
    alone, looking through one ``Add`` of a constant (its bias); None if there is none."""
    out = node.outputs[0]
    for _ in range(2):
        uses = list(out.uses())
        if len(uses) != 1 or uses[0].node.op_type != "Add" or out.is_graph_output():
            return None
        add, idx = uses[0].node, uses[0].idx
        other = add.inputs[1 - idx]
        if other is None:
            return None
        if const_array(other) is None:
            return other
        out = add.outputs[0]
    return None


def _fattr(node: ir.Node, name: str) -> float:
    a = node.attributes.get(name)
    return 1.0 if a is None else float(a.value)


REFIT_BLOCK = SHARD_BLOCK  # batches a shard holds as a unit: the sums flush at block ends, whatever the shard count


def shard_ranges(n_batches: int, shards: int, block: int = REFIT_BLOCK) -> list[range]:
    """Batch numbers per shard: runs of whole blocks, as even as the blocks allow.  Rows are
    buffered within a block only, so the float32 products, and the sums, do not depend on
    how many shards there are."""
    blocks = -(-n_batches // block)
    per = [blocks // shards + (k < blocks % shards) for k in range(shards)]
    starts = np.cumsum([0] + per)
    return [range(min(a * block, n_batches), min(b * block, n_batches)) for a, b in zip(starts, starts[1:])]


class _Subset:
    """Some batches of a batch sequence, read when indexed."""

    def __init__(self, batches: Sequence[Sample], index: range) -> None:
        self.batches, self.index = batches, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> Sample:
        return self.batches[self.index[k]]

    def __iter__(self):
        return (self.batches[i] for i in self.index)


@dataclass
class ShardSums:
    """One shard's part of one target's sums: plain arrays, cheap to send."""

    sums: list
    rows: int
    shift: tuple[np.ndarray, np.ndarray] | None
    stream: bool  # the residual stream could be used (one value per output row)


class OriginalRows:
    """The original graph's side of the refit for one shard's batches: per target and
    batch, the rows it is fitted to (:meth:`RefitTarget.original_rows`), from one pass of
    the original over the batches that gathers every target's rows at once.  The wide
    tensors the targets read are used batch by batch and dropped, never cached for every
    batch as a segment pass would.  The rows stay in memory up to ``budget`` bytes, then spill
    (:class:`segments.TensorCache`); the tensors of one batch are fetched in runs that
    fit the budget, as calibration does."""

    def __init__(self, targets: list[RefitTarget], original: ir.Model, batches: Sequence[Sample], index: range,
                 *, providers: list[str], budget: int) -> None:
        self.cache = TensorCache(budget, prefix="onnxprune-rows-")
        self.inputs = [t.stores_inputs() for t in targets]  # rows are inputs, not W x
        self.streamed: list[list[bool]] = [[] for _ in targets]  # per batch: the stream was added
        self.shifts: list | None = [None] * len(targets) if len(index) and index[0] == 0 else None
        try:
            for run in self._runs(targets, original, batches, budget):
                self._record(run, targets, original, batches, index, providers)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _runs(targets: list[RefitTarget], original: ir.Model, batches: Sequence[Sample], budget: int) -> list[list[int]]:
        """Targets per run of the original: the tensors one run fetches fit ``budget``
        (sizes from the inferred shapes; an unknown dim counts as one)."""
        from .calibrate import _bytes_per_sample, _plan_runs

        values = {v.name: v for v in original.graph.inputs}
        values.update((o.name, o) for n in original.graph for o in n.outputs)
        per = samples_in(batches[0]) if len(batches) else 1  # batches are alike but the last
        cost = [(str(i), sum(_bytes_per_sample(values[n]) for n in (t.source, t.skip) if n), True)
                for i, t in enumerate(targets)]
        return [[int(i) for i in run] for run in _plan_runs(cost, per, budget) if run]

    def _record(self, run: list[int], targets: list[RefitTarget], original: ir.Model, batches: Sequence[Sample],
                index: range, providers: list[str]) -> None:
        names = list(dict.fromkeys(n for i in run for n in (targets[i].source, targets[i].skip) if n))
        exts = {i: targets[i].extractor() for i in run}
        with SegmentPass(original, batches, providers=providers, budget=0, label="original graph") as sp:
            k = -1
            for got in sp.stream(names, rest=False):  # not enumerate(): its tuple would hold the batch
                k += 1
                for i in run:
                    t = targets[i]
                    s = got[t.skip] if t.skip else None
                    rows, owner, streamed, shift = t.original_rows(exts[i], got[t.source], s, index[k])
                    self.cache.put(f"{i}", k, rows)
                    self.cache.put(f"{i}:owner", k, owner)
                    self.streamed[i].append(streamed)
                    if k == 0 and self.shifts is not None:
                        self.shifts[i] = shift
                got = None

    def get(self, i: int, k: int) -> tuple[np.ndarray, np.ndarray, bool, bool]:
        """Target ``i``'s rows of batch ``k`` of the shard: (rows, owner, inputs, streamed)."""
        return self.cache.get(f"{i}")[k], self.cache.get(f"{i}:owner")[k], self.inputs[i], self.streamed[i][k]

    def close(self) -> None:
        self.cache.close()


@dataclass(frozen=True)
class RowsKey:
    """The refit rows calibration records for one consumer input (``Statistics.extra``)."""

    view: InputRef


@dataclass
class _Recorded:
    """Where calibration put one consumer's rows: ``rows`` names its rows in the record's
    cache (``inputs``: the input rows, which every consumer of one tensor with one sampling
    shares; else ``W x`` of every output), ``geometry`` its input rows' sampling (their
    owners and batch 0's mean input row live under it), ``stream`` the stream's rows where
    its output is added to one."""

    rows: str
    geometry: str
    inputs: bool
    stream: str | None
    out_rows: list = field(default_factory=list)  # per batch: the consumer's output rows


class RowsRecord:
    """The original graph's side of the refit, recorded while calibration runs the
    original: per consumer the refit may take on (:func:`refittable`) and per batch, the
    rows :meth:`RefitTarget.original_rows` would make, in the narrower form (the input rows
    or ``W x``), and the rows of the stream its output is added to.  Calibration already
    runs the original over every batch and fetches these inputs for the Gram sums, so the
    refit needs no pass of the original of its own (:class:`RecordedRows`).

    Which consumers lose inputs is known only after selection: every candidate is recorded.
    The rows stay in memory up to ``budget`` bytes, then spill
    (:class:`segments.TensorCache`), removed at :meth:`close`."""

    def __init__(self, budget: int) -> None:
        self.cache = TensorCache(budget, prefix="onnxprune-rows-")
        self.consumers: dict[str, _Recorded] = {}
        self.first_mean: dict[str, np.ndarray] = {}  # geometry -> batch 0's mean input row
        self.stream_shape: dict[str, list[tuple[int, int]]] = {}  # stream -> per batch (rows, channels)
        self._memo: tuple = (None, -1, None)  # (geometry, batch, (rows, owner)): consumers of one tensor

    def requests(self, analysis: Analysis, relu_only: bool = False) -> list[StatRequest]:
        """Calibration requests that record every refittable consumer's rows."""
        out, streams = [], set()
        for view in consumer_views(analysis):
            if not refittable(view, relu_only):
                continue
            kind = _lstsq_kind(view)
            ext = _extractor(kind, view.node, view.axis)
            geometry = _geometry(view.value.name, kind, ext)
            w = weight_rows(view)
            inputs = w.shape[1] <= w.shape[0]
            key = InputRef.of(view).consumer
            s = _residual(view.node)
            stream = None if s is None else f"stream:{s.name}:{1 if kind == 'patch' else view.axis}"
            entry = self.consumers[key] = _Recorded(geometry if inputs else f"y:{key}", geometry, inputs, stream)
            out.append(StatRequest(RowsKey(InputRef.of(view)), view.value,
                                   lambda e=entry, x=ext, k=kind, w=None if inputs else w.astype(np.float32):
                                   _InputRecorder(self, e, x, k, w)))
            if stream is not None and stream not in streams:
                streams.add(stream)
                axis = 1 if kind == "patch" else view.axis
                out.append(StatRequest(("rows stream", stream), s, lambda n=stream, a=axis: _StreamRecorder(self, n, a)))
        return out

    def input_rows(self, entry: _Recorded, ext: ChannelGram, kind: str, x: np.ndarray, batch: int):
        """(rows, owner) of ``x`` sampled for ``batch``: once per geometry and batch."""
        geometry, b, got = self._memo
        if (geometry, b) != (entry.geometry, batch):
            r, owner = _input_rows(kind, ext, x, batch, samples=True)
            r = r.astype(np.float32, copy=False)
            if np.may_share_memory(r, x):
                # Rows that are all of x are a view of onnxruntime's output, and one output
                # alive holds its session's whole arena, also after the session is gone.
                r = r.copy()
            got = (r, owner)
            self._memo = (entry.geometry, batch, got)
            owners = entry.geometry + ":owner"
            if owners not in self.cache or len(self.cache.get(owners)) == batch:
                self.cache.put(owners, batch, owner)
                if batch == 0:
                    self.first_mean[entry.geometry] = got[0].mean(axis=0, dtype=np.float64)
        return got

    def covers(self, targets: list["RefitTarget"]) -> bool:
        """Whether every target's rows, and its stream's, were recorded."""
        return all(t.key in self.consumers and (t.skip is None or self.consumers[t.key].stream is not None)
                   for t in targets)

    def close(self) -> None:
        self.cache.close()
        self._memo = (None, -1, None)


def _geometry(source: str, kind: str, ext: ChannelGram) -> str:
    """A name for one sampling of one tensor's rows: consumers that share it share rows."""
    if kind == "patch":
        return f"patch:{source}:{ext.kernel}:{ext.strides}:{ext.dilations}:{ext.pads}:{ext.auto_pad}"
    return f"rows:{source}:{ext.axis}"




class _InputRecorder:
    """Calibration accumulator of one consumer's rows (see :class:`RowsRecord`); the
    collector sets ``batches`` to the batch's number before each update."""

    def __init__(self, record: RowsRecord, entry: _Recorded, ext: ChannelGram, kind: str, w32: np.ndarray | None) -> None:
        self.record, self.entry, self.ext, self.kind, self.w32 = record, entry, ext, kind, w32
        self.batches = 0

    def update(self, x: np.ndarray) -> None:
        b, e, cache = self.batches, self.entry, self.record.cache
        r, _ = self.record.input_rows(e, self.ext, self.kind, x, b)
        if not e.inputs:
            cache.put(e.rows, b, r @ self.w32.T)
        elif e.rows not in cache or len(cache.get(e.rows)) == b:  # the first consumer of the tensor this batch
            cache.put(e.rows, b, r)
        e.out_rows.append(_out_rows(self.kind, self.ext, x))


class _StreamRecorder:
    """Calibration accumulator of a residual stream's rows at the sampled output rows."""

    def __init__(self, record: RowsRecord, name: str, axis: int) -> None:
        self.record, self.name, self.axis = record, name, axis
        self.ext = ChannelGram(axis, shards=1, max_rows=REFIT_ROWS)
        self.batches = 0

    def update(self, s: np.ndarray) -> None:
        total = s.size // max(s.shape[self.axis], 1)
        rows = rows_at(s, self.axis, self.ext.positions(total, self.batches)).astype(np.float32, copy=False)
        self.record.cache.put(self.name, self.batches, rows)
        self.record.stream_shape.setdefault(self.name, []).append((total, s.shape[self.axis]))


class RecordedRows:
    """:class:`OriginalRows` from a :class:`RowsRecord`: the same rows, made from what
    calibration recorded instead of a pass of the original (``index``: the shard's batch
    numbers)."""

    def __init__(self, targets: list[RefitTarget], record: RowsRecord, index: range) -> None:
        self.targets, self.record, self.index = targets, record, index
        self.entries = [record.consumers[t.key] for t in targets]
        self.inputs = [e.inputs and t.stores_inputs() for t, e in zip(targets, self.entries)]
        self.streamed = [[t.skip is not None and record.stream_shape[e.stream][b] == (e.out_rows[b], len(t.keep_rows))
                          for b in index] for t, e in zip(targets, self.entries)]
        self.shifts: list | None = None
        if len(index) and index[0] == 0:
            self.shifts = [self._shift(t, e) for t, e in zip(targets, self.entries)]

    def _wx(self, t: RefitTarget, e: _Recorded, b: int) -> np.ndarray:
        rows = self.record.cache.get(e.rows)[b]
        return rows @ t.w32.T if e.inputs else rows[:, t.keep_rows]

    def _shift(self, t: RefitTarget, e: _Recorded) -> tuple[np.ndarray, np.ndarray]:
        """Batch 0's means of ``W x`` and of the kept inputs (see :meth:`RefitTarget.original_rows`)."""
        return self._wx(t, e, 0).mean(axis=0, dtype=np.float64), self.record.first_mean[e.geometry][t.keep_cols]

    def get(self, i: int, k: int) -> tuple[np.ndarray, np.ndarray, bool, bool]:
        """Target ``i``'s rows of batch ``k`` of the shard: (rows, owner, inputs, streamed)."""
        t, e, b = self.targets[i], self.entries[i], self.index[k]
        owner = self.record.cache.get(e.geometry + ":owner")[b]
        if self.inputs[i]:
            return self.record.cache.get(e.rows)[b], owner, True, False
        y = self._wx(t, e, b)
        streamed = self.streamed[i][k]
        if streamed:
            y = y + self.record.cache.get(e.stream)[b][:, t.keep_rows]
        return y, owner, False, streamed

    def close(self) -> None:
        """Nothing: the record belongs to the batch store, which the sweep's points share."""


class RefitShard:
    """One shard of the calibration batches (the unit a worker holds): the original's rows
    of every target (:class:`OriginalRows`), the segment pass over the pruned graph, and
    its part of every wave's sums.

    ``private``: the graphs are this shard's own (copies: several shards in one process, or
    a remote worker), and :meth:`apply` writes the driver's solutions into them; otherwise
    they are the driver's, which the driver writes itself.  ``targets`` are nodes of
    ``pruned``; the driver addresses them by their number in that list."""

    def __init__(self, targets: list[RefitTarget], original: ir.Model, pruned: ir.Model, batches: Sequence[Sample],
                 index: range, first_samples: Sequence[int], *, providers: list[str], budget: int,
                 private: bool, block: int = REFIT_BLOCK) -> None:
        self.targets = [t.for_shard(t.node, None) for t in targets]
        self.pruned, self.private = pruned, private
        self.index, self.first_samples, self.block = index, list(first_samples), block
        subset = _Subset(batches, index)
        record = getattr(batches, "rows", None)  # calibration recorded the original's side (segments.BatchStore)
        if record is not None and record.covers(self.targets):
            self.rows: OriginalRows | RecordedRows = RecordedRows(self.targets, record, index)
        else:
            self.rows = OriginalRows(self.targets, original, subset, index, providers=providers, budget=budget // 2)
        self.pp = SegmentPass(pruned, subset, providers=providers, budget=budget // 2, label="pruned graph")

    def close(self) -> None:
        self.rows.close()
        self.pp.close()

    def shifts(self) -> list | None:
        """Every target's shift (batch 0's means) when this shard holds batch 0, else None."""
        return self.rows.shifts

    def _names(self, numbers: list[int]) -> list[str]:
        """The tensors the targets read in this shard's pruned graph (read now: a refit may
        have appended a bias Add), and under their original names."""
        ts = [self.targets[i] for i in numbers]
        return [t.node.inputs[0].name for t in ts] + [t.source for t in ts] + [t.skip for t in ts if t.skip]

    def sums(self, wave: list[int], later: list[int], shifts: list) -> list[ShardSums]:
        """Run the pruned graph up to the wave's inputs, batch by batch, and return this
        shard's sums of each wave target, around the shifts given."""
        local = [self.targets[i].for_shard(self.targets[i].node, shift) for i, shift in zip(wave, shifts)]
        exts = [t.extractor() for t in local]
        need = list(dict.fromkeys(n for t in local for n in (t.node.inputs[0].name, t.skip) if n))
        k = -1
        # The pruned graph's next batch runs while this one is folded into the sums.
        with Ahead(self.pp.stream(need, self._names(later)), name="onnxprune-refit") as stream:
            for got in stream:  # not enumerate(): its tuple would hold the batch
                k += 1
                b = self.index[k]
                for i, t, ext in zip(wave, local, exts):
                    rows, owner, inputs, streamed = self.rows.get(i, k)
                    t.add(ext, rows, owner, got[t.node.inputs[0].name], b, got[t.skip] if streamed else None,
                          first_sample=self.first_samples[k], inputs=inputs)
                    if k + 1 == len(self.index) or (b + 1) % self.block == 0:
                        t.flush()
                got = None
        return [ShardSums(t.sums, t.rows_seen, shift, all(self.rows.streamed[i]) or self.targets[i].skip is None)
                for i, t, shift in zip(wave, local, shifts)]

    def apply(self, writes: list[tuple[int, np.ndarray, np.ndarray]]) -> None:
        """Write the driver's solutions (target number, W', b') into this shard's graph."""
        if self.private:
            for i, w, b in writes:
                _write(self.targets[i], w, b, self.pruned.graph)


def target_positions(targets: list[RefitTarget], pruned: ir.Model) -> list[int]:
    """Each target's node as its place in ``pruned``'s node order (the same in a copy)."""
    order = {id(n): k for k, n in enumerate(pruned.graph)}
    return [order[id(t.node)] for t in targets]


def on_copies(targets: list[RefitTarget], positions: list[int], original: ir.Model | bytes,
              pruned: ir.Model | bytes) -> tuple[list[RefitTarget], ir.Model, ir.Model]:
    """Private copies of both graphs (from models or serialised ModelProtos) and the
    targets on the copy's nodes."""
    def copy(m):
        return ir.from_proto(onnx.ModelProto.FromString(m)) if isinstance(m, bytes) else copy_model(m)

    original, pruned = copy(original), copy(pruned)
    nodes = list(pruned.graph)
    return [replace(t, node=nodes[p]) for t, p in zip(targets, positions)], original, pruned


class LocalShards:
    """The shards of one process: called one after the other."""

    def __init__(self, targets: list[RefitTarget], original: ir.Model, pruned: ir.Model, batches: Sequence[Sample],
                 ranges: list[range], starts: Sequence[int], *, providers: list[str], budget: int, block: int) -> None:
        self.shards: list[RefitShard] = []
        positions = target_positions(targets, pruned)
        for r in ranges:
            private = len(ranges) > 1
            ts, o, p = on_copies(targets, positions, original, pruned) if private else (targets, original, pruned)
            self.shards.append(RefitShard(ts, o, p, batches, r, [int(starts[b]) for b in r], providers=providers,
                                          budget=budget // len(ranges), private=private, block=block))

    def shifts(self) -> list:
        return [s.shifts() for s in self.shards]

    def sums(self, wave: list[int], later: list[int], shifts: list) -> list[list[ShardSums]]:
        return [s.sums(wave, later, shifts) for s in self.shards]

    def apply(self, writes: list) -> None:
        for s in self.shards:
            s.apply(writes)

    def close(self) -> None:
        for s in self.shards:
            s.close()


def _merged(target: RefitTarget, parts: list[ShardSums]) -> None:
    """Sum the shards' sums into ``target`` (float64: their order changes nothing beyond 1e-12)."""
    filled = [p for p in parts if p.sums]
    target.sums = [{k: sum(p.sums[f][k] for p in filled) for k in filled[0].sums[f]}
                   for f in range(len(filled[0].sums))] if filled else []
    target.rows_seen = sum(p.rows for p in parts)
    if filled:
        target.shift_y, target.shift_p = filled[0].shift
    if not all(p.stream for p in filled):
        target.skip = None


def _batch_sizes(batches: Sequence[Sample]) -> list[int]:
    sizes = getattr(batches, "sizes", None)
    return list(sizes) if sizes is not None else [samples_in(b) for b in batches]


def refit_on_pruned(
    targets: list[RefitTarget],
    original: ir.Model,
    pruned: ir.Model,
    batches: Sequence[Sample],
    *,
    providers: list[str],
    memory_budget: int,
    modes: tuple[str, ...] = ("lstsq", "bias"),
    progress: Callable[[int, int], None] | None = None,
    shards: int = 1,
    block: int = REFIT_BLOCK,
    ray: str | None = None,
) -> tuple[int, int]:
    """Refit ``targets`` in ``pruned`` (in place), front to back; returns how many got the
    least-squares refit and how many the bias fit (see :meth:`RefitTarget.solve`).

    Targets are refitted in waves: a wave holds the consumers whose inputs depend on no
    consumer still to be refitted, so each fit sees its final upstream.  (Refitting all at
    once lets a deep layer learn to undo an upstream error that its own refit then removes:
    benchmarks/RESULTS.md, "Design measurements".)  One pass of the original over the
    batches records every target's rows (:class:`OriginalRows`); the pruned graph runs
    segment by segment on cached tensors (:class:`segments.SegmentPass`), each wave's
    inputs folded into its sums batch by batch: every batch goes through every node of
    each graph once, whatever the number of waves; the pruned graph's next segment is
    built after the wave before it was written.  ``shards``: the batches
    split in that many :class:`RefitShard` (runs of ``block`` batches), whose sums add up to
    the same solutions; with ``ray`` (``"local"`` or a cluster address) each shard is a Ray
    actor (:mod:`onnxprune.distributed`).  ``progress(done, total)`` is told after each wave.
    """
    if not targets or not len(batches):
        return 0, 0
    _check_names(targets, original, pruned)
    waves = _waves(pruned.graph, targets)
    number = {id(t): i for i, t in enumerate(targets)}
    numbered = [[number[id(t)] for t in w] for w in waves]
    sizes = _batch_sizes(batches)
    starts = np.cumsum([0] + sizes)
    # A shard is a run of whole blocks: fewer blocks than shards leave some empty, and they go.
    ranges = [r for r in shard_ranges(len(batches), shards, block) if len(r)]
    remote = getattr(batches, "refit", None)  # a distributed.RayPool: its workers hold the batches
    if remote is not None:
        pool = remote(targets, original, pruned, providers=providers, budget=memory_budget, block=block)
    elif ray is not None:
        from .distributed import ray_shards  # Ray is an extra: imported only when asked for

        pool = ray_shards(ray, targets, original, pruned, batches, ranges, starts, providers=providers,
                          budget=memory_budget, block=block)
    else:
        pool = LocalShards(targets, original, pruned, batches, ranges, starts, providers=providers,
                           budget=memory_budget, block=block)
    try:
        shifts = next(s for s in pool.shifts() if s is not None)
        for k, wave in enumerate(numbered):
            later = [i for w in numbered[k + 1:] for i in w]
            parts = pool.sums(wave, later, [shifts[i] for i in wave])
            writes = []
            for j, i in enumerate(wave):
                t = targets[i]
                _merged(t, [p[j] for p in parts])
                if t.rows_seen:
                    w_new, b_new = t.solve(modes, getattr(pool, "fold_errors", None))
                    _write(t, w_new, b_new, pruned.graph)
                    writes.append((i, w_new, b_new))
                t.sums = []
            pool.apply(writes)
            if progress is not None:
                progress(k + 1, len(waves))
    finally:
        pool.close()
    return sum(1 for t in targets if t.mode == "lstsq"), sum(1 for t in targets if t.mode == "bias")


def _check_names(targets: list[RefitTarget], original: ir.Model, pruned: ir.Model) -> None:
    orig_values = {v.name: v for v in _all_values(original.graph)}
    missing = [t.source for t in targets if t.source not in orig_values]
    if missing:
        raise InputError(f"lstsq: tensor {missing[0]!r} of the original graph not found")
    pruned_names = {v.name for v in _all_values(pruned.graph)}
    for t in targets:
        if t.skip not in orig_values or t.skip not in pruned_names:
            t.skip = None


def _waves(graph: ir.Graph, targets: list[RefitTarget]) -> list[list[RefitTarget]]:
    """Targets by the number of targets upstream of them or of the stream they add to
    (graph order is topological)."""
    by_node = {id(t.node): t for t in targets}
    level: dict[int, int] = {}
    known: dict[str, int] = {}
    waves: dict[int, list[RefitTarget]] = {}
    for node in graph:
        lv = max((level.get(id(v), 0) for v in node.inputs if v is not None), default=0)
        t = by_node.get(id(node))
        if t is not None:
            if t.skip is not None and t.skip in known:
                lv = max(lv, known[t.skip])
            elif t.skip is not None:
                t.skip = None  # computed after the consumer in graph order: not worth a second sweep
            waves.setdefault(lv, []).append(t)
            lv += 1
        for out in node.outputs:
            level[id(out)] = known[out.name] = lv
    for v in graph.inputs:
        known.setdefault(v.name, 0)
    return [waves[k] for k in sorted(waves)]


def _all_values(graph: ir.Graph):
    yield from graph.inputs
    for node in graph:
        yield from node.outputs


def _write(t: RefitTarget, w_new: np.ndarray, b_new: np.ndarray, graph: ir.Graph) -> None:
    """Write ``W'``, ``b'`` into the pruned consumer, in its weight layout (a MatMul's bias
    goes into the ``Add`` the first refit or the bias compensation appended)."""
    shape = const_array(t.node.inputs[1]).shape
    write_consumer(t.node, rows_to_weight(t.node, w_new, shape), b_new, graph, fresh_add=False)
