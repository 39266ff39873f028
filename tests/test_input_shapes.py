"""Real input shapes (issue 15, items 1 and 2): a model whose Conv needs a real frame
(a VAD-like net: input [batch, sequence], a scalar int64 sample rate) is refused on the
guessed synthetic feed with a suggestion, and prunes with ``--calib`` data or with
``--input-shape``; the written model keeps its symbolic dims.  Bad ``--input-shape``
values are exit 2 in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

import onnxprune
from builders import G, run, save
from onnxprune.cli import main
from onnxprune.config import PruneConfig
from test_bad_input import expect_refusal

FRAME, HOP = 512, 256


def _vad() -> onnx.ModelProto:
    """x [batch, sequence] → [batch, 1, sequence] → Conv k=512 stride 256 (16) → Relu →
    Conv k=3 (16) → Relu → Conv k=1 (4) → mean over time, scaled by the sample rate sr/16000
    (a scalar int64 input)."""
    g = G()
    x = g.input("x", ["batch", "sequence"])
    sr = g.input("sr", [], TensorProto.INT64)
    u = g.op("Unsqueeze", [x, g.const(np.array([1], np.int64))])
    c1 = g.op("Conv", [u, g.const(g.w(16, 1, FRAME, scale=0.05)), g.const(g.w(16))], name="frame",
              kernel_shape=[FRAME], strides=[HOP])
    c2 = g.op("Conv", [g.op("Relu", [c1]), g.const(g.w(16, 16, 3)), g.const(g.w(16))], name="mid",
              kernel_shape=[3], pads=[1, 1])
    c3 = g.op("Conv", [g.op("Relu", [c2]), g.const(g.w(4, 16, 1)), g.const(g.w(4))], name="head", kernel_shape=[1])
    m = g.op("ReduceMean", [c3], axes=[2], keepdims=0)
    scale = g.op("Div", [g.op("Cast", [sr], to=TensorProto.FLOAT), g.const(np.array(16000, np.float32))])
    return g.model([g.op("Mul", [m, scale], name="out")])


def _hand_macs(sequence: int, frame: int = 16, mid: int = 16) -> int:
    """Conv MACs of :func:`_vad` (``frame``/``mid`` channels kept) on one sample of ``sequence``."""
    t = (sequence - FRAME) // HOP + 1
    return frame * t * FRAME + mid * t * frame * 3 + 4 * t * mid


def _samples(n: int, sequence: int = 1024, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((4, sequence)).astype(np.float32), "sr": np.array(16000, np.int64)}
            for _ in range(n)]


def _npz_folder(folder: Path, n: int = 10) -> Path:
    folder.mkdir()
    for i, s in enumerate(_samples(n)):
        np.savez(folder / f"s{i:02d}.npz", **s)
    return folder


def _keeps_symbolic_interface(path: Path) -> None:
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in onnx.load(str(path)).graph.input}
    assert inputs == {"x": ["batch", "sequence"], "sr": []}


def test_fixed_frame_model_without_data_is_refused_with_a_suggestion(capsys, tmp_path):
    src = save(_vad(), tmp_path / "vad.onnx")
    line = expect_refusal(capsys, tmp_path, [str(src), str(tmp_path / "o.onnx"), "-q"], [src], "cannot run the input model")
    # The line names every input with the dims it was fed, and what to give instead.
    assert "input 'x' float32 [2, 64]" in line and "input 'sr' int64 []" in line
    assert "--input-shape" in line and "--calib" in line


def test_fixed_frame_model_prunes_with_calibration_data(tmp_path):
    """The reference run and the checks use the first calibration samples: no guessed size."""
    src = save(_vad(), tmp_path / "vad.onnx")
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    calib = _npz_folder(tmp_path / "calib")
    code = main([str(src), str(out), "--calib", str(calib), "--ratio", "0.5", "--round-to", "1", "--report", str(report), "-q"])
    assert code == 0
    _keeps_symbolic_interface(out)
    r = json.loads(report.read_text())
    assert r["macs"]["input_shapes"] == {"x": [1, 1024], "sr": []} and r["macs"]["counted_on"] == "calibration data"
    assert r["macs"]["before"] == _hand_macs(1024) and r["macs"]["after"] == _hand_macs(1024, 8, 8)
    # The pruned model still takes any length and any sample rate.
    feed = {"x": np.random.default_rng(5).standard_normal((3, 2048)).astype(np.float32), "sr": np.array(8000, np.int64)}
    assert run(out, feed)[0].shape == (3, 4)


def test_fixed_frame_model_prunes_with_input_shape(tmp_path):
    src = save(_vad(), tmp_path / "vad.onnx")
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    code = main([str(src), str(out), "--input-shape", "x:2,1024", "--ratio", "0.5", "--round-to", "1", "--report", str(report), "-q"])
    assert code == 0
    _keeps_symbolic_interface(out)
    r = json.loads(report.read_text())
    # Counted per sample: the batch of --input-shape counts as 1.
    assert r["macs"]["input_shapes"] == {"x": [1, 1024]} and r["macs"]["counted_on"] == "--input-shape"
    assert r["macs"]["before"] == _hand_macs(1024) and r["macs"]["after"] == _hand_macs(1024, 8, 8)


def test_input_shape_through_the_api(tmp_path):
    src = save(_vad(), tmp_path / "vad.onnx")
    _, result = onnxprune.prune(src, None, input_shape={"x": [1, 1536]}, ratio=0.25, latency=False)
    assert result.macs_before == _hand_macs(1536) and result.macs_input_shapes == {"x": [1, 1536]}
    # --calib wins for the runs, --input-shape for the count.
    _, result = onnxprune.prune(src, None, calib=_samples(6), input_shape={"x": [1, 1536]}, ratio=0.25, latency=False)
    assert result.macs_before == _hand_macs(1536) and result.macs_input_shapes == {"x": [1, 1536], "sr": []}


@pytest.mark.parametrize("args, needle", [
    (["--input-shape", "y:1,1024"], "names input 'y', which the model does not have (inputs: x, sr)"),
    (["--input-shape", "x:1,2,1024"], "has rank 3, but input 'x' has rank 2"),
    (["--input-shape", "x:1,0"], "dims must be positive"),
    (["--input-shape", "x:1,-512"], "dims must be positive"),
    (["--input-shape", "x:1,a"], "comma-separated whole numbers"),
    (["--input-shape", "1,1024"], "takes NAME:D0,D1,..."),
    (["--input-shape", "x:1,1024", "--input-shape", "x:1,2048"], "gives input 'x' twice"),
])
def test_bad_input_shape_is_refused(capsys, tmp_path, args, needle):
    src = save(_vad(), tmp_path / "vad.onnx")
    expect_refusal(capsys, tmp_path, [str(src), str(tmp_path / "o.onnx"), *args, "-q"], [src], needle)


def test_input_shape_conflicting_with_a_fixed_dim_is_refused(capsys, tmp_path):
    g = G()
    x = g.input("x", ["N", 3, "H", "W"])
    src = save(g.model([g.conv(g.op("Relu", [g.conv(x, 3, 8)]), 8, 2)]), tmp_path / "m.onnx")
    expect_refusal(capsys, tmp_path, [str(src), str(tmp_path / "o.onnx"), "--input-shape", "x:1,4,32,32", "-q"], [src],
                   "sets dim 1 to 4, but the model fixes it to 3")


@pytest.mark.parametrize("value, needle", [
    ({"x": (1, 0)}, "dims must be positive"),
    ({"x": (1, 2.5)}, "dims must be whole numbers"),
    ({"x": "1,1024"}, "dims must be a sequence"),
    ({"x": ()}, "no dims given"),
    ([("x", (1, 2))], "takes a dict"),
])
def test_bad_input_shape_fails_at_construction(value, needle):
    with pytest.raises(onnxprune.InputError, match=needle):
        PruneConfig(input_shape=value)


def test_scalar_input_that_changes_within_a_batch_is_refused(tmp_path):
    src = save(_vad(), tmp_path / "vad.onnx")
    calib = _samples(4)
    calib[1]["sr"] = np.array(8000, np.int64)
    with pytest.raises(onnxprune.InputError, match="scalar input 'sr' changes value between calibration samples"):
        onnxprune.prune(src, None, calib=calib, batch_size=32, latency=False)
