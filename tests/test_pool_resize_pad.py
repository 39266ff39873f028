"""Ops that touch the spatial axes only pass the channels through; over the channel axis
they block."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from builders import G
from topology import analysis_of, assert_exact, assert_random, consumer_names, group_of, input_shape, node_of

C = 6
i64 = np.int64


def _head_conv(g: G, h: str, zero: list[int], k: int = 3) -> str:
    w = g.w(4, C, k, k)
    w[:, list(zero)] = 0
    return g.conv(h, C, 4, k=k, name="head", weight=w)


def _head_gemm(g: G, h: str, zero: list[int]) -> str:
    w = g.w(4, C)
    w[:, list(zero)] = 0
    return g.gemm(h, C, 4, name="head", weight=w)


# name -> (opset, body(g, h, zero) -> output); ``zero``: channels the head reads as zero.
Body = Callable[[G, str, list[int]], str]
OPS: dict[str, tuple[int, Body]] = {
    "MaxPool": (17, lambda g, h, z: _head_conv(g, g.op("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2]), z)),
    "AveragePool": (17, lambda g, h, z: _head_conv(
        g, g.op("AveragePool", [h], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]), z)),
    "GlobalMaxPool": (17, lambda g, h, z: _head_conv(g, g.op("GlobalMaxPool", [h]), z, k=1)),
    "GlobalAveragePool": (17, lambda g, h, z: _head_conv(g, g.op("GlobalAveragePool", [h]), z, k=1)),
    "ReduceMeanKeep": (17, lambda g, h, z: _head_conv(g, g.op("ReduceMean", [h], axes=[2, 3], keepdims=1), z, k=1)),
    "ReduceMeanNoKeep": (17, lambda g, h, z: _head_gemm(g, g.op("ReduceMean", [h], axes=[2, 3], keepdims=0), z)),
    "ReduceMeanNegAxes": (17, lambda g, h, z: _head_gemm(g, g.op("ReduceMean", [h], axes=[-1, -2], keepdims=0), z)),
    "ReduceMean18Keep": (18, lambda g, h, z: _head_conv(
        g, g.op("ReduceMean", [h, g.const(np.array([2, 3], i64))], keepdims=1), z, k=1)),
    "ReduceMean18NoKeep": (18, lambda g, h, z: _head_gemm(
        g, g.op("ReduceMean", [h, g.const(np.array([2, 3], i64))], keepdims=0), z)),
    "ReduceMaxOneAxis": (18, lambda g, h, z: _head_gemm(
        g, g.op("ReduceMax", [g.op("ReduceMax", [h, g.const(np.array([3], i64))], keepdims=0),
                              g.const(np.array([2], i64))], keepdims=0), z)),
    "ResizeScales": (13, lambda g, h, z: _head_conv(
        g, g.op("Resize", [h, "", g.const(np.array([1, 1, 2, 2], np.float32))], mode="nearest"), z)),
    "ResizeSizes": (13, lambda g, h, z: _head_conv(
        g, g.op("Resize", [h, "", "", g.const(np.array([1, C, 9, 9], i64), name="sizes")], mode="linear"), z)),
    "ResizeScales11": (11, lambda g, h, z: _head_conv(
        g, g.op("Resize", [h, g.const(np.zeros(0, np.float32)), g.const(np.array([1, 1, 2, 2], np.float32))]), z)),
    "Pad": (13, lambda g, h, z: _head_conv(
        g, g.op("Pad", [h, g.const(np.array([0, 0, 1, 2, 0, 0, 2, 1], i64))], mode="constant"), z)),
    "PadReflect": (13, lambda g, h, z: _head_conv(
        g, g.op("Pad", [h, g.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], i64))], mode="reflect"), z)),
    "Pad18Axes": (18, lambda g, h, z: _head_conv(
        g, g.op("Pad", [h, g.const(np.array([1, 2, 2, 1], i64)), g.const(np.float32(0.5)),
                        g.const(np.array([2, 3], i64))]), z)),
    "SoftmaxLastAxis": (13, lambda g, h, z: _head_conv(g, g.op("Softmax", [h], axis=-1), z)),
}


def pool_model(op: str, zero: Sequence[int] = ()) -> onnx.ModelProto:
    """x → c1(C) → Relu → op → head."""
    opset, body = OPS[op]
    g = G(opset=opset)
    x = g.input("x", [1, 3, 6, 6])
    h = g.op("Relu", [g.conv(x, 3, C, name="c1")])
    return g.model([body(g, h, list(zero))])


@pytest.mark.parametrize("op", list(OPS))
def test_spatial_op_exact(tmp_path: Path, op: str) -> None:
    proto = pool_model(op, [0, 3])
    grp = group_of(analysis_of(tmp_path, proto), "c1")
    assert grp.prunable, grp.blocked
    assert consumer_names(grp) == {"head"}
    out = assert_exact(tmp_path, proto, "c1", [0, 3])
    assert input_shape(out, "head", 1)[1] == C - 2
    if op == "ResizeSizes":
        sizes = numpy_helper.to_array(
            next(t for t in onnx.load(str(out)).graph.initializer if t.name == node_of(out, node_of(
                out, "head").input[0].rsplit("_out", 1)[0]).input[3]))
        assert sizes.tolist() == [1, C - 2, 9, 9]


@pytest.mark.parametrize("op", list(OPS))
def test_spatial_op_random(tmp_path: Path, op: str) -> None:
    for out in assert_random(tmp_path, pool_model(op), seeds=(0,)):
        assert input_shape(out, "head", 1)[1] == C // 2


# ----------------------------------------------------------------------------- blocked

BLOCKED: dict[str, tuple[int, Callable[[G, str], str], str]] = {
    "PadChannels": (13, lambda g, h: g.op("Pad", [h, g.const(np.array([0, 1, 0, 0, 0, 1, 0, 0], i64))]),
                    "pads the channel axis"),
    "Pad18ChannelAxis": (18, lambda g, h: g.op("Pad", [h, g.const(np.array([0, 2], i64)), "",
                                                       g.const(np.array([1], i64))]), "pads the channel axis"),
    "ReduceMeanChannels": (17, lambda g, h: g.op("ReduceMean", [h], axes=[1], keepdims=1),
                           "reduces over the channel axis"),
    "ReduceSum18Channels": (18, lambda g, h: g.op("ReduceSum", [h, g.const(np.array([1, 2], i64))], keepdims=0),
                            "reduces over the channel axis"),
    "ReduceMeanAll": (17, lambda g, h: g.op("ReduceMean", [h], keepdims=1), "every axis"),
    "SoftmaxChannels": (13, lambda g, h: g.op("Softmax", [h], axis=1), "normalises over the channel axis"),
    "LogSoftmaxChannels": (13, lambda g, h: g.op("LogSoftmax", [h], axis=-3), "normalises over the channel axis"),
    "Softmax11Coerced": (11, lambda g, h: g.op("Softmax", [h], axis=1), "normalises over the channel axis"),
    "ResizeChannels": (13, lambda g, h: g.op("Resize", [h, "", g.const(np.array([1, 2, 1, 1], np.float32))]),
                       "resizes the channel axis"),
}


@pytest.mark.parametrize("op", list(BLOCKED))
def test_channel_axis_is_blocked(tmp_path: Path, op: str) -> None:
    """The group reaching the op is blocked with a reason naming it; the head behind it,
    which reads a tensor with no prunable channels, is not affected."""
    opset, body, reason = BLOCKED[op]
    g = G(opset=opset)
    x = g.input("x", [1, 3, 6, 6])
    h = body(g, g.op("Relu", [g.conv(x, 3, C, name="c1")]))
    other = g.op("Relu", [g.conv(x, 3, 5, name="c2")])
    # Reduce everything (no axes: valid in every opset) so the two branches meet.
    y = g.op("Mul", [g.op("ReduceMean", [h], keepdims=0),
                     g.op("ReduceMean", [g.conv(other, 5, 2, name="c3")], keepdims=0)])
    proto = g.model([y])
    a = analysis_of(tmp_path, proto)
    grp = group_of(a, "c1")
    assert not grp.prunable
    assert any(reason in r for r in grp.blocked), grp.blocked
    # Another branch is unaffected.
    assert group_of(a, "c2").prunable


def test_maxpool_indices_block(tmp_path: Path) -> None:
    """MaxPool's Indices output encodes channel positions: used or returned, it blocks."""
    for returned in (False, True):
        g = G()
        x = g.input("x", [1, 3, 6, 6])
        y, idx = g.op("MaxPool", [g.conv(x, 3, C, name="c1")], n_out=2, kernel_shape=[2, 2], strides=[2, 2])
        y = g.conv(y, C, 4, name="head")
        if returned:
            proto = g.model([y])
            proto.graph.output.append(onnx.helper.make_tensor_value_info(idx, onnx.TensorProto.INT64, None))
            proto = onnx.shape_inference.infer_shapes(proto)
        else:
            proto = g.model([y, g.op("Cast", [idx], to=onnx.TensorProto.FLOAT)])
        grp = group_of(analysis_of(tmp_path, proto), "c1")
        assert not grp.prunable
        assert any("MaxPool" in r for r in grp.blocked), grp.blocked
