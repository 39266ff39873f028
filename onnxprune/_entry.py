"""The console script: signal handlers first, then the (heavy) imports and the run."""

from __future__ import annotations

import sys

from . import _signals


def entry() -> None:
    """``onnxprune ...``: exit with the CLI's code; a signal at any moment is one line, 130/143."""
    _signals.install()
    try:
        from .cli import main  # numpy, onnx, onnxruntime: seconds, during which a signal may come

        code = main()
        _signals.ignore()  # done: a late signal must not turn a success into a traceback
    except (_signals.Interrupted, KeyboardInterrupt) as exc:
        _signals.ignore()
        line, code = _signals.message(exc)
        print(line, file=sys.stderr)
    sys.exit(code)
