"""Calibrate stage: stream data through onnxruntime with chosen intermediate tensors
exposed as extra outputs, and reduce every batch to per-channel statistics at once.

Statistics are float64 sums (see METHODS.md): n, Σx, Σx² and, when the method reads them,
Σ|x| and count(x ≤ 0), per index of each tensor's channel axis.  Nothing else of a batch
is kept, so peak memory does not grow with the number of samples.

Channels-first float32 tensors (Conv activations) are reduced inside the graph: each
statistic's transform (x, x·x, |x|) feeds a GlobalAveragePool, so onnxruntime hands back
[N, C] means instead of the activation.  GlobalAveragePool and Mul run in onnxruntime's
blocked NCHWc layout, so the tensor is neither converted back nor copied out; this is what
keeps calibration near the cost of plain inference.  A tensor an accumulator also needs
whole (a Gram, the refit's record) is fetched besides, and the graph still sums it, along
its last axis (see ``_ROW_SUMS``): onnxruntime reduces on every core inside the run, numpy
between runs on one.  Other tensors (channels last, rank 3 and fetched) are fetched and
reduced in numpy; when they would exceed
the memory budget, they are fetched in several runs per batch (onnxruntime computes only
what a run's fetches need), each run within the budget.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator, Protocol

import numpy as np
import onnx_ir as ir

from . import _ort
from ._ahead import Ahead
from .data import Sample, samples_in, take_samples
from .padding import sorted_batches
from .errors import InputError
from .temporary import temporary_changes


STATISTICS = ("sum", "sumsq", "sumabs", "nonpos")  # what TensorStats can gather
ALWAYS = ("sum", "sumsq")  # gathered whatever is asked: means, variances, dead channels
_BLOCK = 1 << 16  # elements per float32 temporary of TensorStats.update (256 KiB)


class NotGathered(RuntimeError):
    """A statistic the calibrate stage was not asked to gather was read."""


def _statistics(names: Iterable[str]) -> tuple[str, ...]:
    """``names`` checked, with the ones always gathered, in STATISTICS order."""
    names = set(names)
    unknown = names - set(STATISTICS)
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; choose from {', '.join(STATISTICS)}")
    return tuple(s for s in STATISTICS if s in names or s in ALWAYS)


# The float32 transform of a block before it is summed, per statistic (``out`` is scratch).
_TRANSFORMS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "sum": lambda b, out: b,
    "sumsq": lambda b, out: np.multiply(b, b, out=out),
    "sumabs": lambda b, out: np.abs(b, out=out),
    "nonpos": lambda b, out: np.less_equal(b, 0, out=out),  # 0/1 as float32: exact counts
}


@dataclass
class TensorStats:
    """Additive per-index statistics of one tensor along its channel axis: n, Σx, Σx² and,
    when asked for, Σ|x| and count(x ≤ 0), all float64.  Reading one that was not gathered
    raises :class:`NotGathered`."""

    n: int
    sum: np.ndarray
    sumsq: np.ndarray
    _sumabs: np.ndarray | None = None
    _nonpos: np.ndarray | None = None

    @classmethod
    def empty(cls, size: int, statistics: Iterable[str] = STATISTICS) -> "TensorStats":
        names = _statistics(statistics)
        z = lambda name: np.zeros(size, dtype=np.float64) if name in names else None  # noqa: E731
        return cls(0, z("sum"), z("sumsq"), z("sumabs"), z("nonpos"))

    def _acc(self, name: str) -> np.ndarray | None:
        """The float64 accumulator of ``name``, None when it is not gathered."""
        return getattr(self, name if name in ALWAYS else "_" + name)

    @property
    def statistics(self) -> tuple[str, ...]:
        """The statistics gathered (STATISTICS order)."""
        return tuple(s for s in STATISTICS if self._acc(s) is not None)

    def _gathered(self, name: str) -> np.ndarray:
        arr = self._acc(name)
        if arr is None:
            raise NotGathered(
                f"TensorStats.{name} was not gathered (this calibration gathered {', '.join(self.statistics)}); "
                f"pass statistics=... including '{name}' to calibrate()"
            )
        return arr

    @property
    def sumabs(self) -> np.ndarray:
        return self._gathered("sumabs")

    @sumabs.setter
    def sumabs(self, value: np.ndarray | None) -> None:
        self._sumabs = value

    @property
    def nonpos(self) -> np.ndarray:
        return self._gathered("nonpos")

    @nonpos.setter
    def nonpos(self, value: np.ndarray | None) -> None:
        self._nonpos = value

    def update(self, x: np.ndarray, axis: int) -> None:
        """Fold one batch in: reduce over every axis but ``axis``.

        The tensor is viewed as [lead, C, rest] (a view for onnxruntime's C-contiguous
        outputs) and reduced in blocks of at most ``_BLOCK`` elements: whole samples when
        they are small, else channel rows or pieces of one row.  Each block is cast to
        float32, transformed into one scratch buffer (x², |x|, x ≤ 0) and summed along its
        contiguous rows in float32 with numpy's pairwise summation (a few 1e-7 relative;
        a BLAS product with a ones vector is faster but less exact on long rows:
        benchmarks/RESULTS.md, "Design measurements"), and the per-row sums are added in
        float64.  When rest
        is 1 ([N, C] inputs, channels last) the block is summed over its rows directly in
        float64.  No temporary grows with the batch.
        """
        c = x.shape[axis]
        lead, k = math.prod(x.shape[:axis]), math.prod(x.shape[axis + 1 :])
        self.n += lead * k
        if x.size == 0:
            return
        rows = x.reshape(lead, c, k)
        todo = [(_TRANSFORMS[name], self._acc(name)) for name in self.statistics]
        scratch = np.empty(min(_BLOCK, x.size), dtype=np.float32)
        if k == 1:  # rows are samples: blocks of whole rows, summed over them in float64
            flat = rows.reshape(lead, c)
            step = max(1, _BLOCK // c)
            for i in range(0, lead, step):
                blk = flat[i : i + step].astype(np.float32, copy=False)
                out = scratch[: blk.size].reshape(blk.shape) if blk.size <= scratch.size else None
                for f, acc in todo:
                    acc += f(blk, out).sum(axis=0, dtype=np.float64)
            return
        per_sample = max(1, _BLOCK // (c * k))  # samples per block
        per_row = _BLOCK if k > _BLOCK else k  # elements of a row per block
        chans = c if per_sample > 1 else max(1, _BLOCK // per_row)  # channels per block
        for i in range(0, lead, per_sample):
            for j in range(0, c, chans):
                for l in range(0, k, per_row):
                    blk = rows[i : i + per_sample, j : j + chans, l : l + per_row]
                    b, cb, kb = blk.shape
                    blk = blk.reshape(b * cb, kb).astype(np.float32, copy=False)  # a view unless cast
                    out = scratch[: blk.size].reshape(blk.shape)
                    for f, acc in todo:
                        acc[j : j + cb] += f(blk, out).sum(axis=1).reshape(b, cb).sum(axis=0, dtype=np.float64)

    def update_reduced(self, parts: dict[str, np.ndarray], k: int, means: bool) -> None:
        """Fold in one batch that onnxruntime reduced (see :func:`instrumented_model_path`):
        ``parts[name]`` holds, per sample and channel, the statistic's transform over the
        ``k`` elements behind the channel, as their mean (``means``: [N, C, 1, ...]) or as
        sums of rows along the last axis ([N, C, ..., 1]); added here in float64."""
        for name in self.statistics:
            m = parts[name]
            total = m.reshape(m.shape[0], m.shape[1], -1).sum(axis=(0, 2), dtype=np.float64)
            self._acc(name)[...] += total * k if means else total
            lead = m.shape[0]
        self.n += lead * k

    def merge(self, other: "TensorStats") -> "TensorStats":
        """Statistics of both shards together (an optional one only when both gathered it)."""
        both = lambda a, b: a + b if a is not None and b is not None else None  # noqa: E731
        return TensorStats(
            self.n + other.n, self.sum + other.sum, self.sumsq + other.sumsq,
            both(self._sumabs, other._sumabs), both(self._nonpos, other._nonpos),
        )

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.n, 1)

    @property
    def var(self) -> np.ndarray:
        return np.maximum(self.sumsq / max(self.n, 1) - self.mean**2, 0.0)

    @property
    def l2(self) -> np.ndarray:
        return np.sqrt(self.sumsq)

    @property
    def mean_abs(self) -> np.ndarray:
        return self.sumabs / max(self.n, 1)

    @property
    def dead(self) -> np.ndarray:
        """Indices that were exactly zero on every sample."""
        return self.sumsq == 0


class Accumulator(Protocol):
    """A method's own additive statistic of one tensor (a Gram matrix, a mean map ...)."""

    def update(self, x: np.ndarray) -> None: ...

    def merge(self, other: Any) -> Any: ...


