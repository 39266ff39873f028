"""onnxprune: structured pruning of ONNX graphs with real removal of channels."""

from .errors import InputError, OnnxPruneError, VerificationError

__all__ = ["AnalysisReport", "InputError", "OnnxPruneError", "PruneResult", "VerificationError", "analyze", "prune"]


def __getattr__(name: str):
    # The API loads numpy, onnx and onnx_ir: imported on first use, so that the console
    # script can install its signal handlers before any of that (onnxprune._entry).
    if name in ("AnalysisReport", "PruneResult", "analyze", "prune"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'onnxprune' has no attribute {name!r}")
