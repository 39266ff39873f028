"""Verify stage: the pruned file must pass onnx's full check and run in onnxruntime with
the original's output shapes (and finite outputs wherever the original's are finite)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from . import _ort
from .errors import InputError, VerificationError

_DTYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def random_feed(session, seed: int = 0, batch: int = 2, free_dim: int = 64) -> dict[str, np.ndarray]:
    """Inputs for ``session``: symbolic batch dims become ``batch``, other symbolic dims ``free_dim``."""
    rng = np.random.default_rng(seed)
    feed = {}
    for inp in session.get_inputs():
        dtype = _DTYPES.get(inp.type)
        if dtype is None:
            raise InputError(f"input '{inp.name}' has type {inp.type}, which onnxprune cannot feed")
        shape = [d if isinstance(d, int) and d > 0 else (batch if i == 0 else free_dim) for i, d in enumerate(inp.shape)]
        if np.issubdtype(dtype, np.floating):
            feed[inp.name] = np.asarray(rng.standard_normal(shape), dtype=dtype)
        elif dtype is np.bool_:
            feed[inp.name] = np.asarray(rng.random(shape) < 0.5)
        else:
            feed[inp.name] = np.asarray(rng.integers(0, 2, size=shape), dtype=dtype)
    return feed


def run_original(path: str | os.PathLike, seed: int = 0) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """Run the input model once; an error here is the input's problem (exit 2)."""
    try:
        sess = _ort.session(str(path))
        feed = random_feed(sess, seed)
        return feed, sess.run(None, feed)
    except InputError:
        raise
    except Exception as exc:
        msg = " ".join(str(exc).split())[:300]
        raise InputError(f"onnxruntime cannot run the input model: {msg}") from exc


def check_pruned(path: Path, feed: dict[str, np.ndarray], reference: list[np.ndarray]) -> None:
    """Raise VerificationError unless ``path`` is a valid model matching the reference shapes."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise VerificationError(f"onnx checker rejects the pruned graph: {' '.join(str(exc).split())[:300]}") from exc
    try:
        sess = _ort.session(str(path))
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
