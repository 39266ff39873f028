"""onnxprune: structured pruning of ONNX graphs with real removal of channels."""

from .errors import InputError, OnnxPruneError, VerificationError

# Public name -> the module that defines it, imported on first use (see __getattr__).
_LAZY = {
    "AnalysisReport": "api", "PruneResult": "api", "analyze": "api", "prune": "api",
    # extending the op table (README "Extending the op table")
    "register_op": "ops", "Handler": "ops", "Unary": "ops", "Elementwise": "ops", "Block": "ops",
    "Layout": "layout", "SliceParam": "layout",
    # scoring methods
    "register_criterion": "methods", "Criterion": "methods", "MethodOptions": "methods",
}

__all__ = ["InputError", "OnnxPruneError", "VerificationError", *_LAZY]


def __getattr__(name: str):
    # The API loads numpy, onnx and onnx_ir: imported on first use, so that the console
    # script can install its signal handlers before any of that (onnxprune._entry).
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'onnxprune' has no attribute {name!r}")


def _defer_imports() -> None:
    from ._deferred import defer

    defer("sympy")  # onnx_ir imports it for symbolic-dim arithmetic (onnxprune._deferred)
    defer("onnx_ir._symbolic_shapes")  # reads sympy's attributes at import


_defer_imports()