@dataclass(frozen=True)
class InputRef:
    """One consumer's input, the same in every pass and process: the name of the consumer's
    first output (tensor names are unique in a graph; node names need not be) and the
    input it reads.  Unlike a position in a list of consumers, it survives any reordering."""

    consumer: str
    index: int = 0

    @classmethod
    def of(cls, view: Any) -> "InputRef":
        """The input a :class:`~onnxprune.consumers.ConsumerView` reads (input 0)."""
        return cls(view.node.outputs[0].name, 0)


@dataclass(frozen=True)
class GramKey:
    """The least-squares Gram statistics of one consumer input (compensate, allocate, obs)."""

    view: InputRef


@dataclass(frozen=True)
class MethodKey:
    """A method's own statistic, of one consumer input (``view``) or of one tensor (``tensor``)."""

    method: str
    view: InputRef | None = None
    tensor: str | None = None


@dataclass
class StatRequest:
    """Ask the calibrate stage for ``factory()`` fed with every batch of ``value``, kept in
    ``Statistics.extra`` under ``key`` (a :class:`GramKey`, a :class:`MethodKey`, or any
    hashable a caller of :func:`calibrate` chooses)."""

    key: Hashable
    value: ir.Value
    factory: Callable[[], Accumulator]


@dataclass
class Statistics:
    """Statistics of every exposed tensor (by name) and of every extra request (by key),
    plus what it cost to gather them."""

    tensors: dict[str, TensorStats] = field(default_factory=dict)
    samples: int = 0
    seconds: float = 0.0
    runs_per_batch: int = 1
    extra: dict[Hashable, Any] = field(default_factory=dict)  # StatRequest.key -> its accumulator
    kept: list[Sample] = field(default_factory=list)  # the first samples calibrated on (``calibrate(keep=)``)
    # What a method derives from these statistics during the run that gathered them (relief's
    # scores, mipp's report of its selection), shared by its hooks: it lives and dies with
    # the run, where a method object is one for the whole process.  A merge starts it empty.
    derived: dict[Hashable, Any] = field(default_factory=dict, repr=False)

    def merge(self, other: "Statistics") -> "Statistics":
        def join(x: dict, y: dict) -> dict:
            out = {}
            for k in [*x, *(k for k in y if k not in x)]:  # x's order: readers may rely on it
                a, b = x.get(k), y.get(k)
                out[k] = a.merge(b) if a is not None and b is not None else (a if a is not None else b)
            return out

        return Statistics(
            join(self.tensors, other.tensors), self.samples + other.samples,
            self.seconds + other.seconds, max(self.runs_per_batch, other.runs_per_batch),
            join(self.extra, other.extra), self.kept or other.kept,
        )


