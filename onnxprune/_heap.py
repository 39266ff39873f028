"""The heap's free pages handed back to the kernel between the stages of a prune.

glibc keeps memory a process freed in its heap when live blocks sit above it, and numpy's
large arrays come from that heap once the first big one was freed (glibc raises its mmap
threshold then).  A stage's freed arrays (the probe feeds' copies, the calibration's
outputs) then stayed resident, and the next stage raised the prune's peak by their size
(benchmarks/RESULTS.md, "Cost").  ``malloc_trim`` returns those pages; elsewhere than
glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_trim: list = []


def release_freed_memory() -> None:
    """``malloc_trim(0)`` where the C library has it (a few milliseconds)."""
    if not _trim:
        try:
            _trim.append(ctypes.CDLL(ctypes.util.find_library("c") or None).malloc_trim)
        except (OSError, AttributeError):  # not glibc
            _trim.append(None)
    if _trim[0] is not None:
        _trim[0](0)
