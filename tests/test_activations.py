"""Every elementwise op of the op table between a producer and its consumer: channels pass
through, per-channel constants ([C,1,1] slopes, scales, offsets) are sliced."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest

from builders import G
from topology import analysis_of, assert_exact, assert_random, consumer_names, group_of, input_shape, zero_cols

C = 6
f32 = np.float32


def _pos(g: G, h: str) -> str:
    """|h| + 1: a positive input for ops defined on positives only."""
    return g.op("Add", [g.op("Abs", [h]), g.const(f32(1.0))])


def _per_channel(g: G, lo: float = 0.5) -> str:
    """A [C,1,1] constant, away from zero (it may be a divisor)."""
    return g.const((lo + np.abs(g.w(C, 1, 1))).astype(f32), name=g.name("pc"))


def _erf_gelu(g: G, h: str) -> str:
    e = g.op("Erf", [g.op("Div", [h, g.const(f32(math.sqrt(2.0)))])])
    return g.op("Mul", [g.op("Mul", [h, g.op("Add", [e, g.const(f32(1.0))])]), g.const(f32(0.5))])


def _tanh_gelu(g: G, h: str) -> str:
    cube = g.op("Pow", [h, g.const(f32(3.0))])
    inner = g.op("Add", [h, g.op("Mul", [cube, g.const(f32(0.044715))])])
    t = g.op("Tanh", [g.op("Mul", [inner, g.const(f32(math.sqrt(2.0 / math.pi)))])])
    return g.op("Mul", [g.op("Mul", [h, g.const(f32(0.5))]), g.op("Add", [t, g.const(f32(1.0))])])


# name -> (opset, build(g, h) -> out)
ACTS: dict[str, tuple[int, Callable[[G, str], str]]] = {
    "Relu": (17, lambda g, h: g.op("Relu", [h])),
    "LeakyRelu": (17, lambda g, h: g.op("LeakyRelu", [h], alpha=0.1)),
    "PRelu": (17, lambda g, h: g.op("PRelu", [h, _per_channel(g, 0.0)])),
    "PReluScalar": (17, lambda g, h: g.op("PRelu", [h, g.const(np.array([0.2], f32))])),
    "Sigmoid": (17, lambda g, h: g.op("Sigmoid", [h])),
    "Tanh": (17, lambda g, h: g.op("Tanh", [h])),
    "HardSigmoid": (17, lambda g, h: g.op("HardSigmoid", [h], alpha=0.2, beta=0.5)),
    "HardSwish": (17, lambda g, h: g.op("HardSwish", [h])),
    "Clip": (17, lambda g, h: g.op("Clip", [h, g.const(f32(-0.5)), g.const(f32(0.7))])),
    "ClipMaxOnly": (17, lambda g, h: g.op("Clip", [h, "", g.const(f32(6.0))])),
    "Elu": (17, lambda g, h: g.op("Elu", [h], alpha=0.9)),
    "Selu": (17, lambda g, h: g.op("Selu", [h])),
    "Celu": (17, lambda g, h: g.op("Celu", [h], alpha=1.2)),
    "Softplus": (17, lambda g, h: g.op("Softplus", [h])),
    "Softsign": (17, lambda g, h: g.op("Softsign", [h])),
    "Mish": (18, lambda g, h: g.op("Mish", [h])),
    "ThresholdedRelu": (17, lambda g, h: g.op("ThresholdedRelu", [h], alpha=0.3)),
    "Shrink": (17, lambda g, h: g.op("Shrink", [h], lambd=0.2, bias=0.1)),
    "Gelu": (20, lambda g, h: g.op("Gelu", [h])),
    "GeluTanh": (20, lambda g, h: g.op("Gelu", [h], approximate="tanh")),
    "ErfGelu": (17, _erf_gelu),
    "TanhGelu": (17, _tanh_gelu),
    "SiLU": (17, lambda g, h: g.op("Mul", [h, g.op("Sigmoid", [h])])),
    "SiLUSwapped": (17, lambda g, h: g.op("Mul", [g.op("Sigmoid", [h]), h])),
    "Identity": (17, lambda g, h: g.op("Identity", [h])),
    "Dropout": (17, lambda g, h: g.op("Dropout", [h])),
    "Cast": (17, lambda g, h: g.op("Cast", [h], to=onnx.TensorProto.FLOAT)),
    "Neg": (17, lambda g, h: g.op("Neg", [h])),
    "Abs": (17, lambda g, h: g.op("Abs", [h])),
    "Sqrt": (17, lambda g, h: g.op("Sqrt", [_pos(g, h)])),
    "Exp": (17, lambda g, h: g.op("Exp", [g.op("Tanh", [h])])),
    "Log": (17, lambda g, h: g.op("Log", [_pos(g, h)])),
    "Reciprocal": (17, lambda g, h: g.op("Reciprocal", [_pos(g, h)])),
    "Floor": (17, lambda g, h: g.op("Floor", [h])),
    "Ceil": (17, lambda g, h: g.op("Ceil", [h])),
    "Round": (17, lambda g, h: g.op("Round", [h])),
    "Sin": (17, lambda g, h: g.op("Sin", [h])),
    "Cos": (17, lambda g, h: g.op("Cos", [h])),
    "Sign": (17, lambda g, h: g.op("Sign", [h])),
    "Erf": (17, lambda g, h: g.op("Erf", [h])),
    # broadcasting binary ops with a scalar and with a per-channel constant
    "AddScalar": (17, lambda g, h: g.op("Add", [h, g.const(f32(0.3))])),
    "AddPerChannel": (17, lambda g, h: g.op("Add", [h, _per_channel(g)])),
    "SubScalarFirst": (17, lambda g, h: g.op("Sub", [g.const(f32(0.3)), h])),
    "SubPerChannel": (17, lambda g, h: g.op("Sub", [h, _per_channel(g)])),
    "SubPerChannelFirst": (17, lambda g, h: g.op("Sub", [_per_channel(g), h])),
    "MulScalar": (17, lambda g, h: g.op("Mul", [h, g.const(f32(1.7))])),
    "MulPerChannel": (17, lambda g, h: g.op("Mul", [h, _per_channel(g)])),
    "MulPerChannel4d": (17, lambda g, h: g.op("Mul", [g.const((1 + g.w(1, C, 1, 1)).astype(f32)), h])),
    "DivScalar": (17, lambda g, h: g.op("Div", [h, g.const(f32(2.5))])),
    "DivPerChannel": (17, lambda g, h: g.op("Div", [h, _per_channel(g)])),
    "DivByPerChannel": (17, lambda g, h: g.op("Div", [_per_channel(g), _pos(g, h)])),
    "PowScalar": (17, lambda g, h: g.op("Pow", [h, g.const(f32(2.0))])),
    "MaxPerChannel": (17, lambda g, h: g.op("Max", [h, _per_channel(g, -1.0)])),
    "MinScalar": (17, lambda g, h: g.op("Min", [h, g.const(f32(0.4))])),
    "SumSelf": (17, lambda g, h: g.op("Sum", [h, h, _per_channel(g)])),
    "MeanSelf": (17, lambda g, h: g.op("Mean", [h, g.op("Relu", [h])])),
}


def act_model(act: str, zero: Sequence[int] = ()) -> onnx.ModelProto:
    """x → c1(C) → act → c2(4) → Relu → head(3).  ``zero``: c1 channels c2 reads as zero."""
    opset, build = ACTS[act]
    g = G(opset=opset)
    x = g.input("x", [1, 3, 6, 6])
    h = build(g, g.conv(x, 3, C, name="c1"))
    h = g.op("Relu", [g.conv(h, C, 4, name="c2", weight=zero_cols(g.w(4, C, 3, 3), list(zero)))])
    return g.model([g.conv(h, 4, 3, name="head")])


@pytest.mark.parametrize("act", list(ACTS))
def test_activation_exact(tmp_path: Path, act: str) -> None:
    proto = act_model(act, [1, 4])
    grp = group_of(analysis_of(tmp_path, proto), "c1")
    assert grp.prunable, grp.blocked
    assert consumer_names(grp) == {"c2"} and grp.n_channels == C
    out = assert_exact(tmp_path, proto, "c1", [1, 4])
    assert input_shape(out, "c2", 1)[1] == C - 2
    proto = onnx.load(str(out))
    # Every per-channel constant was sliced with the channels.
    for t in proto.graph.initializer:
        if t.name.startswith("pc"):
            assert C not in t.dims and (C - 2) in t.dims


@pytest.mark.parametrize("act", list(ACTS))
def test_activation_random(tmp_path: Path, act: str) -> None:
    for out in assert_random(tmp_path, act_model(act), seeds=(0,)):
        assert input_shape(out, "c1", 1)[0] == C // 2
