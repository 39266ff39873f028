"""Third-party imports that cost start-up time and are rarely used, put off until first use.

onnx_ir imports sympy at import time (in ``onnx_ir._symbolic_shapes``, for the arithmetic of
symbolic dims), which a prune of a model with fixed shapes never uses; importing sympy is the
largest single part of starting the CLI (README's first command; RESULTS "Cost").  ``defer``
puts a stand-in module in ``sys.modules`` that imports the real one on the first attribute
read, so ``import sympy`` costs nothing until sympy is used, and then behaves as the real
module.  If a later onnx_ir moves things around, the stand-ins are simply loaded early.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import threading
import types

_lock = threading.RLock()


class _StandIn(types.ModuleType):
    """``sys.modules[name]`` until the first attribute read, which imports the real module."""

    def __getattr__(self, attr: str):  # called only for what the stand-in itself lacks
        real = _load(self.__name__)
        self.__dict__.update(real.__dict__)  # later reads through old references go straight there
        return getattr(real, attr)

    def __dir__(self):
        return dir(_load(self.__name__))


def _load(name: str) -> types.ModuleType:
    with _lock:
        current = sys.modules.get(name)
        if isinstance(current, _StandIn):
            del sys.modules[name]
            try:
                current = importlib.import_module(name)
            except BaseException:
                sys.modules[name] = sys.modules.get(name) or current  # keep the stand-in: a later read tries again
                raise
        return current


def _spec(name: str):
    """``name``'s spec, found without running its parent package's ``__init__``."""
    parent, _, _ = name.rpartition(".")
    if not parent:
        return importlib.util.find_spec(name)
    if parent in sys.modules:
        return None  # the parent imported already: so is (or soon will be) this module
    outer = importlib.util.find_spec(parent)
    if outer is None or not outer.submodule_search_locations:
        return None
    return importlib.machinery.PathFinder.find_spec(name, list(outer.submodule_search_locations))


def defer(name: str) -> None:
    """Put off importing module ``name`` until an attribute of it is read.  Does nothing if
    it is imported already or not installed (or, for a submodule, if its package is)."""
    if name in sys.modules:
        return
    spec = _spec(name)
    if spec is None:
        return
    stand_in = _StandIn(name)
    stand_in.__spec__ = spec  # what `import name` checks (spec._initializing) before returning it
    stand_in.__file__ = spec.origin
    sys.modules[name] = stand_in
