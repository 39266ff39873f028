"""Calibrate stage: stream data through onnxruntime with chosen intermediate tensors
exposed as extra outputs, and reduce every batch to per-channel statistics at once.

Statistics are float64 sums (see METHODS.md): n, Σx, Σx², Σ|x|, count(x ≤ 0) per index
of each tensor's channel axis.  Nothing else of a batch is kept, so peak memory does not
grow with the number of samples.  When the exposed tensors of one batch would exceed
the memory budget, they are fetched in several runs per batch (onnxruntime computes
only what a run's fetches need), each run within the budget.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import onnx_ir as ir

from . import _ort
from .data import Sample
from .errors import InputError


@dataclass
class TensorStats:
    """Additive per-index statistics of one tensor along its channel axis."""

    n: int
    sum: np.ndarray
    sumsq: np.ndarray
    sumabs: np.ndarray
    nonpos: np.ndarray

    @classmethod
    def empty(cls, size: int) -> "TensorStats":
        z = lambda: np.zeros(size, dtype=np.float64)  # noqa: E731
        return cls(0, z(), z(), z(), z())

    def update(self, x: np.ndarray, axis: int) -> None:
        """Fold one batch in: reduce over every axis but ``axis``."""
        axes = tuple(i for i in range(x.ndim) if i != axis)
        xf = x.astype(np.float32, copy=False)
        self.n += x.size // x.shape[axis]
        self.sum += xf.sum(axis=axes, dtype=np.float64)
        self.sumsq += np.square(xf).sum(axis=axes, dtype=np.float64)
        self.sumabs += np.abs(xf).sum(axis=axes, dtype=np.float64)
        self.nonpos += (xf <= 0).sum(axis=axes)

    def merge(self, other: "TensorStats") -> "TensorStats":
        """Statistics of both shards together."""
        return TensorStats(
            self.n + other.n, self.sum + other.sum, self.sumsq + other.sumsq,
            self.sumabs + other.sumabs, self.nonpos + other.nonpos,
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


@dataclass
class StatRequest:
    """Ask the calibrate stage for ``factory()`` fed with every batch of ``value``."""

    key: str
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
    extra: dict[str, Any] = field(default_factory=dict)

    def merge(self, other: "Statistics") -> "Statistics":
        def join(x: dict, y: dict) -> dict:
            out = {}
            for k in sorted(set(x) | set(y)):
                a, b = x.get(k), y.get(k)
                out[k] = a.merge(b) if a is not None and b is not None else (a if a is not None else b)
            return out

        return Statistics(
            join(self.tensors, other.tensors), self.samples + other.samples,
            self.seconds + other.seconds, max(self.runs_per_batch, other.runs_per_batch),
            join(self.extra, other.extra),
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
    dims = [d if isinstance(d, int) else 1 for d in (value.shape or [])]
    itemsize = 4
    if value.dtype is not None:
        try:
            itemsize = value.dtype.itemsize
        except Exception:  # noqa: BLE001 - exotic dtypes: assume 4 bytes
            itemsize = 4
    return int(math.prod(dims[1:]) if dims else 1) * itemsize


def _plan_runs(values: list[ir.Value], batch_size: int, budget: int) -> list[list[ir.Value]]:
    """Split the tensors to fetch into runs whose outputs fit ``budget`` bytes per batch."""
    runs: list[list[ir.Value]] = [[]]
    used = 0
    for v in values:
        cost = _bytes_per_sample(v) * batch_size
        if runs[-1] and used + cost > budget:
            runs.append([])
            used = 0
        runs[-1].append(v)
        used += cost
    return runs


def instrumented_model_path(model: ir.Model, values: list[ir.Value], folder: Path) -> Path:
    """Write a copy of ``model`` whose graph also outputs ``values``."""
    graph = model.graph
    added = [v for v in values if v not in graph.outputs]
    graph.outputs.extend(added)
    try:
        path = folder / "instrumented.onnx"
        ir.save(model, path, external_data="instrumented.onnx.data")
    finally:
        for v in added:
            graph.outputs.remove(v)
    return path


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
) -> tuple[Statistics, list[Sample]]:
    """Gather statistics of ``tensors`` (name -> (value, channel axis)) over the batches,
    and feed every batch of a requested tensor to its extra accumulators.

    When ``hold_out`` > 0, every fifth sample (every fifth batch for a model with a fixed
    batch size), up to ``hold_out`` samples, is kept aside for verification instead of
    being calibrated on; those samples are returned as batches.
    """
    values = [v for v, _ in tensors.values()]
    for r in requests:
        if r.value.name not in tensors and r.value not in values:
            values.append(r.value)
    by_tensor: dict[str, list[tuple[str, Accumulator]]] = {}
    for r in requests:
        by_tensor.setdefault(r.value.name, []).append((r.key, r.factory()))
    runs = _plan_runs(values, batch_size, memory_budget)
    stats = Statistics({name: None for name in tensors}, runs_per_batch=len(runs))  # type: ignore[misc]
    stats.extra = {key: acc for accs in by_tensor.values() for key, acc in accs}
    held: list[Sample] = []
    held_n = 0
    with tempfile.TemporaryDirectory(prefix="onnxprune-cal-") as d:
        path = instrumented_model_path(model, values, Path(d))
        try:
            sess = _ort.session(str(path), providers)
        except Exception as exc:
            raise InputError(f"onnxruntime cannot run the model with exposed tensors: {' '.join(str(exc).split())[:300]}") from exc
        t0 = time.perf_counter()
        bar = _progress(progress, total)
        with bar:
            task = bar.add_task("calibrating", total=total)
            seen = 0
            for k, batch in enumerate(batch_iter):
                n = next(iter(batch.values())).shape[0]
                bar.update(task, advance=n)
                if hold_out and held_n < hold_out:
                    if fixed_batch:  # cannot cut a fixed-size batch: hold out every fifth one
                        take = np.full(n, k % 5 == 4)
                    else:  # every fifth sample, until hold_out are set aside
                        take = (np.arange(seen, seen + n) % 5 == 4)
                        take &= np.cumsum(take) <= hold_out - held_n
                    seen += n
                    if take.any():
                        held.append({name: arr[take] for name, arr in batch.items()})
                        held_n += int(take.sum())
                        if take.all():
                            continue
                        batch = {name: arr[~take] for name, arr in batch.items()}
                        n = int((~take).sum())
                for run in runs:
                    try:
                        outs = sess.run([v.name for v in run], batch)
                    except Exception as exc:
                        raise InputError(f"onnxruntime failed on the calibration data: {' '.join(str(exc).split())[:300]}") from exc
                    for v, x in zip(run, outs):
                        for _, acc in by_tensor.get(v.name, ()):
                            acc.update(x)
                        if v.name not in tensors:
                            continue
                        axis = tensors[v.name][1]
                        s = stats.tensors[v.name]
                        if s is None:
                            s = stats.tensors[v.name] = TensorStats.empty(x.shape[axis])
                        s.update(x, axis)
                stats.samples += n
        stats.seconds = time.perf_counter() - t0
    if stats.samples == 0:
        raise InputError("no calibration samples left after holding some out for verification; add data or pass --eval")
    return stats, held


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

