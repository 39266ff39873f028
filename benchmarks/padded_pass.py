#!/usr/bin/env python3
"""One plain onnxruntime pass of all-MiniLM-L6-v2 over cost.py's 256 calibration sentences
(padded to 48 tokens, batches of 32), as given and with the batches sorted by length and cut
as onnxprune.padding cuts them: what the padding cut saves a plain pass, beside cost.py's
ratios, which divide by the padded pass.  Also checks that the cut leaves the outputs at the
real positions as they were.

    .venv/bin/python benchmarks/padded_pass.py --calib DIR [--repeat 3]

``--calib``: a folder of ``.npz`` sentences as cost.py writes them for its ``minilm`` row
(``text_case``: 256 sentences, keys ``input_ids`` and ``attention_mask``, 48 tokens).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    import onnxruntime as ort

    from onnxprune.padding import find_padding, sorted_batches

    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", required=True)
    ap.add_argument("--model", default=str(ROOT / "benchmarks/.cache/minilm-torchscript.onnx"))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    files = sorted(Path(args.calib).glob("*.npz"))
    samples = [dict(np.load(f)) for f in files]
    names = list(samples[0])
    padded = [{k: np.stack([s[k] for s in samples[i : i + 32]]) for k in names} for i in range(0, len(samples), 32)]
    sess = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    pad = find_padding(sess.get_inputs())
    cut = list(sorted_batches(padded, pad, 8))
    real = sum(int(b[pad.mask].sum()) for b in padded)
    print(f"{len(samples)} samples, {real / sum(b[pad.mask].size for b in padded):.1%} of padded positions real, "
          f"{sum(b[pad.mask].size for b in cut) / sum(b[pad.mask].size for b in padded):.1%} kept by the cut")
    sess.run(None, padded[0])
    times: dict[str, list[float]] = {"padded": [], "cut": []}
    for _ in range(args.repeat):
        for label, feeds in (("padded", padded), ("cut", cut)):
            t0 = time.perf_counter()
            for f in feeds:
                sess.run(None, f)
            times[label].append(time.perf_counter() - t0)
    for label, ts in times.items():
        print(f"{label:7s} pass: median {np.median(ts):.3f} s of {args.repeat}")
    print(f"cut / padded: {np.median(times['cut']) / np.median(times['padded']):.2f}")


if __name__ == "__main__":
    main()
