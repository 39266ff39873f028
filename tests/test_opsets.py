"""Opsets 11 to 21: the same network written in each prunes to a valid, smaller graph."""

from __future__ import annotations

import numpy as np
import pytest

import onnxprune
from builders import G, params, run, save


@pytest.mark.parametrize("opset", [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21])
def test_opset(tmp_path, opset):
    g = G(opset=opset)
    x = g.input("x", ["N", 3, 8, 8])
    a = g.op("Relu", [g.bn(g.conv(x, 3, 8, name="c1"), 8)])
    b = g.op("Relu", [g.bn(g.conv(a, 8, 8, name="c2"), 8)])
    r = g.op("Add", [a, g.conv(b, 8, 8, name="c3")])
    p = g.op("MaxPool", [r], kernel_shape=[2, 2], strides=[2, 2])
    if opset >= 18:
        m = g.op("ReduceMean", [p, g.const(np.array([2, 3], np.int64))], keepdims=0)
    else:
        m = g.op("ReduceMean", [p], axes=[2, 3], keepdims=0)
    y = g.gemm(m, 8, 5, name="fc")
    src = save(g.model([y]), tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    _, result = onnxprune.prune(src, out, method="random", ratio=0.5, seed=opset)
    assert params(out) < params(src)
    feed = {"x": np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)}
    assert run(out, feed)[0].shape == run(src, feed)[0].shape == (3, 5)
