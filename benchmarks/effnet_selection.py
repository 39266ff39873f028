#!/usr/bin/env python3
"""EfficientNet-Lite0 at 70 % of its MACs: three ways to spread the budget over the groups,
same criterion (wanda), same MACs, bias and lstsq compensation: a uniform per-group ratio,
the global (per-group standardised) threshold (``--target-macs --global``), and the
allocation by measured sensitivity (``--target-macs`` with data, ``onnxprune/allocate.py``).

    .venv/bin/python benchmarks/assets.py
    .venv/bin/python benchmarks/effnet_selection.py [--target 0.7] [--compensate bias lstsq]

The uniform ratio is found by bisection on onnxprune's own MACs estimate, then both
selections run through ``onnxprune.prune`` on the 300 calibration photos and are scored by
top-1 agreement with the unpruned model on the 100 held-out photos (``effnet.py``'s split).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import onnxprune  # noqa: E402
from assets import EFFNET  # noqa: E402
from effnet import PRE, split_folders  # noqa: E402
from onnxprune.count import count_macs, estimate_after  # noqa: E402
from onnxprune.groups import analyze_groups  # noqa: E402
from onnxprune.load import load_model  # noqa: E402
from onnxprune.select import select  # noqa: E402


def uniform_ratio(target: float, round_to: int | None) -> float:
    """The per-group ratio whose removal keeps ``target`` of the MACs (onnxprune's estimate)."""
    model, _ = load_model(EFFNET)
    analysis = analyze_groups(model)
    base = count_macs(model)
    groups = [g for g in analysis.groups if g.prunable]
    order = {g.id: np.arange(len(g.classes), dtype=float) for g in groups}  # counts only
    lo, hi = 0.0, 0.99
    for _ in range(25):
        mid = (lo + hi) / 2
        removed = np.concatenate(list(select(groups, order, mid, round_to=round_to).values()))
        if estimate_after(analysis, removed)[1] / base <= target:
            hi = mid
        else:
            lo = mid
    return hi


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=0.7)
    ap.add_argument("--compensate", nargs="+", default=["bias", "lstsq"])
    ap.add_argument("--round-to", type=int, default=None, help="default: onnxprune's automatic rounding")
    args = ap.parse_args(argv)
    ratio = uniform_ratio(args.target, args.round_to)
    print(f"uniform ratio {ratio:.4f} for {args.target:g} of the MACs", flush=True)
    calib, held = split_folders(None, None)
    print("| selection | --compensate | MACs kept | top-1 agreement | rel. L2 (logits) | latency speedup | prune s | of which select s |")
    print("|---|---|---|---|---|---|---|---|")
    out = ROOT / "benchmarks" / ".cache"
    for comp in args.compensate:
        for how, budget in (("uniform --ratio", {"ratio": ratio}),
                            ("global threshold (--target-macs --global)", {"target_macs": args.target, "global_": True}),
                            ("measured sensitivity (--target-macs)", {"target_macs": args.target})):
            t = time.perf_counter()
            _, res = onnxprune.prune(EFFNET, out / "effnet_selection.onnx", method="wanda", calib=str(calib),
                                     preprocess=PRE, compensate=comp, eval_data=str(held), batch_size=32,
                                     round_to=args.round_to, **budget)
            print(f"| {how} | {comp} | {res.macs_after / res.macs_before:.1%} | {res.fidelity['agreement']:.1%} | "
                  f"{res.fidelity['rel_l2']:.3f} | {res.latency['speedup']:.2f}× | {time.perf_counter() - t:.0f} | "
                  f"{res.seconds['select']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
