"""Worker threads that go to sleep when their call is done, instead of spinning for the next.

A prune alternates between onnxruntime and numpy, and numpy's and scipy's wheels each bundle
their own OpenBLAS.  OpenBLAS's worker threads spin for 2**28 cycles (about 0.1 s) after each
call by default, so the threads of one library held the cores while the next one ran, most
of all in the least-squares refit (benchmarks/RESULTS.md, "Cost").  (onnxruntime's own pool
is told the same per session: ``_ort.session``.)
"""

from __future__ import annotations

import os
from typing import MutableMapping

# OpenBLAS reads it once, when it is loaded (numpy's import): 2**16 cycles, tens of microseconds.
BLAS_ENV = {"OPENBLAS_THREAD_TIMEOUT": "16"}


def settle(env: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Put BLAS_ENV into ``env`` where it holds no value of its own yet (a user's setting
    stays), and return the values it now holds.  Only effective before numpy is imported."""
    for name, value in BLAS_ENV.items():
        env.setdefault(name, value)
    return {name: env[name] for name in BLAS_ENV}
