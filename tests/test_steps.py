"""--steps N: rounds compound to the requested budget, recalibrating on the pruned graph."""

from __future__ import annotations

import numpy as np
import pytest

import onnxprune
from builders import G, params, save


def _net():
    g = G()
    x = g.input("x", ["N", 3, 8, 8])
    a = g.op("Relu", [g.conv(x, 3, 16, name="c1")])
    b = g.op("Relu", [g.conv(a, 16, 16, name="c2")])
    return g.model([g.gemm(g.op("Flatten", [g.op("GlobalAveragePool", [b])]), 16, 4, name="fc")])


def _data(n=4):
    return [{"x": np.random.default_rng(i).standard_normal((8, 3, 8, 8)).astype(np.float32)} for i in range(n)]


def test_rounds_compound_to_the_ratio(tmp_path):
    src = save(_net(), tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    _, r = onnxprune.prune(src, out, method="wanda", ratio=0.75, calib=_data(), steps=2)
    kept = {g["producers"][0]: g["kept"] for g in r.groups if not g["blocked"]}
    # 1 - (1 - 0.75)^(1/2) = 0.5 per round: 16 → 8 → 4.
    assert kept == {"Conv 'c1'": 4, "Conv 'c2'": 4}
    assert r.steps == 2 and r.params_before > params(out) == r.params_after


def test_target_macs_over_rounds(tmp_path):
    src = save(_net(), tmp_path / "m.onnx")
    _, r = onnxprune.prune(src, method="flap", target_macs=0.4, calib=_data(), steps=3, compensate="lstsq")
    assert r.macs_after / r.macs_before <= 0.4 + 1e-9
    assert r.fidelity is not None and r.fidelity["samples"] > 0


def test_steps_need_rereadable_data(tmp_path):
    src = save(_net(), tmp_path / "m.onnx")
    with pytest.raises(onnxprune.InputError, match="only be read once"):
        onnxprune.prune(src, method="wanda", calib=(d for d in _data()), steps=2)
    with pytest.raises(onnxprune.InputError, match="--calib"):
        onnxprune.prune(src, method="l1", steps=2)
