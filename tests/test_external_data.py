"""External data: read (dynamo-style `X.onnx.data`), written beside the output, and used
automatically for outputs too large for one protobuf."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import onnx

import onnxprune
import onnxprune.load
from builders import G, params, run


def _net() -> onnx.ModelProto:
    g = G()
    x = g.input("x", ["N", 3, 8, 8])
    a = g.op("Relu", [g.conv(x, 3, 16, name="c1")])
    b = g.op("Relu", [g.conv(a, 16, 16, name="c2")])
    return g.model([g.op("GlobalAveragePool", [g.conv(b, 16, 4, name="c3")])])


def _feed() -> dict:
    return {"x": np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)}


def test_external_in_external_out(tmp_path):
    src_dir, out_dir = tmp_path / "src", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    src = src_dir / "m.onnx"
    onnx.save(_net(), str(src), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    data_digest = hashlib.sha256((src_dir / "m.onnx.data").read_bytes()).hexdigest()
    out = out_dir / "p.onnx"
    _, result = onnxprune.prune(src, out, ratio=0.5)
    locations = _locations(out)
    (data,) = locations  # relative, beside the model, never the temp name; named by its content
    assert re.fullmatch(r"p\.onnx\.[0-9a-f]{16}\.data", data)
    assert data == f"p.onnx.{hashlib.sha256((out_dir / data).read_bytes()).hexdigest()[:16]}.data"
    assert run(out, _feed())[0].shape == run(src, _feed())[0].shape
    assert result.params_after < result.params_before
    assert hashlib.sha256((src_dir / "m.onnx.data").read_bytes()).hexdigest() == data_digest
    assert sorted(p.name for p in out_dir.iterdir()) == ["p.onnx", data]


def _locations(model) -> set[str]:
    proto = onnx.load(str(model), load_external_data=False)
    return {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}


def test_large_output_goes_to_external_data(tmp_path, monkeypatch):
    # Stand-in for a > 2 GB model: lower the threshold rather than allocate gigabytes.
    monkeypatch.setattr(onnxprune.load, "EXTERNAL_DATA_THRESHOLD", 100)
    src = tmp_path / "m.onnx"
    onnx.save(_net(), str(src))
    out = tmp_path / "p.onnx"
    onnxprune.prune(src, out, ratio=0.25, round_to=1)
    (data,) = _locations(out)
    assert (tmp_path / data).is_file()
    assert params(out) < params(src)
    assert run(out, _feed())[0].shape == (2, 4, 1, 1)


def test_inline_stays_inline(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(_net(), str(src))
    onnxprune.prune(src, tmp_path / "p.onnx", ratio=0.25)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "p.onnx"]
