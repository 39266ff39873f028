"""Verify stage: the pruned file must pass onnx's full check and run in onnxruntime with
the original's output shapes (and finite outputs wherever the original's are finite)."""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from . import _ort
from .data import samples_in
from .errors import InputError, VerificationError

_DTYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


# The synthetic feed of the reference run: a tiny model declaring a huge fixed input must
# not make it allocate gigabytes.
MAX_FEED_BYTES = 256 * 2**20


def random_feed(session, seed: int = 0, batch: int = 2, free_dim: int = 64,
                shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
    """Inputs for ``session``: an input named in ``shapes`` gets exactly those dims (``--input-shape``);
    elsewhere fixed dims are kept, symbolic batch dims become ``batch``, other symbolic dims ``free_dim``.
    A scalar (rank-0) input is a 0-d array; integer inputs hold 0 or 1.

    Refused (InputError) above MAX_FEED_BYTES in all; floats are drawn in float32 (float64
    only for double inputs), never drawn wide and cast.
    """
    rng = np.random.default_rng(seed)
    shapes_in = {}
    for inp in session.get_inputs():
        dtype = _DTYPES.get(inp.type)
        if dtype is None:
            raise InputError(f"input '{inp.name}' has type {inp.type}, which onnxprune cannot feed")
        if shapes and inp.name in shapes:
            shape = [int(d) for d in shapes[inp.name]]
        else:
            shape = [d if isinstance(d, int) and d > 0 else (batch if i == 0 else free_dim) for i, d in enumerate(inp.shape)]
        shapes_in[inp.name] = (shape, dtype)
    _check_feed_size(shapes_in)
    feed = {}
    for name, (shape, dtype) in shapes_in.items():
        if dtype in (np.float32, np.float64):
            arr = rng.standard_normal(shape, dtype=dtype)
        elif np.issubdtype(dtype, np.floating):
            arr = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
        elif dtype is np.bool_:
            arr = rng.integers(0, 2, size=shape, dtype=np.uint8).astype(np.bool_)
        else:
            arr = rng.integers(0, 2, size=shape, dtype=dtype)
        feed[name] = np.asarray(arr, dtype=dtype)
    return feed


def describe_feed(feed: dict[str, np.ndarray]) -> str:
    """``input 'x' float32 [2, 64], input 'sr' int64 []``: what a run was fed."""
    return ", ".join(f"input '{k}' {np.asarray(v).dtype} {list(np.shape(v))}" for k, v in feed.items())


def _check_feed_size(shapes: dict[str, tuple[list[int], type]]) -> None:
    sizes = {name: int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize for name, (shape, dtype) in shapes.items()}
    if sum(sizes.values()) > MAX_FEED_BYTES:
        name = max(sizes, key=sizes.get)
        raise InputError(
            f"input '{name}' {shapes[name][0]} needs {sizes[name] / 2**20:,.0f} MiB for the synthetic test batch "
            f"that checks the pruned model (bound: {MAX_FEED_BYTES >> 20} MiB in all): onnxprune cannot check "
            "models whose declared inputs are this large"
        )


def original_session(path: str | os.PathLike):
    """An onnxruntime session of the input model; an error here is the input's problem (exit 2)."""
    try:
        return _ort.session(str(path))
    except Exception as exc:
        msg = " ".join(str(exc).split())[:300]
        raise InputError(f"onnxruntime cannot run the input model: {msg}") from exc


def run_reference(sess, feed: dict[str, np.ndarray], synthetic: bool) -> list[np.ndarray]:
    """The input model's outputs on ``feed``.  When onnxruntime refuses, the one-line error
    names every input and the dims it was fed; on a synthetic feed it suggests the real
    sizes (``--input-shape``) or real data (``--calib``)."""
    try:
        return sess.run(None, feed)
    except Exception as exc:
        msg = " ".join(str(exc).split())[:300]
        if synthetic:
            raise InputError(
                f"onnxruntime cannot run the input model on a synthetic feed ({describe_feed(feed)}; symbolic dims "
                f"guessed): {msg}; give the real sizes with --input-shape NAME:D0,D1,... or real data with --calib"
            ) from exc
        raise InputError(f"onnxruntime cannot run the input model on the calibration samples ({describe_feed(feed)}): {msg}") from exc


def run_original(path: str | os.PathLike, seed: int = 0, shapes: dict[str, tuple[int, ...]] | None = None,
                 feed: dict[str, np.ndarray] | None = None) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """Run the input model once on ``feed`` (else a synthetic one, with ``shapes`` fixing
    dims); an error here is the input's problem (exit 2)."""
    sess = original_session(path)
    synthetic = feed is None
    if feed is None:
        feed = random_feed(sess, seed, shapes=shapes)
    return feed, run_reference(sess, feed, synthetic)


def check_restructured(model: ir.Model, feed: dict[str, np.ndarray], reference: list[np.ndarray]) -> None:
    """Raise VerificationError unless ``model`` (the input after load's attention folds, not
    yet pruned) computes the original's outputs on ``feed``.

    The folds are taken only where the dims prove them, but some dims come from
    onnxruntime's symbolic inference; this checks the values, not only the shapes.
    """
    with tempfile.TemporaryDirectory(prefix="onnxprune-fold-") as d:
        path = Path(d) / "folded.onnx"
        ir.save(model, path, external_data="folded.onnx.data")
        try:
            outs = _ort.session(str(path)).run(None, feed)
        except Exception as exc:
            raise VerificationError(f"the input after load's attention folds does not run: {' '.join(str(exc).split())[:300]}") from exc
    for ref, out in zip(reference, outs):
        ref, out = np.asarray(ref), np.asarray(out)
        if ref.shape != out.shape or (
            np.issubdtype(ref.dtype, np.floating)
            and not np.allclose(out, ref, rtol=1e-3, atol=1e-4 * max(float(np.nanmax(np.abs(ref), initial=0.0)), 1.0), equal_nan=True)
        ):
            raise VerificationError("load's attention folds changed the model's outputs (an onnxprune bug: please report it)")


class Sessions:
    """One onnxruntime session per graph variant (file and providers) for the checks of one
    run: the pruned file's check, its fidelity and its latency share one."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, tuple[str, ...]], Any] = {}

    def __call__(self, path: str | os.PathLike, providers: list[str] | None = None):
        key = (str(path), tuple(providers or ("CPUExecutionProvider",)))
        if key not in self._open:
            self._open[key] = _ort.session(key[0], list(key[1]))
        return self._open[key]


def check_pruned(path: Path, feed: dict[str, np.ndarray], reference: list[np.ndarray],
                 sessions: Sessions | None = None) -> None:
    """Raise VerificationError unless ``path`` is a valid model matching the reference shapes."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise VerificationError(f"onnx checker rejects the pruned graph: {' '.join(str(exc).split())[:300]}") from exc
    try:
        sess = (sessions or Sessions())(path)
        outs = sess.run(None, feed)
    except Exception as exc:
        raise VerificationError(f"onnxruntime rejects the pruned graph: {' '.join(str(exc).split())[:300]}") from exc
    names = [o.name for o in sess.get_outputs()]
    for name, ref, out in zip(names, reference, outs):
        if np.shape(ref) != np.shape(out):
            raise VerificationError(f"output '{name}' changed shape: {np.shape(ref)} -> {np.shape(out)}")
        if np.issubdtype(np.asarray(ref).dtype, np.floating):
            bad = np.isfinite(ref) & ~np.isfinite(out)
            if bad.any():
                raise VerificationError(f"output '{name}' has non-finite values the original does not")


@dataclass
class Fidelity:
    """How closely the pruned model follows the original on held-out samples."""

    samples: int
    rel_l2: float  # worst output: ‖y − y'‖ / ‖y‖ over all samples
    cosine: float  # worst output: mean per-sample cosine similarity
    agreement: float | None  # top-1 agreement of the first classifier-shaped output
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    source: str = ""
    # Per run of a full batch after the first (a warm-up): each model's seconds, the two
    # models' runs interleaved batch by batch (see :func:`latency_of_runs`).
    run_times: list[tuple[float, float]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("samples", "rel_l2", "cosine", "agreement", "accuracy_before", "accuracy_after", "source")}


def measure_fidelity(original: str | os.PathLike, pruned: str | os.PathLike, batches, labels: np.ndarray | None = None,
                     providers=None, sessions: Sessions | None = None) -> Fidelity:
    """Run both models on ``batches`` and compare their outputs."""
    sessions = sessions or Sessions()
    a, b = sessions(original, providers), sessions(pruned, providers)
    names = [o.name for o in a.get_outputs()]
    diff2 = np.zeros(len(names))
    ref2 = np.zeros(len(names))
    cos_sum = np.zeros(len(names))
    agree = correct_a = correct_b = 0
    n = 0
    run_times: list[tuple[float, float]] = []
    classifier = None
    full = None
    for k, batch in enumerate(batches):
        t0 = time.perf_counter()
        ya = a.run(None, batch)
        t1 = time.perf_counter()
        yb = b.run(None, batch)
        t2 = time.perf_counter()
        m = samples_in(batch)
        full = m if full is None else full
        if k and m == full:
            run_times.append((t1 - t0, t2 - t1))
        for i, (u, v) in enumerate(zip(ya, yb)):
            u = np.asarray(u, np.float64).reshape(m, -1)
            v = np.asarray(v, np.float64).reshape(m, -1)
            diff2[i] += ((u - v) ** 2).sum()
            ref2[i] += (u**2).sum()
            denom = np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1)
            cos = np.where(denom > 0, (u * v).sum(1) / np.where(denom > 0, denom, 1), 1.0)
            cos_sum[i] += cos.sum()
        if classifier is None:
            classifier = next((i for i, y in enumerate(ya) if np.ndim(y) == 2 and np.shape(y)[1] > 1), -1)
        if classifier >= 0:
            pa, pb = ya[classifier].argmax(1), yb[classifier].argmax(1)
            agree += int((pa == pb).sum())
            if labels is not None:
                lab = labels[n : n + m]
                if len(lab) != m:
                    raise InputError(_labels_mismatch(len(labels), f"more than {len(labels)}"))
                correct_a += int((pa == lab).sum())
                correct_b += int((pb == lab).sum())
        n += m
    if n == 0:
        raise InputError("no samples to verify the pruned model on")
    if labels is not None and len(labels) != n:
        raise InputError(_labels_mismatch(len(labels), str(n)))
    rel = float(np.max(np.sqrt(diff2 / np.maximum(ref2, 1e-30))))
    has_cls = classifier is not None and classifier >= 0
    fid = Fidelity(n, rel, float(np.min(cos_sum / n)), agree / n if has_cls else None, run_times=run_times)
    if labels is not None and has_cls:
        fid.accuracy_before, fid.accuracy_after = correct_a / n, correct_b / n
    return fid


