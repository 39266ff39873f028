"""Channels on an axis other than 1: NHWC islands, Gemm chains and [B, T, C] MatMul MLPs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest

from builders import G
from topology import analysis_of, assert_exact, assert_random, consumer_names, group_of, input_shape, zero_cols


def nhwc_model(zero_mm: Sequence[int] = (), zero_head: Sequence[int] = ()) -> onnx.ModelProto:
    """x → c1(8) → Transpose(NHWC) → MatMul(8→6) → Add(bias) → Relu → Transpose(NCHW) → head.

    ``zero_mm``: c1 channels whose MatMul rows are zero; ``zero_head``: MatMul channels
    that head reads as zero."""
    g = G()
    x = g.input("x", [1, 3, 5, 5])
    h = g.op("Relu", [g.conv(x, 3, 8, name="c1")])
    h = g.op("Transpose", [h], perm=[0, 2, 3, 1])
    h = g.op("MatMul", [h, g.const(zero_cols(g.w(8, 6), list(zero_mm), axis=0))], name="mm")
    h = g.op("Relu", [g.op("Add", [h, g.const(g.w(6))], name="bias")])
    h = g.op("Transpose", [h], perm=[0, 3, 1, 2])
    y = g.conv(h, 6, 4, name="head", weight=zero_cols(g.w(4, 6, 3, 3), list(zero_head)))
    return g.model([y])


def test_nhwc_groups(tmp_path: Path) -> None:
    a = analysis_of(tmp_path, nhwc_model())
    assert consumer_names(group_of(a, "c1")) == {"mm"}
    assert consumer_names(group_of(a, "mm")) == {"head"}
    assert a.layouts[next(n for n in a.model.graph if n.name == "mm").outputs[0]].axis == 3
    assert group_of(a, "c1").prunable and group_of(a, "mm").prunable


def test_nhwc_exact(tmp_path: Path) -> None:
    out = assert_exact(tmp_path, nhwc_model(zero_mm=[2, 3]), "c1", [2, 3])
    assert input_shape(out, "mm", 1) == (6, 6)
    out = assert_exact(tmp_path, nhwc_model(zero_head=[0, 5]), "mm", [0, 5])
    assert input_shape(out, "mm", 1) == (8, 4)
    assert input_shape(out, "bias", 1) == (4,)
    assert input_shape(out, "head", 1)[1] == 4


def test_nhwc_random(tmp_path: Path) -> None:
    for out in assert_random(tmp_path, nhwc_model()):
        assert input_shape(out, "mm", 1) == (4, 3)


# ----------------------------------------------------------------------------- Gemm


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_transb(tmp_path: Path, trans_b: int) -> None:
    """x[3,12] → g1(10) → Relu → g2(8) → Relu → g3(4), every Gemm with ``trans_b``."""

    def model(zero: Sequence[int] = ()) -> onnx.ModelProto:
        g = G()
        x = g.input("x", [3, 12])
        h = g.op("Relu", [g.gemm(x, 12, 10, trans_b=trans_b, name="g1")])
        w2 = g.w(8, 10) if trans_b else g.w(10, 8)
        w2 = zero_cols(w2, list(zero), axis=1 if trans_b else 0)
        h = g.op("Relu", [g.gemm(h, 10, 8, trans_b=trans_b, name="g2", weight=w2)])
        return g.model([g.gemm(h, 8, 4, trans_b=trans_b, name="g3")])

    a = analysis_of(tmp_path, model())
    assert consumer_names(group_of(a, "g1")) == {"g2"}
    assert consumer_names(group_of(a, "g2")) == {"g3"}
    out = assert_exact(tmp_path, model([1, 4, 9]), "g1", [1, 4, 9])
    assert input_shape(out, "g1", 1) == ((7, 12) if trans_b else (12, 7))
    assert input_shape(out, "g1", 2) == (7,)
    assert input_shape(out, "g2", 1) == ((8, 7) if trans_b else (7, 8))
    for out in assert_random(tmp_path, model()):
        assert input_shape(out, "g2", 1) == ((4, 5) if trans_b else (5, 4))


# ----------------------------------------------------------------------------- [B, T, C]

D, HID = 8, 16
ACTS = ["relu", "erf-gelu", "silu"]


def mlp_model(act: str, zero: Sequence[int] = (), batch: int | str = 2) -> onnx.ModelProto:
    """Transformer MLP on x[B, T, D]: MatMul(D→HID) → Add(bias) → act → MatMul(HID→D) →
    Add(bias) → residual Add(x) → MatMul(D→3).  ``zero``: fc1 channels whose fc2 rows are zero."""
    g = G()
    x = g.input("x", [batch, 5, D])
    h = g.op("Add", [g.op("MatMul", [x, g.const(g.w(D, HID))], name="fc1"), g.const(g.w(HID))], name="b1")
    if act == "relu":
        h = g.op("Relu", [h])
    elif act == "erf-gelu":
        e = g.op("Erf", [g.op("Div", [h, g.const(np.float32(math.sqrt(2.0)))])])
        h = g.op("Mul", [g.op("Mul", [h, g.op("Add", [e, g.const(np.float32(1.0))])]), g.const(np.float32(0.5))])
    else:
        h = g.op("Mul", [h, g.op("Sigmoid", [h])])
    h = g.op("MatMul", [h, g.const(zero_cols(g.w(HID, D), list(zero), axis=0))], name="fc2")
    h = g.op("Add", [g.op("Add", [h, g.const(g.w(D))], name="b2"), x])
    return g.model([g.op("MatMul", [h, g.const(g.w(D, 3))], name="out")])


@pytest.mark.parametrize("act", ACTS)
def test_mlp_groups(tmp_path: Path, act: str) -> None:
    a = analysis_of(tmp_path, mlp_model(act))
    hidden = group_of(a, "fc1")
    assert consumer_names(hidden) == {"fc2"} and hidden.n_channels == HID and hidden.prunable
    # fc2's channels are added to the graph input x: they cannot go.
    assert not group_of(a, "fc2").prunable


@pytest.mark.parametrize("act", ACTS)
def test_mlp_exact(tmp_path: Path, act: str) -> None:
    removed = [0, 3, 4, 10, 15]
    out = assert_exact(tmp_path, mlp_model(act, removed), "fc1", removed)
    assert input_shape(out, "fc1", 1) == (D, HID - 5)
    assert input_shape(out, "b1", 1) == (HID - 5,)
    assert input_shape(out, "fc2", 1) == (HID - 5, D)


@pytest.mark.parametrize("act", ACTS)
def test_mlp_random(tmp_path: Path, act: str) -> None:
    for out in assert_random(tmp_path, mlp_model(act), seeds=(0, 1)):
        assert input_shape(out, "fc2", 1) == (HID // 2, D)


def test_mlp_dynamic_dims(tmp_path: Path) -> None:
    proto = mlp_model("relu", [1, 2], batch="B")
    assert_exact(tmp_path, proto, "fc1", [1, 2])
    assert_random(tmp_path, mlp_model("relu", batch="B"), seeds=(0,))


def test_matmul_row_axis_is_blocked(tmp_path: Path) -> None:
    """x[B, C, T] @ W[T, N]: the channels are the rows of the product: blocked."""
    g = G()
    x = g.input("x", [1, 3, 6])
    h = g.op("Transpose", [g.op("MatMul", [g.op("Transpose", [x], perm=[0, 2, 1]), g.const(g.w(3, 8))], name="fc1")],
             perm=[0, 2, 1])
    y = g.op("MatMul", [h, g.const(g.w(6, 4))], name="fc2")
    grp = group_of(analysis_of(tmp_path, g.model([y])), "fc1")
    assert not grp.prunable and any("MatMul 'fc2'" in r for r in grp.blocked)


def tokens_to_rows(batch: int | str, target: list[int], zero: Sequence[int] = ()) -> onnx.ModelProto:
    """x[batch, 6, 8] → fc1(6) → Relu → Reshape(target) → Gemm fc2(6→4) → Relu → Gemm out.

    The Gemm works on [batch·tokens, C] rows.  ``zero``: fc1 channels fc2 reads as zero."""
    g = G()
    x = g.input("x", [batch, 6, 8])
    h = g.op("Relu", [g.op("MatMul", [x, g.const(g.w(8, 6))], name="fc1")])
    rows = g.op("Reshape", [h, g.const(np.array(target, np.int64))], name="rows")
    y = g.op("Relu", [g.gemm(rows, 6, 4, name="fc2", weight=zero_cols(g.w(4, 6), list(zero)))])
    return g.model([g.gemm(y, 4, 3, name="out")])


@pytest.mark.parametrize("batch,target", [("B", [-1, 6]), (2, [12, 0]), (2, [12, -1])])
def test_tokens_to_rows(tmp_path: Path, batch: int | str, target: list[int]) -> None:
    """[B, T, C] → [B·T, C]: the channel axis stays whole, whatever the leading dims are
    (a symbolic batch, or a 0 that copies the token count, which happens to equal C)."""
    proto = tokens_to_rows(batch, target, [2, 3])
    grp = group_of(analysis_of(tmp_path, proto), "fc1")
    assert grp.prunable, grp.blocked
    assert consumer_names(grp) == {"fc2"}
    out = assert_exact(tmp_path, proto, "fc1", [2, 3])
    assert input_shape(out, "fc2", 1) == (4, 4)
    for out in assert_random(tmp_path, tokens_to_rows(batch, target), seeds=(0,)):
        assert input_shape(out, "fc2", 1) == (2, 3)
