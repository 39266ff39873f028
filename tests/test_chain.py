"""Plain chains: Conv→Relu→Conv→Relu→Conv and Gemm→Relu→Gemm→Relu→Gemm."""

from __future__ import annotations

from pathlib import Path

import onnx

from builders import G
from topology import analysis_of, assert_exact, assert_random, consumer_names, group_of, input_shape, zero_cols


def conv_chain(zero: dict[str, list[int]] | None = None) -> onnx.ModelProto:
    """x → c1(8) → Relu → c2(6) → Relu → c3(4); ``zero`` names a consumer and the input
    channels whose weights it reads as zero."""
    zero = zero or {}
    g = G()
    x = g.input("x", [1, 3, 8, 8])
    weights = {"c2": g.w(6, 8, 3, 3), "c3": g.w(4, 6, 3, 3)}
    for name, chans in zero.items():
        weights[name] = zero_cols(weights[name], chans)
    h = g.op("Relu", [g.conv(x, 3, 8, name="c1")])
    h = g.op("Relu", [g.conv(h, 8, 6, name="c2", weight=weights["c2"])])
    y = g.conv(h, 6, 4, name="c3", weight=weights["c3"])
    return g.model([y])


def gemm_chain(zero: dict[str, list[int]] | None = None) -> onnx.ModelProto:
    """x[2,10] → g1(16) → Relu → g2(12, transB=0) → Relu → g3(5)."""
    zero = zero or {}
    g = G()
    x = g.input("x", [2, 10])
    weights = {"g2": g.w(16, 12), "g3": g.w(5, 12)}  # g2 is [K, N] (transB=0), g3 [N, K]
    if "g2" in zero:
        weights["g2"] = zero_cols(weights["g2"], zero["g2"], axis=0)
    if "g3" in zero:
        weights["g3"] = zero_cols(weights["g3"], zero["g3"], axis=1)
    h = g.op("Relu", [g.gemm(x, 10, 16, name="g1")])
    h = g.op("Relu", [g.gemm(h, 16, 12, trans_b=0, name="g2", weight=weights["g2"])])
    y = g.gemm(h, 12, 5, name="g3", weight=weights["g3"])
    return g.model([y])


def test_conv_chain_groups(tmp_path: Path) -> None:
    a = analysis_of(tmp_path, conv_chain())
    assert len(a.groups) == 3
    assert consumer_names(group_of(a, "c1")) == {"c2"}
    assert consumer_names(group_of(a, "c2")) == {"c3"}
    assert group_of(a, "c1").prunable and group_of(a, "c2").prunable
    last = group_of(a, "c3")
    assert not last.prunable and any("graph output" in r for r in last.blocked)


def test_conv_chain_exact_first(tmp_path: Path) -> None:
    out = assert_exact(tmp_path, conv_chain({"c2": [0, 3, 7]}), "c1", [0, 3, 7])
    assert input_shape(out, "c1", 1) == (5, 3, 3, 3)
    assert input_shape(out, "c1", 2) == (5,)
    assert input_shape(out, "c2", 1) == (6, 5, 3, 3)


def test_conv_chain_exact_middle(tmp_path: Path) -> None:
    out = assert_exact(tmp_path, conv_chain({"c3": [1, 2]}), "c2", [1, 2])
    assert input_shape(out, "c2", 1) == (4, 8, 3, 3)
    assert input_shape(out, "c3", 1) == (4, 4, 3, 3)


def test_conv_chain_random(tmp_path: Path) -> None:
    outs = assert_random(tmp_path, conv_chain())
    assert input_shape(outs[0], "c1", 1)[0] == 4  # floor(0.5 * 8) removed
    assert input_shape(outs[0], "c2", 1)[:2] == (3, 4)


def test_gemm_chain_groups(tmp_path: Path) -> None:
    a = analysis_of(tmp_path, gemm_chain())
    assert consumer_names(group_of(a, "g1")) == {"g2"}
    assert consumer_names(group_of(a, "g2")) == {"g3"}


def test_gemm_chain_exact(tmp_path: Path) -> None:
    out = assert_exact(tmp_path, gemm_chain({"g2": [2, 5, 11]}), "g1", [2, 5, 11])
    assert input_shape(out, "g1", 1) == (13, 10)
    assert input_shape(out, "g2", 1) == (13, 12)
    out = assert_exact(tmp_path, gemm_chain({"g3": [0, 4]}), "g2", [0, 4])
    assert input_shape(out, "g2", 1) == (16, 10)
    assert input_shape(out, "g2", 2) == (10,)
    assert input_shape(out, "g3", 1) == (5, 10)


def test_gemm_chain_random(tmp_path: Path) -> None:
    assert_random(tmp_path, gemm_chain())