def _labels_mismatch(n_labels: int, n_samples: str) -> str:
    return f"--labels holds {n_labels} labels but the eval data holds {n_samples} samples: they must line up one to one"


def latency_of_runs(run_times: list[tuple[float, float]], least: int = 2) -> tuple[float, float] | None:
    """Median seconds of one run of each model from the fidelity check's own runs
    (:attr:`Fidelity.run_times`: full batches, the models interleaved as in
    :func:`paired_latency`), or None with fewer than ``least`` of them.  A prune that has
    just run both models over a whole evaluation set need not run them again to time them."""
    if len(run_times) < least:
        return None
    return float(np.median([t[0] for t in run_times])), float(np.median([t[1] for t in run_times]))


def paired_latency(original: str | os.PathLike, pruned: str | os.PathLike, feed: dict[str, np.ndarray],
                   runs: int = 7, budget_s: float = 2.0, sessions: Sessions | None = None) -> tuple[float, float]:
    """Median wall time of one run on ``feed`` of each model (after one warm-up), the two
    models' runs interleaved so that load on the machine hits both alike.  ``runs`` per
    model at most, fewer past ``budget_s`` (3 at least): every run costs a batch of
    inferences, which a prune in CI pays for."""
    sessions = [(sessions or Sessions())(path) for path in (original, pruned)]
    for sess in sessions:
        sess.run(None, feed)
    times: list[list[float]] = [[], []]
    start = time.perf_counter()
    while len(times[0]) < runs and (time.perf_counter() - start < budget_s or len(times[0]) < 3):
        for sess, out in zip(sessions, times):
            t = time.perf_counter()
            sess.run(None, feed)
            out.append(time.perf_counter() - t)
    return float(np.median(times[0])), float(np.median(times[1]))
