"""MACs on real shapes (issue 15, item 4): a detector-like model with symbolic H/W is
counted on ``--input-shape`` or on the calibration data's shapes, equal to a hand count;
without either the report says the count is per unit of the symbolic dims; a MACs target
budgets on the same real-shape counts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

import onnxprune
from builders import G, save
from onnxprune.cli import main
from onnxprune.count import count_macs, estimate_after, macs_by_node
from onnxprune.groups import analyze_groups
from onnxprune.load import load_model
from onnxprune.rewrite import apply_removal


def _detector() -> onnx.ModelProto:
    """images [batch, 3, height, width] → stem 3×3/2 (16) → body 3×3/2 (32) → head 1×1 (8)."""
    g = G()
    x = g.input("images", ["batch", 3, "height", "width"])
    h = g.op("Relu", [g.conv(x, 3, 16, 3, strides=[2, 2], name="stem")])
    h = g.op("Relu", [g.conv(h, 16, 32, 3, strides=[2, 2], name="body")])
    return g.model([g.conv(h, 32, 8, 1, name="head")])


def _hand_count(path: Path, height: int, width: int) -> int:
    """Σ over the Convs of out_channels · out_h · out_w · (in_channels · k_h · k_w), walked
    along the chain from the weights and attributes of the file at ``path``."""
    model = onnx.load(str(path))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    total, h, w = 0, height, width
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        attrs = {a.name: list(a.ints) for a in node.attribute}
        o, i, kh, kw = weights[node.input[1]].shape
        (sh, sw), pads = attrs.get("strides", [1, 1]), attrs.get("pads", [0, 0, 0, 0])
        h, w = (h + pads[0] + pads[2] - kh) // sh + 1, (w + pads[1] + pads[3] - kw) // sw + 1
        total += o * h * w * i * kh * kw
    return total


def test_without_shapes_the_report_says_per_unit(tmp_path):
    src = save(_detector(), tmp_path / "det.onnx")
    report = tmp_path / "r.json"
    assert main([str(src), str(tmp_path / "o.onnx"), "--ratio", "0.5", "--report", str(report), "-q"]) == 0
    macs = json.loads(report.read_text())["macs"]
    assert macs["counted_on"] == "per unit" and macs["input_shapes"] is None
    assert macs["symbolic_dims"] == {"images": ["height", "width"]}
    _, result = onnxprune.prune(src, None, ratio=0.5, latency=False)
    from onnxprune.report import macs_basis_text

    assert "per unit of the symbolic dims (images [height, width]), not a total" in macs_basis_text(result)


def test_input_shape_counts_the_real_macs(tmp_path):
    src, out, report = save(_detector(), tmp_path / "det.onnx"), tmp_path / "o.onnx", tmp_path / "r.json"
    code = main([str(src), str(out), "--input-shape", "images:1,3,64,48", "--ratio", "0.5", "--round-to", "1",
                 "--report", str(report), "-q"])
    assert code == 0
    macs = json.loads(report.read_text())["macs"]
    assert macs["before"] == _hand_count(src, 64, 48) == 16 * 32 * 24 * 27 + 32 * 16 * 12 * 144 + 8 * 16 * 12 * 32
    assert macs["after"] == _hand_count(out, 64, 48)
    assert macs["input_shapes"] == {"images": [1, 3, 64, 48]} and macs["counted_on"] == "--input-shape"
    # The written model keeps its symbolic interface.
    dims = [d.dim_param or d.dim_value for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]


def test_calibration_data_counts_the_real_macs(tmp_path):
    src = save(_detector(), tmp_path / "det.onnx")
    rng = np.random.default_rng(0)
    calib = [{"images": rng.standard_normal((4, 3, 80, 64)).astype(np.float32)} for _ in range(4)]
    _, result = onnxprune.prune(src, tmp_path / "o.onnx", calib=calib, ratio=0.5, round_to=1, latency=False)
    assert result.macs_before == _hand_count(src, 80, 64)
    assert result.macs_after == _hand_count(tmp_path / "o.onnx", 80, 64)
    assert result.macs_input_shapes == {"images": [1, 3, 80, 64]} and result.macs_basis == "calibration data"


def test_the_selection_estimates_on_the_same_counts(tmp_path):
    """estimate_after on the real-shape table equals the real-shape count of the pruned graph:
    a MACs target budgets on what the report then counts."""
    src = save(_detector(), tmp_path / "det.onnx")
    shapes = {"images": (1, 3, 64, 64)}
    model, _ = load_model(src)
    table = macs_by_node(model, shapes)
    analysis = analyze_groups(model, ())
    analysis.node_macs = table
    stem = next(g for g in analysis.groups if g.producers[0].name == "stem")
    body = next(g for g in analysis.groups if g.producers[0].name == "body")
    removed = np.concatenate([stem.classes[:5], body.classes[:20]])
    _, estimate = estimate_after(analysis, removed)
    apply_removal(analysis, removed)
    assert estimate == count_macs(model, shapes) == 11 * 32 * 32 * 27 + 12 * 16 * 16 * 99 + 8 * 16 * 16 * 12


def test_macs_target_is_met_on_real_shapes(tmp_path):
    src, out = save(_detector(), tmp_path / "det.onnx"), tmp_path / "o.onnx"
    _, result = onnxprune.prune(src, out, input_shape={"images": (1, 3, 64, 64)}, target_macs=0.5, round_to=1,
                                latency=False)
    kept = _hand_count(out, 64, 64) / _hand_count(src, 64, 64)
    assert kept == result.macs_after / result.macs_before
    assert 0.45 <= kept <= 0.5


def test_analyze_counts_on_input_shape_or_says_per_unit(tmp_path, capsys):
    src = save(_detector(), tmp_path / "det.onnx")
    report = onnxprune.analyze(src)
    assert report.to_dict()["macs_counted_on"] == "per unit" and report.macs_symbolic == {"images": ["height", "width"]}
    out = tmp_path / "a.json"
    assert main(["analyze", str(src), "--input-shape", "images:1,3,64,48", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["macs"] == _hand_count(src, 64, 48) and d["macs_input_shapes"] == {"images": [1, 3, 64, 48]}
    assert "counted on input shapes images [1, 3, 64, 48]" in " ".join(capsys.readouterr().out.split())
    assert main(["analyze", str(src), "--input-shape", "images:1,3,64"]) == 2
    assert "has rank 3, but input 'images' has rank 4" in capsys.readouterr().err


def _windows() -> onnx.ModelProto:
    """x [batch, 3, 8, 8] → 1×1 Conv (8) → NHWC → Reshape to 4 windows of 16 tokens merged
    with the batch → MatMul 8→6 → Relu; the merged dim is declared ``windows``, a name that
    says nothing of the batch (as an exporter's own dim names do)."""
    g = G()
    x = g.input("x", ["batch", 3, 8, 8])
    h = g.op("Transpose", [g.conv(x, 3, 8, 1)], perm=[0, 2, 3, 1])
    w = g.op("Reshape", [h, g.const(np.array([-1, 16, 8], np.int64))])
    y = g.op("MatMul", [w, g.const(g.w(8, 6))])
    proto = g.model([g.op("Relu", [y])])
    kept = [vi for vi in proto.graph.value_info if vi.name not in (w, y)]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(kept + [onnx.helper.make_tensor_value_info(w, onnx.TensorProto.FLOAT, ["windows", 16, 8]),
                                          onnx.helper.make_tensor_value_info(y, onnx.TensorProto.FLOAT, ["windows", 16, 6])])
    return proto


def test_a_dim_merged_with_the_batch_counts_its_windows(tmp_path):
    # Only the batch is symbolic: the MACs are counted per sample on the declared shapes
    # with the batch fixed to 1, so the exporter's 'windows' dim counts as the 4 windows
    # it holds per sample, not as 1 (Swin v2's TorchScript export, RESULTS "MAC counts on
    # real shapes").
    src = save(_windows(), tmp_path / "win.onnx")
    model, _ = load_model(src)
    per_sample = 8 * 8 * 8 * 3 + 4 * 16 * 6 * 8
    assert count_macs(model) == count_macs(model, {"x": (1, 3, 8, 8)}) == per_sample
    report = onnxprune.analyze(src)
    assert report.macs == per_sample and report.to_dict()["macs_counted_on"] == "declared shapes"
    _, result = onnxprune.prune(src, None, ratio=0.5, latency=False)
    assert result.macs_before == per_sample