def providers_for(device: str) -> list[str]:
    """Execution providers for ``--device auto|cpu|cuda``; warns once when falling back."""
    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"--device must be auto, cpu or cuda, got '{device}'")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    available = _ort.ort().get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        print("warning: CUDA requested but onnxruntime has no CUDA provider (install onnxprune[gpu]); using the CPU", file=sys.stderr)
    return ["CPUExecutionProvider"]


def _bytes_per_sample(value: ir.Value) -> int:
    """Bytes of one sample of ``value`` from its inferred shape; an unknown dim counts as 1,
    so this is only a lower bound unless :func:`_shape_known`."""
    dims = [d if isinstance(d, int) else 1 for d in (value.shape or [])]
    itemsize = 4
    if value.dtype is not None:
        try:
            itemsize = value.dtype.itemsize
        except Exception:  # noqa: BLE001 - exotic dtypes: assume 4 bytes
            itemsize = 4
    return int(math.prod(dims[1:]) if dims else 1) * itemsize


def _shape_known(value: ir.Value) -> bool:
    """Whether the inferred shape gives every dim but the first (the batch)."""
    return value.shape is not None and all(isinstance(d, int) for d in list(value.shape)[1:])


def _plan_runs(
    fetched: list[tuple[str, int, bool]], batch_size: int, budget: int, measured: dict[str, int] | None = None
) -> list[list[str]]:
    """Split the tensors to fetch (name, inferred bytes per sample, exact?) into runs whose
    outputs fit ``budget`` bytes per batch.

    ``measured``: bytes per sample by tensor name, measured on data; used instead of the
    inferred shape for the tensors it names.
    """
    measured = measured or {}
    runs: list[list[str]] = [[]]
    used = 0
    for name, inferred, _ in fetched:
        cost = measured.get(name, inferred) * batch_size
        if runs[-1] and used + cost > budget:
            runs.append([])
            used = 0
        runs[-1].append(name)
        used += cost
    return runs


