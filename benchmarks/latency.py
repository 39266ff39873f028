#!/usr/bin/env python3
"""Latency benchmark: does a MACs cut become a measured onnxruntime CPU speedup?

Exact command (from the repo root; about 6 minutes on 2 CPU cores, EfficientNet needs
``benchmarks/assets.py`` first and is skipped without it)::

    .venv/bin/python benchmarks/latency.py [--models mnist_cnn,lenet300,effnet] [--json out.json]

For each model and each share of MACs removed (20, 35, 50, 65 %; EfficientNet-Lite0 30 and
50 %), the model is pruned with ``wanda`` + ``bias`` at ``target_macs = 1 - x`` with
``round_to`` automatic (the default: Conv groups keep their width's alignment), 1, 8
and 16, and the pruned file is timed against the original: onnxruntime
CPU, default optimisation level, one intra-op thread, batch 1 and batch 32; before and
after runs alternate and the median of the per-pair ratios is the speedup (the machine is
shared, its load drifts). Reported: MACs ratio (before/after, onnxprune's counter on the
written file), speedup, and efficiency = speedup / MACs ratio (issue-3 target: >= 0.8),
plus held-out accuracy (MNIST models) so the cost of rounding widths is visible.

Why ``round_to`` matters on a CPU: onnxruntime's NCHWc layout transformer only converts a
Conv whose channel counts are multiples of its block (8 with AVX2, 16 with AVX-512);
otherwise the Conv runs in plain NCHW with layout reorders around it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import onnxruntime as ort  # noqa: E402

import onnxprune  # noqa: E402
from onnxprune.count import count_macs  # noqa: E402
from onnxprune.data import Preprocess  # noqa: E402
from onnxprune.load import load_model  # noqa: E402
from quality import latency_pair, session  # noqa: E402

MODELS = ROOT / "models"
CACHE = ROOT / "benchmarks" / ".cache"
ROUND_TO = (None, 1, 8, 16)  # None: onnxprune's automatic rounding (its default)


def speedup(before: Path, after: Path, feed: dict, seconds: float = 4.0) -> tuple[float, float, float]:
    """``quality.latency_pair`` (alternating runs, one intra-op thread) with as many pairs
    as fit in about ``seconds``: median latency before, after (s), median per-pair speedup."""
    s = session(before)
    s.run(None, feed)
    t = time.perf_counter()
    s.run(None, feed)
    one = time.perf_counter() - t
    return latency_pair(before, after, feed, max(15, int(seconds / 2 / max(one, 1e-6))))


def models(keys: list[str]) -> list[dict]:
    out = []
    heldout = np.load(MODELS / "data" / "eval" / "heldout.npz")["input"]
    labels = np.load(MODELS / "data" / "heldout_labels.npy")
    for key in keys:
        if key in ("mnist_cnn", "lenet300"):
            out.append({"key": key, "path": MODELS / f"{key}.onnx", "calib": MODELS / "data" / "calib",
                        "points": (20, 35, 50, 65), "x": heldout, "y": labels, "kw": {}})
        elif key == "effnet":
            path, photos = CACHE / "effnet_lite0.onnx", CACHE / "photos"
            if not path.exists() or not photos.exists():
                print("effnet: benchmarks/.cache assets missing (run benchmarks/assets.py); skipped", file=sys.stderr)
                continue
            rng = np.random.default_rng(0)
            out.append({"key": key, "path": path, "calib": photos, "points": (30, 50),
                        "x": rng.standard_normal((32, 3, 224, 224)).astype(np.float32), "y": None,
                        "kw": {"preprocess": Preprocess(resize=256, crop=224, mean=(0.485, 0.456, 0.406),
                                                        std=(0.229, 0.224, 0.225)), "max_samples": 64}})
        else:
            raise SystemExit(f"unknown model {key}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mnist_cnn,lenet300,effnet")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-lat-") as d:
        for m in models(args.models.split(",")):
            macs0 = count_macs(load_model(m["path"])[0])
            name = load_model(m["path"])[0].graph.inputs[0].name
            for point in m["points"]:
                for r in ROUND_TO:
                    out = Path(d) / f"{m['key']}-{point}-{r or 'auto'}.onnx"
                    onnxprune.prune(m["path"], out, method="wanda", compensate="bias", calib=m["calib"],
                                    target_macs=1 - point / 100, round_to=r, eval_samples=0, latency=False,
                                    progress=False, **m["kw"])
                    macs = count_macs(load_model(out)[0])
                    row = {"model": m["key"], "point": point, "round_to": r or "auto", "macs_ratio": macs0 / macs,
                           "removed_pct": 100 * (1 - macs / macs0)}
                    if m["y"] is not None:
                        logits = session(out).run(None, {name: m["x"]})[0]
                        row["acc"] = float((logits.argmax(1) == m["y"]).mean())
                    for batch in (1, 32):
                        feed = {name: m["x"][:batch]}
                        tb, ta, s = speedup(m["path"], out, feed)
                        row[f"b{batch}"] = {"before_ms": tb * 1e3, "after_ms": ta * 1e3, "speedup": s,
                                            "efficiency": s / row["macs_ratio"]}
                    rows.append(row)
                    print(f"[{time.perf_counter() - t0:.0f} s] {m['key']} {point}% round_to {r}: "
                          f"b1 eff {row['b1']['efficiency']:.2f}, b32 eff {row['b32']['efficiency']:.2f}", file=sys.stderr)
    print(f"\nonnxruntime {ort.__version__} CPU, 1 intra-op thread, {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| model | MACs removed (target) | round_to | MACs before/after | held-out acc % | batch 1: before ms / after ms | speedup | **efficiency** | batch 32: before ms / after ms | speedup | **efficiency** |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        acc = f"{100 * r['acc']:.1f}" if "acc" in r else "-"
        b1, b32 = r["b1"], r["b32"]
        print(f"| {r['model']} | {r['removed_pct']:.1f} % ({r['point']} %) | {r['round_to']} | {r['macs_ratio']:.2f}× | {acc} | "
              f"{b1['before_ms']:.3f} / {b1['after_ms']:.3f} | {b1['speedup']:.2f}× | **{b1['efficiency']:.2f}** | "
              f"{b32['before_ms']:.2f} / {b32['after_ms']:.2f} | {b32['speedup']:.2f}× | **{b32['efficiency']:.2f}** |")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
