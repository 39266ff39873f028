"""Second-order statistics: the channel Gram matrix ``H = Σ x xᵀ`` of a consumer's input,
over sampled positions, kept in shards so methods can form repeated estimates (MIPP's
confidence) and compensation can fit least squares.

For a Conv consumer with a k×k kernel, :class:`PatchGram` gathers the Gram matrix of its
im2col patches (C·k·k columns), which makes the least-squares refit exact for any kernel.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from ._graph import attr_int, attr_ints
from .data import pins_more


def solve_spd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a⁻¹ b`` for a symmetric positive definite ``a`` (overwritten): Cholesky factor and
    solve.  The same LAPACK calls, bit for bit, as ``scipy.linalg.solve(assume_a="pos")``,
    without the condition estimate that function adds (about half its time here)."""
    import scipy.linalg  # here, not at import: the CLI starts faster

    return scipy.linalg.cho_solve(_cho_factor(a), b, check_finite=False)


def _cho_factor(a: np.ndarray):
    """scipy's ``cho_factor`` of the symmetric ``a`` (overwritten), handed over as ``aᵀ``:
    the same matrix, but in the Fortran order LAPACK works in, so no copy is made first.
    Its upper triangle is ``a``'s lower one, the triangle the C-ordered call factors."""
    import scipy.linalg

    return scipy.linalg.cho_factor(a.T, lower=False, overwrite_a=True, check_finite=False)


