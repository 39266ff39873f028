#!/usr/bin/env python3
"""MIPP's closed-form fold downdates (``onnxprune/methods/mipp.py``, ``_LinearFolds``): the
cost of removing 3/4 of a consumer's inputs one at a time, with dead positions dropped from
the s×s matrices once an eighth are dead (the default) against never dropped (zeroed only),
side by side in one run, on synthetic 5-fold statistics of width s.

    .venv/bin/python benchmarks/mipp_downdate.py [--sizes 256 512 1024]

The checksum (sum of every tested loss increase) must be equal in both columns: dropping
dead positions changes the cost, not the estimates.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxprune.methods.mipp import _FoldBase, _LinearFolds  # noqa: E402


def run(s: int, compact: int, folds=5, outputs=64) -> tuple[float, float]:
    """(seconds, checksum) for removing 3/4 of ``s`` inputs one at a time."""
    rng = np.random.default_rng(0)

    def spd():
        a = rng.standard_normal((s, s // 2))
        return a @ a.T / s + np.eye(s) * 0.1

    base = _FoldBase([(spd(), spd(), 0.01) for _ in range(folds)], np.arange(s))
    lf = _LinearFolds(base, rng.standard_normal((outputs, s)))
    lf.COMPACT = compact
    total, t = 0.0, time.perf_counter()
    for k in rng.permutation(s)[: 3 * s // 4]:
        total += float(lf.delta(np.array([k])).sum())
        lf.commit(np.array([k]))
    return time.perf_counter() - t, total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    args = ap.parse_args(argv)
    print("| s | removals | never dropped s | dropped per 1/8 s | speedup | checksums equal (rel. 1e-9) |")
    print("|---|---|---|---|---|---|")
    for s in args.sizes:
        t0, c0 = run(s, 0)
        t1, c1 = run(s, _LinearFolds.COMPACT)
        same = abs(c0 - c1) <= 1e-9 * abs(c0)
        print(f"| {s} | {3 * s // 4} | {t0:.2f} | {t1:.2f} | {t0 / t1:.2f}× | {same} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
