"""onnxprune: structured pruning of ONNX graphs with real removal of channels."""

from .api import AnalysisReport, PruneResult, analyze, prune
from .errors import InputError, OnnxPruneError, VerificationError

__all__ = ["AnalysisReport", "InputError", "OnnxPruneError", "PruneResult", "VerificationError", "analyze", "prune"]
