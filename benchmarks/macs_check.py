#!/usr/bin/env python3
"""MAC agreement check: onnxprune's counter against a count from onnxruntime's real tensor shapes.

Exact command (from the repo root; about 30 s on 2 CPU cores, 12 s with `--skip bert_base_random`)::

    .venv/bin/python benchmarks/macs_check.py [--cache DIR] [--skip bert_base_random]

The torchvision zoo exported by ``benchmarks/coverage.py`` (every ``*.onnx`` directly in the
folder; it needs onnx, onnxruntime and onnxprune only, so either venv runs it)::

    /work/venv-tv/bin/python benchmarks/macs_check.py --models-dir benchmarks/.cache/coverage

For every model available offline (the shipped ``models/*.onnx``, every ``*.onnx`` under
``benchmarks/.cache`` (built by ``benchmarks/assets.py``, ``cifar10.py``, ``minilm.py``,
``cost.py``), and two graphs built here with symbolic dims: a detector-like CNN
[batch, 3, height, width] at 320×320 and a VAD-like net [batch, sequence] with a 512-sample
frame Conv at 16,000 samples), one input of batch 1 is fixed (symbolic image dims 224,
text sequences 128 tokens, the built graphs as said) and:

- **onnxprune**: ``count.count_macs(load_model(path), input_shapes)``, what a prune reports
  with that ``--input-shape`` or calibration data of that shape;
- **declared**: ``count_macs(model)`` without input shapes, what a prune without data or
  ``--input-shape`` reports: per unit of any symbolic dim but the batch (a batch that is
  the only symbolic dim is fixed to 1 and the shapes inferred again);
- **onnxruntime**: independent of onnxprune's shape inference: the input file (read with
  onnx, not onnxprune's loader) gets every input and output of each Conv, ConvTranspose,
  Gemm and MatMul of the main graph as graph outputs, runs once in onnxruntime on the
  input, and the MACs are computed from the arrays' real shapes: Conv ``|Y|·|W|/W₀``,
  ConvTranspose ``|X|·|W|/W₀``, Gemm ``M·N·K``, MatMul ``|Y|·K``.

The counts must agree within 2 % (exit 1 otherwise); a model onnxruntime cannot run with
those outputs exposed gets a row saying why and counts as not agreeing (exit 1 as well).
A markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from onnxprune.count import count_macs  # noqa: E402
from onnxprune.load import load_model  # noqa: E402

COUNTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
TOLERANCE = 0.02
IMAGE_SIDE, SEQUENCE = 224, 128
_NP = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(double)": np.float64}


def feed_for(path: Path, sizes: dict[str, int]) -> dict[str, np.ndarray]:
    """One input of batch 1: fixed dims kept, a symbolic dim by its name in ``sizes``, else
    224 (image side) or 128 (sequence).  Token ids are small positive ints, masks ones."""
    rng = np.random.default_rng(0)
    feed = {}
    for inp in ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs():
        shape = []
        for i, d in enumerate(inp.shape):
            if isinstance(d, int) and d > 0:
                shape.append(d)
            elif i == 0 and len(inp.shape) >= 2:
                shape.append(1)
            else:
                shape.append(sizes.get(str(d), IMAGE_SIDE if len(inp.shape) == 4 else SEQUENCE))
        dtype = _NP[inp.type]
        if np.issubdtype(dtype, np.integer):
            feed[inp.name] = np.ones(shape, dtype) if "mask" in inp.name else rng.integers(1, 1000, shape).astype(dtype)
        else:
            feed[inp.name] = rng.standard_normal(shape).astype(dtype)
    return feed


def ort_macs(path: Path, feed: dict[str, np.ndarray]) -> int:
    """MACs from onnxruntime's real tensor shapes: every counted node's inputs and outputs
    become graph outputs (initializers are read from the file), one run on ``feed``."""
    # Weights stay in their external-data file (read by onnxruntime from the model's folder):
    # the graph alone serialises under protobuf's 2 GB limit (vit_h_14, regnet_y_128gf).
    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type in COUNTED]
    wanted = {v for n in nodes for v in list(n.input) + list(n.output) if v and v not in inits}
    existing = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    model.graph.output.extend(helper.make_empty_tensor_value_info(v) for v in sorted(wanted - existing))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    shapes = {n: tuple(np.shape(a)) for n, a in zip(names, sess.run(None, feed))}
    shapes.update(inits)
    shapes.update({k: v.shape for k, v in feed.items()})
    total = 0
    for n in nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "Conv":
            total += math.prod(shapes[n.output[0]]) * math.prod(shapes[n.input[1]][1:])
        elif n.op_type == "ConvTranspose":
            total += math.prod(shapes[n.input[0]]) * math.prod(shapes[n.input[1]][1:])
        elif n.op_type == "Gemm":
            a = shapes[n.input[0]]
            k = a[0] if attrs.get("transA", 0) else a[1]
            total += math.prod(shapes[n.output[0]]) * k
        else:  # MatMul
            total += math.prod(shapes[n.output[0]]) * shapes[n.input[0]][-1]
    return int(total)


def built_models(folder: Path) -> list[tuple[str, Path, dict[str, int]]]:
    """Two graphs with symbolic dims the shipped and cached models lack."""
    from builders import G, save

    g = G()
    x = g.input("images", ["batch", 3, "height", "width"])
    h = g.op("Relu", [g.conv(x, 3, 16, 3, strides=[2, 2])])
    for cin, cout in ((16, 32), (32, 64), (64, 128)):
        h = g.op("Relu", [g.conv(h, cin, cout, 3, strides=[2, 2])])
    det = save(g.model([g.conv(h, 128, 85, 1)]), folder / "detector_symbolic_hw.onnx")

    g = G()
    x = g.input("x", ["batch", "sequence"])
    sr = g.input("sr", [], TensorProto.INT64)
    u = g.op("Unsqueeze", [x, g.const(np.array([1], np.int64))])
    c = g.op("Conv", [u, g.const(g.w(64, 1, 512, scale=0.05)), g.const(g.w(64))], kernel_shape=[512], strides=[256])
    c = g.op("Conv", [g.op("Relu", [c]), g.const(g.w(64, 64, 3)), g.const(g.w(64))], kernel_shape=[3], pads=[1, 1])
    m = g.op("ReduceMean", [g.op("Relu", [c])], axes=[2], keepdims=0)
    y = g.op("Mul", [g.gemm(m, 64, 2), g.op("Cast", [sr], to=TensorProto.FLOAT)])
    vad = save(g.model([y]), folder / "vad_symbolic_sequence.onnx")
    return [("detector (built, symbolic H/W)", det, {"height": 320, "width": 320}),
            ("VAD-like (built, symbolic sequence)", vad, {"sequence": 16000})]


def check_one(name: str, path: Path, sizes: dict[str, int]) -> tuple[str, float | None]:
    """One table row and the relative difference (``None``: onnxruntime could not give shapes)."""
    def why(exc: Exception) -> str:
        return " ".join(f"{type(exc).__name__}: {exc}".split())[:160].replace("|", "\\|")

    feed = feed_for(path, sizes)
    shapes = {k: tuple(v.shape) for k, v in feed.items()}
    inputs = ", ".join(f"{k} {list(v)}" for k, v in shapes.items())
    try:
        model, _ = load_model(path)
        ours, declared = count_macs(model, shapes), count_macs(model)
    except Exception as exc:  # reported as a row: one model must not end the run
        return f"| {name} | {inputs} | not counted: {why(exc)} | - | - | - |", None
    del model
    try:
        theirs = ort_macs(path, feed)
    except Exception as exc:  # the method's limit, not a count: reported, never dropped
        return f"| {name} | {inputs} | {ours:,} | {declared:,} | not compared: {why(exc)} | - |", None
    diff = abs(ours - theirs) / max(theirs, 1)
    return f"| {name} | {inputs} | {ours:,} | {declared:,} | {theirs:,} | {diff:.2%} |", diff


def model_list(args: argparse.Namespace, folder: Path) -> list[tuple[str, Path, dict[str, int]]]:
    """``--models-dir`` folders' models, else the shipped, cached and built ones."""
    if args.models_dir:
        return [(p.stem, p, {}) for d in args.models_dir for p in sorted(d.glob("*.onnx"))
                if not p.name.endswith(".tmp.onnx")]
    models = [(p.stem, p, {}) for p in sorted((ROOT / "models").glob("*.onnx"))]
    models += [(p.stem, p, {}) for p in sorted(args.cache.glob("*.onnx"))] if args.cache.is_dir() else []
    return models + built_models(folder)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache", help="folder of cached benchmark models")
    ap.add_argument("--models-dir", type=Path, action="append", default=[],
                    help="check every *.onnx in this folder instead (repeatable; e.g. benchmarks/.cache/coverage)")
    ap.add_argument("--skip", action="append", default=[], help="skip models whose file stem is this (repeatable)")
    ap.add_argument("--only", action="append", default=[],
                    help="check only models whose file stem matches this fnmatch pattern (repeatable)")
    args = ap.parse_args()
    worst, missed = 0.0, []
    with tempfile.TemporaryDirectory(prefix="macs-check-") as d:
        print("| model | input (batch 1) | onnxprune | declared shapes | onnxruntime shapes | difference |")
        print("|---|---|---:|---:|---:|---:|")
        for name, path, sizes in model_list(args, Path(d)):
            if path.stem in args.skip or (args.only and not any(fnmatch.fnmatchcase(path.stem, p) for p in args.only)):
                continue
            row, diff = check_one(name, path, sizes)
            print(row, flush=True)
            if diff is None:
                missed.append(name)
            else:
                worst = max(worst, diff)
    print(f"\nworst difference {worst:.2%} (bound {TOLERANCE:.0%})")
    if missed:
        print(f"not compared ({len(missed)}): {', '.join(missed)}")
    return 0 if worst <= TOLERANCE and not missed else 1


if __name__ == "__main__":
    sys.exit(main())
