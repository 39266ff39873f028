#!/usr/bin/env python3
"""One cell of ``cifar10.py``'s grid, with any seed and any code: one ``onnxprune.prune`` call
on the Keras CIFAR-10 CNN (as ``cifar10._prune_once`` makes it) and its evaluation, printed
as one JSON line with the written model's layer widths.

Exact command (repo root; the assets of ``cifar10.py`` built, its packages on ``PYTHONPATH``)::

    .venv/bin/python benchmarks/cifar10_one.py CODE_ROOT METHOD COMPENSATE KEPT [--seed N]

``CODE_ROOT``: the onnxprune checkout to import (a git worktree of another commit, or ``.``),
so two codes can be compared cell by cell; ``KEPT``: the MACs target (``1 - removed``).
Every call gets the 300 calibration samples (``cifar10.py`` gives none to l1/l2/random with
``none``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("code_root", type=Path)
    ap.add_argument("method")
    ap.add_argument("compensate", choices=("none", "bias", "lstsq"))
    ap.add_argument("kept", type=float)
    ap.add_argument("--seed", type=int, default=0)
    opts = ap.parse_args(argv)
    sys.path.insert(0, str(opts.code_root.resolve()))
    sys.path.insert(1, str(BENCH))
    import numpy as np
    import onnxprune

    import cifar10 as c

    x_eval = np.stack([np.load(c.EVAL_DIR / f"sample_{i:03d}.npy")[0] for i in range(3, 400, 4)])
    ev = c.Evaluator(x_eval)
    out = Path(f"/tmp/cifar10_one_{opts.method}_{opts.compensate}_{opts.kept}_{opts.seed}.onnx")
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnxprune.prune(c.ONNX_PATH, out, method=opts.method, compensate=opts.compensate, seed=opts.seed,
                        calib=str(c.CALIB_DIR), target_macs=opts.kept, eval_samples=0, latency=False, round_to=1)
    r = ev(out)
    widths = {k.removesuffix(".weight"): v[0] for k, v in c.weight_shapes(out).items() if not k.startswith("bn")}
    out.unlink()
    print(json.dumps({"code": str(opts.code_root), "method": opts.method, "compensate": opts.compensate,
                      "seed": opts.seed, "agree": r["agree"], "removed": round(r["removed"], 4),
                      "seconds": round(time.perf_counter() - t), "widths": widths}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