def _run(sess: Any, names: list[str], feed: Sample) -> list[np.ndarray]:
    try:
        return sess.run(names, feed)
    except Exception as exc:
        raise InputError(f"onnxruntime failed on the calibration data: {' '.join(str(exc).split())[:300]}") from exc


def _measure_bytes_per_sample(sess: Any, names: list[str], batch: Sample, fixed_batch: bool) -> dict[str, int]:
    """Bytes per sample of each tensor named, measured by fetching them all for the first
    sample of ``batch`` (for the whole batch when the model's batch size is fixed)."""
    probe = batch if fixed_batch else take_samples(batch, slice(None, 1))
    n = max(samples_in(probe), 1)
    outs = _run(sess, names, probe)
    return {name: -(-x.nbytes // n) for name, x in zip(names, outs)}


# Statistics onnxruntime can reduce in the graph: the op applied before GlobalAveragePool.
_IN_GRAPH = {"sum": None, "sumsq": "Mul", "sumabs": "Abs"}
# A tensor also fetched whole (for an accumulator) is reduced along its last axis only, by
# one reduction per statistic (no temporary of its size: a Mul's for x·x raised the peak by
# the largest such tensor), and its rows are added in numpy: a float32 sum of one row stays
# exact where a whole plane's drifts (1e-4 over 300×300).  The opset from which the
# reduction takes its axes as an input.
_ROW_SUMS = {"sum": ("ReduceSum", 13), "sumsq": ("ReduceSumSquare", 18), "sumabs": ("ReduceL1", 18)}


def _reducible(value: ir.Value, axis: int, statistics: Iterable[str]) -> bool:
    """Whether onnxruntime can reduce ``value`` itself: float32 (a float16 mean would lose
    the statistics), channels on axis 1 with spatial axes after them (GlobalAveragePool's
    layout), and only statistics it has a transform for."""
    return (
        value.dtype == ir.DataType.FLOAT and value.shape is not None and len(value.shape) >= 3
        and axis == 1 and set(statistics) <= set(_IN_GRAPH)
    )


def _reduced_names(value: ir.Value, statistics: Iterable[str]) -> dict[str, str]:
    """Output names of ``value``'s in-graph means per statistic, and of its shape ("shape")
    when its spatial size is not static."""
    names = {s: f"onnxprune_mean_{s}::{value.name}" for s in statistics}
    if _spatial(value) is None:
        names["shape"] = f"onnxprune_shape::{value.name}"
    return names


def _spatial(value: ir.Value) -> int | None:
    """Elements behind one channel of one sample, when the shape says."""
    dims = list(value.shape or [])[2:]
    return math.prod(dims) if all(isinstance(d, int) for d in dims) else None


def _row_sum(stat: str, v: ir.Value, opset: int, nodes: list[ir.Node]) -> ir.Node:
    """The node summing ``stat``'s transform of ``v`` along its last axis (kept, size 1);
    an axes constant it needs goes to ``nodes`` first."""
    op, axes_input_from = _ROW_SUMS[stat]
    axes = [len(v.shape) - 1]
    if opset < axes_input_from:
        return ir.node(op, [v], attributes={"axes": axes})
    const = ir.node("Constant", [], attributes={"value": ir.tensor(np.array(axes, dtype=np.int64))})
    nodes.append(const)
    return ir.node(op, [v, const.outputs[0]])


def _row_summed(value: ir.Value) -> bool:
    """Whether a reducible tensor that is also fetched can be reduced by rows: a plane of
    rows (rank 4 or more); a rank-3 tensor's one row may be long, so numpy reduces it."""
    return len(value.shape) >= 4


def instrumented_model_path(
    model: ir.Model, values: list[ir.Value], folder: Path, reduced: dict[str, Iterable[str]] | None = None,
    fetched: Iterable[str] = (),
) -> Path:
    """Write a copy of ``model`` whose graph also outputs ``values``, and, for each tensor
    named in ``reduced``, the per-sample, per-channel means of each listed statistic's
    transform (named by :func:`_reduced_names`) instead of the tensor, or, where it is also
    in ``fetched``, beside it, its sums along the last axis (:data:`_ROW_SUMS`)."""
    graph = model.graph
    reduced = reduced or {}
    fetched = set(fetched)
    opset = model.opset_imports.get("", 1)
    nodes: list[ir.Node] = []
    added: list[ir.Value] = []
    for v in values:
        if v.name not in reduced or v.name in fetched:
            if v not in graph.outputs:
                added.append(v)
        if v.name not in reduced:
            continue
        names = _reduced_names(v, reduced[v.name])
        for stat, name in names.items():
            if stat == "shape":
                node = ir.node("Shape", [v])
            elif v.name in fetched:
                node = _row_sum(stat, v, opset, nodes)
            else:
                src = v
                if _IN_GRAPH[stat] is not None:
                    pre = ir.node(_IN_GRAPH[stat], [v, v] if _IN_GRAPH[stat] == "Mul" else [v])
                    nodes.append(pre)
                    src = pre.outputs[0]
                node = ir.node("GlobalAveragePool", [src])
            node.outputs[0].name = name
            nodes.append(node)
            added.append(node.outputs[0])
    with temporary_changes(graph) as changes:
        changes.add_nodes(nodes)
        changes.add_outputs(added)
        path = folder / "instrumented.onnx"
        ir.save(model, path, external_data="instrumented.onnx.data")
    return path


SHARD_BLOCK = 8  # batches a shard holds as a unit; buffered sums fold at block ends, so any split sums alike


@dataclass
class CollectPlan:
    """What the collect step needs, by tensor name only (no graph: it is sent to Ray workers)."""

    axes: dict[str, int]  # exposed tensor -> channel axis
    reduced: dict[str, dict[str, str]]  # tensor onnxruntime reduces -> statistic -> output name
    spatial: dict[str, int | None]  # reduced tensor -> elements behind one channel, when static
    fetched: list[tuple[str, int, bool]]  # (name, inferred bytes per sample, whether that is exact)
    accumulators: dict[str, list[tuple[Hashable, Any]]]  # tensor -> (key, empty accumulator)
    statistics: tuple[str, ...]
    batch_size: int
    memory_budget: int
    fixed_batch: bool


def plan_collect(
    tensors: dict[str, tuple[ir.Value, int]], requests: Iterable["StatRequest"], statistics: Iterable[str],
    batch_size: int, memory_budget: int, fixed_batch: bool,
) -> tuple[CollectPlan, list[ir.Value]]:
    """The collect plan and the values the instrumented graph exposes."""
    values = [v for v, _ in tensors.values()]
    for r in requests:
        if r.value.name not in tensors and r.value not in values:
            values.append(r.value)
    accumulators: dict[str, list[tuple[Hashable, Any]]] = {}
    for r in requests:
        accumulators.setdefault(r.value.name, []).append((r.key, r.factory()))
    gathered = _statistics(statistics)
    # Tensors onnxruntime reduces itself, also those fetched whole for an accumulator (a
    # Gram, the refit's record): its reduction runs on every core inside the run, numpy's
    # on one between runs.  The rest are fetched and reduced here.
    reduced = {
        name: _reduced_names(v, gathered) for name, (v, axis) in tensors.items()
        if _reducible(v, axis, gathered) and (name not in accumulators or _row_summed(v))
    }
    plan = CollectPlan(
        axes={name: axis for name, (_, axis) in tensors.items()}, reduced=reduced,
        spatial={name: _spatial(tensors[name][0]) for name in reduced},
        fetched=[(v.name, _bytes_per_sample(v), _shape_known(v)) for v in values
                 if v.name not in reduced or v.name in accumulators],
        accumulators=accumulators, statistics=gathered, batch_size=batch_size, memory_budget=memory_budget,
        fixed_batch=fixed_batch,
    )
    return plan, values


class Collector:
    """The collect step of calibration: one session on the instrumented graph, and the
    statistics of every batch given to :meth:`collect`, which can be called again (a Ray
    worker collects its shard this way).  Batches carry their number in the whole
    calibration stream: accumulators that sample positions seed with it, so a shard
    samples what one process would."""

    def __init__(self, model: str | bytes, plan: CollectPlan, providers: list[str], ahead: bool = False) -> None:
        try:
            self.sess = _ort.session(model, providers)
        except Exception as exc:
            raise InputError(f"onnxruntime cannot run the model with exposed tensors: {' '.join(str(exc).split())[:300]}") from exc
        self.plan = plan
        # Run ahead (:class:`onnxprune._ahead.Ahead`), two runs' outputs are alive at once.
        self.budget = plan.memory_budget // 2 if ahead else plan.memory_budget
        self.unknown = [name for name, _, known in plan.fetched if not known]
        self.runs = _plan_runs(plan.fetched, plan.batch_size, self.budget) if plan.fetched else [[]]
        self.planned_for: tuple | None = None  # per-sample input shapes the runs were measured on
        self.stats = Statistics({name: None for name in plan.axes}, runs_per_batch=len(self.runs))  # type: ignore[misc]
        self.stats.extra = {key: acc for accs in plan.accumulators.values() for key, acc in accs}
        self.means_of = [name for names in plan.reduced.values() for name in names.values()]  # fetched with the first run

    def _stats_of(self, name: str, channels: int) -> TensorStats:
        s = self.stats.tensors[name]
        if s is None:
            s = self.stats.tensors[name] = TensorStats.empty(channels, self.plan.statistics)
        return s

    def _replan(self, batch: Sample) -> None:
        """Measure the tensors of unknown shape on this batch when its per-sample shapes changed."""
        shapes = tuple((name, arr.shape[1:]) for name, arr in batch.items() if arr.ndim)
        if shapes == self.planned_for:
            return
        measured = _measure_bytes_per_sample(self.sess, self.unknown, batch, self.plan.fixed_batch)
        self.runs = _plan_runs(self.plan.fetched, self.plan.batch_size, self.budget, measured)
        first = self.planned_for is None
        self.stats.runs_per_batch = len(self.runs) if first else max(self.stats.runs_per_batch, len(self.runs))
        self.planned_for = shapes

    def collect(self, batch: Sample, number: int) -> None:
        """Fold batch number ``number`` of the calibration stream in."""
        for i, run, outs in self.fetch(batch):
            self.fold(i, run, outs, number)
            outs = None  # dropped before onnxruntime allocates the next run's outputs
        self.stats.samples += samples_in(batch)

    def fetch(self, batch: Sample) -> Iterator[tuple[int, list[str], list[np.ndarray]]]:
        """The runs of one batch, one at a time: (run index, the tensors it fetched, their
        arrays).  The names travel with the arrays: a batch of new shapes replans the runs."""
        if self.unknown:
            self._replan(batch)
        for i, run in enumerate(self.runs):
            yield i, run, _run(self.sess, run + (self.means_of if i == 0 else []), batch)

    def fold(self, i: int, run: list[str], outs: list[np.ndarray], number: int) -> None:
        """Fold the outputs of run ``i`` (fetching ``run``) of batch number ``number`` in."""
        plan = self.plan
        for name, x in zip(run, outs):
            for _, acc in plan.accumulators.get(name, ()):
                if hasattr(acc, "batches"):  # the stream's number, not this collector's count
                    acc.batches = number
                acc.update(x)
            if name in plan.axes and name not in plan.reduced:
                axis = plan.axes[name]
                self._stats_of(name, x.shape[axis]).update(x, axis)
        if i == 0 and plan.reduced:
            got = dict(zip(self.means_of, outs[len(run) :]))
            for name, names in plan.reduced.items():
                means = {stat: got[out] for stat, out in names.items() if stat != "shape"}
                k = plan.spatial[name]
                if k is None:
                    k = math.prod(int(d) for d in got[names["shape"]][2:])
                self._stats_of(name, means["sum"].shape[1]).update_reduced(means, k, means=name not in plan.accumulators)

    def block_end(self) -> None:
        """Fold the rows accumulators buffered: at every block end, so the float32 products
        group the same rows whatever shard holds the block."""
        for acc in self.stats.extra.values():
            flush = getattr(acc, "flush", None)
            if flush is not None:
                flush()

    def result(self) -> Statistics:
        self.block_end()
        return self.stats


def calibrate(
    model: ir.Model,
    tensors: dict[str, tuple[ir.Value, int]],
    batch_iter: Iterator[Sample],
    *,
    batch_size: int,
    providers: list[str],
    memory_budget: int,
    progress: bool = True,
    total: int | None = None,
    hold_out: int = 0,
    fixed_batch: bool = False,
    requests: list[StatRequest] = (),
    statistics: Iterable[str] = STATISTICS,
    keep: int = 0,
    record: Any = None,
    pool: Any = None,
    padding: Any = None,
) -> tuple[Statistics, list[Sample]]:
    """Gather statistics of ``tensors`` (name -> (value, channel axis)) over the batches,
    and feed every batch of a requested tensor to its extra accumulators.

    ``statistics``: which of :data:`STATISTICS` to gather (Σx and Σx² always are; a method
    asks for what it reads, ``criteria.statistics_for``); reading another one raises.

    Channels-first float32 tensors are reduced by onnxruntime inside the graph (see the
    module docstring) unless a request needs them whole, or count(x ≤ 0) is asked for.
    Reading and onnxruntime's runs happen in a worker thread, one item ahead of the folds
    (:func:`_collect_ahead`), so two runs' outputs may be alive at once: the fetched tensors
    of one run stay within half of ``memory_budget`` bytes per batch (all of it on a Ray
    worker, which runs one at a time).  Sizes come from the inferred shapes, or, where a
    shape is incomplete, are measured on one sample of the first batch (again when the
    per-sample input shapes change).

    ``keep``: the first ``keep`` samples calibrated on are also kept, as batches, in
    ``Statistics.kept`` (the select stage's sensitivity probes run on them).

    ``record``: a :class:`segments.BatchStore` that receives every batch calibrated on, so
    later passes (the refit) replay them without reading the source again.

    ``pool``: a :class:`distributed.RayPool`: its workers collect the statistics, each of
    its shard of whole blocks of batches, which it keeps for the refit; the partial
    statistics merge into what one process gathers.

    ``padding``: a :class:`onnxprune.padding.Padding`: the batches calibrated on are sorted
    by length within blocks of SHARD_BLOCK batches and cut to their longest sample.

    When ``hold_out`` > 0, every fifth sample (every fifth batch for a model with a fixed
    batch size), up to ``hold_out`` samples, is kept aside for verification instead of
    being calibrated on; those samples are returned as batches.
    """
    plan, values = plan_collect(tensors, requests, statistics, batch_size, memory_budget, fixed_batch)
    held: list[Sample] = []
    kept: list[Sample] = []
    with tempfile.TemporaryDirectory(prefix="onnxprune-cal-") as d:
        path = instrumented_model_path(model, values, Path(d), {k: plan.statistics for k in plan.reduced},
                                       [name for name, _, _ in plan.fetched])
        sink = Collector(str(path), plan, providers, ahead=True) if pool is None else pool.collecting(path, plan, providers)
        t0 = time.perf_counter()
        bar = _progress(progress, total)
        with bar:
            task = bar.add_task("calibrating", total=total)

            def counted(it: Iterator[Sample]) -> Iterator[Sample]:
                for b in it:
                    bar.update(task, advance=samples_in(b))
                    yield b

            def keeping(it: Iterator[Sample]) -> Iterator[Sample]:
                seen = 0
                for batch in it:
                    n = samples_in(batch)
                    if seen < keep:
                        cut = n if fixed_batch else keep - seen  # a fixed batch size cannot be cut
                        kept.append(take_samples(batch, slice(None, cut)))
                    seen += n
                    yield batch

            def batches(source: Iterator[Sample]) -> Iterator[tuple[int, Sample]]:
                # Held-out and probe samples come from the reading order; only the batches
                # calibrated on are sorted by length and cut (onnxprune.padding).
                stream = keeping(split_held_out(counted(source), hold_out, fixed_batch, held))
                if padding is not None:
                    stream = sorted_batches(stream, padding, SHARD_BLOCK)
                for number, batch in enumerate(stream):
                    if record is not None:
                        record.append(batch)
                    yield number, batch
                    batch = None

            if pool is None:
                # The source is read one batch ahead in a thread of its own: in the worker that
                # runs onnxruntime, a batch's decoding waited for the folds of the one before.
                with Ahead(batch_iter, name="onnxprune-read") as read:
                    _collect_ahead(sink, batches(read))
            else:
                for number, batch in batches(batch_iter):
                    sink.collect(batch, number)
                    if (number + 1) % SHARD_BLOCK == 0:
                        sink.block_end()
                    batch = None
            stats = sink.result()
        stats.kept = kept
        stats.seconds = time.perf_counter() - t0
    if stats.samples == 0:
        raise InputError("no calibration samples left after holding some out for verification; add data or pass --eval")
    return stats, held


def _collect_ahead(sink: Collector, batches: Iterator[tuple[int, Sample]]) -> None:
    """``sink.collect`` of every batch, with onnxruntime's runs ahead of the folds in a
    worker thread (:class:`onnxprune._ahead.Ahead`); ``batches`` is read in that thread
    (the caller reads its source ahead in another)."""

    def runs() -> Iterator[tuple[int, int, int, list[str] | None, list[np.ndarray] | None]]:
        # The "batch done" item takes the slot ahead, so a batch's run waits for the folds of
        # the one before, and so did its reading until the source got a thread of its own.
        # With the done mark folded into the runs' items, the run overlapped the folds, but
        # on 2 cores the stage took about as long and the peak rose, two runs' outputs alive
        # (docs/STATUS.md, "Tried and dropped").
        for number, batch in batches:
            for i, run, outs in sink.fetch(batch):
                yield number, 0, i, run, outs
                outs = None
            yield number, samples_in(batch), -1, None, None  # the batch is done

    with Ahead(runs(), name="onnxprune-calibrate") as items:
        for number, n, i, run, outs in items:
            if i >= 0:
                sink.fold(i, run, outs, number)
            else:
                sink.stats.samples += n
                if (number + 1) % SHARD_BLOCK == 0:
                    sink.block_end()
            outs = None


def split_held_out(batch_iter: Iterator[Sample], hold_out: int, fixed_batch: bool,
                   held: list[Sample] | None = None) -> Iterator[Sample]:
    """The batches to calibrate on: every fifth sample (every fifth batch when the batch
    size is fixed), up to ``hold_out`` samples, is held out for verification instead and
    appended to ``held``.  Deterministic, so a second pass over the same data (the lstsq
    refit) leaves out the same samples."""
    held_n = seen = 0
    for k, batch in enumerate(batch_iter):
        n = samples_in(batch)
        if hold_out and held_n < hold_out:
            if fixed_batch:  # cannot cut a fixed-size batch
                take = np.full(n, k % 5 == 4)
            else:
                take = np.arange(seen, seen + n) % 5 == 4
                take &= np.cumsum(take) <= hold_out - held_n
            seen += n
            if take.any():
                if held is not None:
                    held.append(take_samples(batch, take))
                held_n += int(take.sum())
                if take.all():
                    continue
                batch = take_samples(batch, ~take)
        yield batch


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *a, **k):
        return 0

    def update(self, *a, **k):
        pass


def _progress(enabled: bool, total: int | None) -> Any:
    if not enabled:
        return _NoBar()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    class _Rate(TextColumn):
        def __init__(self) -> None:
            super().__init__("")

        def render(self, task):  # samples/s
            from rich.text import Text

            speed = task.finished_speed or task.speed
            return Text(f"{speed:,.0f} samples/s" if speed else "")

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(), TimeElapsedColumn(),
        transient=True, console=Console(stderr=True),
    )

