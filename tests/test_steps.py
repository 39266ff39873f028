"""--steps N: rounds compound to the requested budget, recalibrating on the pruned graph."""

from __future__ import annotations

import numpy as np
import pytest

import onnxprune
from builders import G, random_batches, small_cnn, params, save


def _net():
    return small_cnn()


def _data(n=4):
    return random_batches(n)


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
