"""Installed plug-ins: modules that call ``register_op``/``register_criterion`` when they are
imported, named by an ``onnxprune.plugins`` entry point of their distribution.  They are
loaded once per process, before the first prune or analysis checks its options, so the
CLI's ``--method NAME`` reaches a criterion a plug-in registers (README "Extending the op
table")."""

from __future__ import annotations

from .errors import InputError

GROUP = "onnxprune.plugins"
_loaded = False


def load_plugins() -> None:
    """Import every module the ``onnxprune.plugins`` entry points name (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=GROUP):
        try:
            ep.load()
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise InputError(f"plug-in '{ep.name}' ({ep.value}) failed to load: {type(exc).__name__}"
                             + (f": {first}" if first else "")) from exc
