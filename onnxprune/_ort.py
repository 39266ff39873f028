"""onnxruntime access: one place that says what to do when it is missing."""

from __future__ import annotations

from types import ModuleType

from .errors import InputError


def ort() -> ModuleType:
    """The onnxruntime module, or an InputError telling how to install it."""
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise InputError(
            "onnxruntime is not installed: pip install 'onnxprune[cpu]' (or 'onnxprune[gpu]' "
            "for CUDA; never both, they install the same module)"
        ) from exc
    return onnxruntime


def session(path: str, providers: list[str] | None = None):
    """An InferenceSession on ``path`` with quiet logging."""
    rt = ort()
    opts = rt.SessionOptions()
    opts.log_severity_level = 3
    return rt.InferenceSession(path, sess_options=opts, providers=providers or ["CPUExecutionProvider"])