def solve_spd_fast(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a⁻¹ b`` in float32 (twice float64's speed; the result in float64), for estimates
    that only compare fits: float64 where float32's Cholesky finds ``a`` not positive
    definite."""
    import scipy.linalg

    try:
        factor = _cho_factor(a.astype(np.float32))
    except np.linalg.LinAlgError:
        return solve_spd(a, b)
    return scipy.linalg.cho_solve(factor, b.astype(np.float32), check_finite=False).astype(np.float64)


def _rows(x: np.ndarray, axis: int) -> np.ndarray:
    """The tensor as rows of channels: [positions, C]."""
    c = x.shape[axis]
    return np.moveaxis(x, axis, -1).reshape(-1, c)


def rows_at(x: np.ndarray, axis: int, pick: np.ndarray) -> np.ndarray:
    """``_rows(x, axis)[pick]`` without the copy of the whole tensor that moving a leading
    channel axis last makes (``pick`` sorted, as :meth:`ChannelGram.positions` gives)."""
    c = x.shape[axis]
    total = x.size // max(c, 1)
    if len(pick) == total:
        return _rows(x, axis)
    if axis == 1 and x.ndim >= 3:
        b, pos = np.divmod(pick, total // x.shape[0])
        return x.reshape(x.shape[0], c, -1)[b, :, pos]
    return _rows(x, axis)[pick]


@dataclass
class ChannelGram:
    """Σ x xᵀ, Σ x and the row count per shard, over at most ``max_rows`` sampled rows per batch.

    Batches go to shards round-robin, so shard k sees batches k, k+S, k+2S, ...
    """

    axis: int
    shards: int = 5
    max_rows: int = 4096
    seed: int = 0
    gram: np.ndarray | None = None  # [S, C, C]
    sum: np.ndarray | None = None  # [S, C]
    n: np.ndarray = field(default_factory=lambda: np.zeros(0))
    batches: int = 0
    # With one shard: rows gathered over batches before one C×C product.  A batch of a few
    # rows (a Gemm's samples) would otherwise pay a whole C×C accumulation for a rank-few
    # update: on a 3136-wide input that was most of a small model's calibration.
    buffer: int = 0
    _pending: list = field(default_factory=list, repr=False)
    _pending_rows: int = 0
    # The rows' products are taken in float32 (twice float64's speed) per batch and summed in
    # float64: a batch's rows are few enough (max_rows) for float32's own sum to stay near 1e-6
    # relative.  A reader that weighs differences that small sets float64 (mipp.SampledGram).
    products: ClassVar[type] = np.float32

    def _init(self, c: int) -> None:
        self.gram = np.zeros((self.shards, c, c))
        self.sum = np.zeros((self.shards, c))
        self.n = np.zeros(self.shards)

    def add_rows(self, rows: np.ndarray) -> None:
        """Fold rows [P, C] in (already sampled)."""
        if self.buffer and self.shards == 1:
            self.batches += 1
            if not self._pending and rows.shape[0] >= self.buffer:  # a whole product's rows: used at once
                self._accumulate(np.ascontiguousarray(rows, dtype=self.products), 0)
                return
            # Kept for later products: a copy, unless the gathered rows are an array of their
            # own (readers never write them), not a view pinning the tensor they come from.
            keep = np.array if pins_more(rows) else np.ascontiguousarray
            self._pending.append(keep(rows, dtype=self.products))
            self._pending_rows += rows.shape[0]
            if self._pending_rows >= self.buffer:
                self.flush()
            return
        self._accumulate(rows, self.batches % self.shards)
        self.batches += 1

    def flush(self) -> None:
        """Fold the buffered rows in (readers call it; nothing to do without a buffer)."""
        if self._pending:
            rows = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
            self._pending, self._pending_rows = [], 0
            self._accumulate(rows, 0)

    @property
    def empty(self) -> bool:
        """Whether no row was folded in."""
        self.flush()
        return self.gram is None

    def _accumulate(self, rows: np.ndarray, k: int) -> None:
        if self.gram is None:
            self._init(rows.shape[1])
        r = rows.astype(self.products, copy=False)
        self.gram[k] += r.T @ r
        self.sum[k] += r.sum(axis=0, dtype=np.float64)
        self.n[k] += r.shape[0]

    def positions(self, total: int, batch: int) -> np.ndarray:
        """The row indices (of ``total``) sampled for batch number ``batch``: the same for
        every tensor with as many rows, so rows of an output line up with its input's."""
        if total <= self.max_rows:
            return np.arange(total)
        rng = np.random.default_rng(self.seed + batch)
        return np.sort(rng.choice(total, self.max_rows, replace=False))

    def sampled_rows(self, x: np.ndarray, batch: int, samples: bool = False):
        """Rows [P, C] of ``x`` at the positions sampled for batch number ``batch``; with
        ``samples``, also the index (along axis 0) of the sample each row comes from."""
        pick = self.positions(x.size // max(x.shape[self.axis], 1), batch)
        rows = rows_at(x, self.axis, pick)
        if not samples:
            return rows
        # Rows are positions in C order over the other axes: axis 0 leads unless it is the channel axis.
        per = max((x.size // x.shape[self.axis]) // max(x.shape[0], 1), 1)
        owner = pick // per if self.axis != 0 else np.zeros(len(pick), dtype=np.int64)
        return rows, owner

    def update(self, x: np.ndarray) -> None:
        self.add_rows(self.sampled_rows(x, self.batches))

    def merge(self, other: "ChannelGram") -> "ChannelGram":
        self.flush()
        other.flush()
        out = copy.copy(self)  # of the same kind: a PatchGram keeps its kernel geometry
        out._pending, out._pending_rows = [], 0
        if self.gram is None or other.gram is None:
            src = self if other.gram is None else other
            out.gram, out.sum, out.n, out.batches = src.gram, src.sum, src.n, src.batches
            return out
        out.gram, out.sum, out.n = self.gram + other.gram, self.sum + other.sum, self.n + other.n
        out.batches = self.batches + other.batches
        return out

    # -- estimates -------------------------------------------------------------------
    def total(self) -> tuple[np.ndarray, np.ndarray, float]:
        """(Σ x xᵀ, Σ x, n) over all shards (a view of the only shard's arrays when there is one)."""
        self.flush()
        if self.gram.shape[0] == 1:
            return self.gram[0], self.sum[0], float(self.n[0])
        return self.gram.sum(axis=0), self.sum.sum(axis=0), float(self.n.sum())

    def covariance(self, shard: int | None = None) -> np.ndarray:
        """Centred covariance, of one shard or of all."""
        self.flush()
        if shard is None:
            g, s, n = self.total()
        else:
            g, s, n = self.gram[shard], self.sum[shard], float(self.n[shard])
        n = max(n, 1.0)
        mean = s / n
        cov = g / n
        for i in range(0, len(mean), 256):  # no C×C temporary: the Gram of a wide input is large
            cov[i : i + 256] -= np.outer(mean[i : i + 256], mean)
        return cov

    def mean(self) -> np.ndarray:
        _, s, n = self.total()
        return s / max(n, 1.0)


class PatchGram(ChannelGram):
    """Gram matrix of a Conv's im2col patches (columns ordered channel-major: c·kh·kw + tap).

    Only sampled output positions are used; zero padding is applied as the Conv does, so
    the statistics describe exactly what the kernel sees.
    """

    def __init__(self, node, shards: int = 5, max_rows: int = 2048, seed: int = 0, buffer: int = 0) -> None:
        super().__init__(axis=1, shards=shards, max_rows=max_rows, seed=seed, buffer=buffer)
        kernel = attr_ints(node, "kernel_shape")
        if kernel is None:
            w = node.inputs[1].shape
            kernel = [int(d) for d in list(w)[2:]]
        self.kernel = kernel
        self.strides = attr_ints(node, "strides") or [1] * len(kernel)
        self.dilations = attr_ints(node, "dilations") or [1] * len(kernel)
        pads = attr_ints(node, "pads") or [0] * (2 * len(kernel))
        auto = node.attributes.get("auto_pad")
        self.auto_pad = str(auto.value) if auto is not None else "NOTSET"
        self.pads = pads
        self.group = attr_int(node, "group", 1)

    def _padding(self, spatial: tuple[int, ...]) -> list[tuple[int, int]]:
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out = []
            for size, k, s, d in zip(spatial, self.kernel, self.strides, self.dilations):
                total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
                lo = total // 2 if self.auto_pad == "SAME_UPPER" else total - total // 2
                out.append((lo, total - lo))
            return out
        if self.auto_pad == "VALID":
            return [(0, 0)] * len(spatial)
        n = len(spatial)
        return [(self.pads[i], self.pads[i + n]) for i in range(n)]

    def out_size(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """The Conv's output height and width for an input of ``shape`` [N, C, H, W]."""
        pad = self._padding(tuple(shape[2:]))
        return tuple(  # type: ignore[return-value]
            (size + lo + hi - (k - 1) * d - 1) // s + 1
            for size, (lo, hi), k, s, d in zip(shape[2:], pad, self.kernel, self.strides, self.dilations)
        )

    def patch_rows(self, x: np.ndarray, batch: int, samples: bool = False):
        """im2col rows [P, C·kh·kw] of ``x`` at the output positions sampled for batch
        number ``batch`` (the same positions for every tensor of that batch shape); with
        ``samples``, also the sample each row comes from.  The rows last gathered are kept
        for the next caller with the same tensor and sampling: a consumer's Gram and the
        refit's record read the same rows of one calibration output, and gather them once
        (callers copy, never write them)."""
        key = (self.max_rows, self.seed, batch, tuple(self.kernel), tuple(self.strides), tuple(self.dilations),
               tuple(self.pads), self.auto_pad)
        last = PatchGram._last
        if last is not None and last[0]() is x and last[1] == key:
            got = last[2]
        else:
            got = self._patch_rows(x, batch)
            # Not rows that are a view of x: kept, they would pin onnxruntime's output.
            PatchGram._last = None if np.may_share_memory(got[0], x) else (weakref.ref(x), key, got)
        return got if samples else got[0]

    _last: ClassVar[tuple | None] = None  # (weak reference to the tensor, sampling, (rows, samples))

    @staticmethod
    def forget() -> None:
        """Drop the rows last gathered (a 3×3 Conv's on a wide input are tens of MB)."""
        PatchGram._last = None

    def _patch_rows(self, x: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
        if x.ndim != 4:
            raise ValueError("PatchGram supports 2-D convolutions")
        pad = self._padding(x.shape[2:])
        if list(self.kernel) == [1, 1] and list(self.strides) == [1, 1] and not any(lo or hi for lo, hi in pad):
            # A pointwise Conv's patches are the input's channel rows: one gather, no tap stack.
            pick = self.positions(x.size // max(x.shape[1], 1), batch)
            return rows_at(x, 1, pick), pick // (x.shape[2] * x.shape[3])
        xp = np.pad(x, [(0, 0), (0, 0), *pad]) if any(lo or hi for lo, hi in pad) else x  # pad copies the batch
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.strides, self.dilations
        oh, ow = self.out_size(x.shape)
        pick = self.positions(x.shape[0] * oh * ow, batch)
        b, rem = np.divmod(pick, oh * ow)
        i, j = np.divmod(rem, ow)
        taps = [(a * dh, c * dw) for a in range(kh) for c in range(kw)]
        # patches[p, c, t] = xp[b, c, i*sh + ti, j*sw + tj]
        cols = np.stack([xp[b, :, i * sh + ti, j * sw + tj] for ti, tj in taps], axis=2)
        return cols.reshape(len(pick), -1), b

    def update(self, x: np.ndarray) -> None:
        self.add_rows(self.patch_rows(x, self.batches))
