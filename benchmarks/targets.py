#!/usr/bin/env python3
"""Targets met as asked: for each model, ``--target-macs`` (and ``--target-params``) at 0.5
and 0.7, with the automatic 8/16 alignment and with ``--round-to 1``; prints a markdown
table of requested vs achieved (the pruned model's own count, from ``--report``) and
whether it is within the band (``onnxprune.select.TOLERANCE``).

Exact command (from the repo root)::

    PYTHONPATH=. .venv/bin/python benchmarks/targets.py [--models cnn,lenet,effnet,minilm,cifar10] [--calib N] [--cache DIR]

Models and calibration data (small sets: the point is where the budget lands, not quality):

* ``cnn``, ``lenet``: ``models/mnist_cnn.onnx``, ``models/lenet300.onnx`` with
  ``models/data/calib`` (the README's command).
* ``effnet``: ``benchmarks/.cache/effnet_lite0.onnx`` with the first ``--calib`` photos of
  ``benchmarks/.cache/photos`` (ImageNet preprocessing, as ``benchmarks/cost.py``);
  ``--calib 0``: without data (the data-free bisection on the declared 224x224 input).
* ``minilm``: ``benchmarks/.cache/minilm-torchscript.onnx`` with ``--calib`` sequences of 32
  seeded random token ids (no tokenizer needed: MACs depend on the shapes only);
  ``--calib 0``: without data, ``--input-shape`` 1x32.
* ``cifar10``: ``benchmarks/.cache/cifar10_keras.onnx`` with ``benchmarks/.cache/cifar10_calib``
  (built by ``benchmarks/cifar10.py``); skipped with a line when it is not cached.

Every prune is the CLI in a subprocess (``-q --report``) without ``--eval`` or latency.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CACHE = BENCH / ".cache"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PRE_FLAGS = ["--resize", "256", "--crop", "224", "--mean", ",".join(map(str, MEAN)), "--std", ",".join(map(str, STD))]
TARGETS = (0.5, 0.7)
ROUNDING = ("auto", "1")


def model_args(name: str, work: Path, n: int) -> tuple[Path, list[str]] | None:
    """The model file and its calibration flags, or None when the model is not cached."""
    if name in ("cnn", "lenet"):
        return ROOT / "models" / ("mnist_cnn.onnx" if name == "cnn" else "lenet300.onnx"), ["--calib", "models/data/calib"]
    if name == "effnet":
        model, photos = CACHE / "effnet_lite0.onnx", sorted((CACHE / "photos").glob("*.jpg"))[:n]
        if not model.exists():
            return None
        if not n:  # data-free: the declared input is 3x224x224
            return model, []
        folder = work / "effnet-calib"
        folder.mkdir(exist_ok=True)
        for p in photos:
            (folder / p.name).symlink_to(p)
        return model, ["--calib", str(folder), *PRE_FLAGS]
    if name == "minilm":
        model = CACHE / "minilm-torchscript.onnx"
        if not model.exists():
            return None
        if not n:
            return model, ["--input-shape", "input_ids:1,32", "--input-shape", "attention_mask:1,32"]
        rng = np.random.default_rng(0)
        ids = rng.integers(1000, 30000, size=(n, 32)).astype(np.int64)
        ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
        folder = work / "minilm-calib"
        folder.mkdir(exist_ok=True)
        np.savez(folder / "tokens.npz", input_ids=ids, attention_mask=np.ones_like(ids))
        return model, ["--calib", str(folder)]
    if name == "cifar10":
        model, calib = CACHE / "cifar10_keras.onnx", CACHE / "cifar10_calib"
        return (model, ["--calib", str(calib)]) if model.exists() and calib.exists() else None
    raise SystemExit(f"unknown model {name}")


def run(model: Path, flags: list[str], work: Path) -> tuple[dict | None, float, str]:
    """One CLI prune: its report's ``target`` entry, wall seconds, and stderr's last line on failure."""
    report = work / "report.json"
    report.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "onnxprune", str(model), str(work / "out.onnx"), *flags, "-q",
                        "--report", str(report)], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        return None, wall, (p.stderr.strip().splitlines() or ["?"])[-1]
    return json.loads(report.read_text())["target"], wall, ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="cnn,lenet,effnet,minilm,cifar10")
    ap.add_argument("--calib", type=int, default=32, help="calibration samples for effnet and minilm (0: none, the data-free path)")
    ap.add_argument("--params", action="store_true", help="also --target-params")
    ap.add_argument("--cache", type=Path, default=CACHE, help="the cached models and photos (benchmarks/.cache)")
    args = ap.parse_args(argv)
    globals()["CACHE"] = args.cache
    rows = ["| model | target | rounding | requested | achieved | within ±2 points | note | s |",
            "|---|---|---|---|---|---|---|---|"]
    missed = 0
    with tempfile.TemporaryDirectory(prefix="onnxprune-targets-") as d:
        work = Path(d)
        for name in args.models.split(","):
            found = model_args(name, work, args.calib)
            if found is None:
                rows.append(f"| {name} | | | | | not cached: skipped | | |")
                continue
            model, calib = found
            kinds = ("macs", "params") if args.params else ("macs",)
            for kind in kinds:
                for target in TARGETS:
                    for rounding in ROUNDING:
                        flags = [*calib, f"--target-{kind}", str(target)] + ([] if rounding == "auto" else ["--round-to", rounding])
                        t, wall, err = run(model, flags, work)
                        if t is None:
                            missed += 1
                            rows.append(f"| {name} | {kind} | {rounding} | {target} | failed | no | {err} | {wall:.0f} |")
                            continue
                        missed += not t["within_tolerance"]
                        rows.append(f"| {name} | {t['kind']} | {rounding} | {t['requested']:.2f} | {t['achieved']:.3f} | "
                                    f"{'yes' if t['within_tolerance'] else 'no'} | {t['note'] or ''} | {wall:.0f} |")
                        print(rows[-1], file=sys.stderr, flush=True)
    print("\n".join(rows))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
