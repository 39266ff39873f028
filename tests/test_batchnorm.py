"""Per-channel normalisation between producer and consumer: its parameters are sliced."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnx
import pytest

from builders import G
from topology import analysis_of, assert_exact, assert_random, consumer_names, group_of, input_shape, node_of, zero_cols

C = 8


def norm_model(where: str, zero: Sequence[int] = ()) -> onnx.ModelProto:
    """x → c1(C) → [BN → Relu | Relu → BN | InstanceNorm → Relu] → c2(6) → BN → Relu → head."""
    g = G()
    x = g.input("x", [1, 3, 8, 8])
    h = g.conv(x, 3, C, name="c1")
    if where == "bn-relu":
        h = g.op("Relu", [g.bn(h, C, name="norm")])
    elif where == "relu-bn":
        h = g.bn(g.op("Relu", [h]), C, name="norm")
    else:
        h = g.op("Relu", [g.op("InstanceNormalization", [h, g.const(1 + 0.1 * g.w(C)), g.const(g.w(C))],
                               name="norm", epsilon=1e-5)])
    h = g.op("Relu", [g.bn(g.conv(h, C, 6, name="c2", weight=zero_cols(g.w(6, C, 3, 3), list(zero))), 6)])
    y = g.conv(h, 6, 4, name="head")
    return g.model([y])


NORMS = ["bn-relu", "relu-bn", "instancenorm"]


@pytest.mark.parametrize("where", NORMS)
def test_norm_groups(tmp_path: Path, where: str) -> None:
    a = analysis_of(tmp_path, norm_model(where))
    assert consumer_names(group_of(a, "c1")) == {"c2"}
    assert consumer_names(group_of(a, "c2")) == {"head"}
    assert group_of(a, "c1").prunable and group_of(a, "c2").prunable


@pytest.mark.parametrize("where", NORMS)
def test_norm_exact(tmp_path: Path, where: str) -> None:
    out = assert_exact(tmp_path, norm_model(where, [0, 3, 5]), "c1", [0, 3, 5])
    norm = node_of(out, "norm")
    for i in range(1, len(norm.input)):
        assert input_shape(out, "norm", i) == (C - 3,)
    assert input_shape(out, "c2", 1)[1] == C - 3


@pytest.mark.parametrize("where", NORMS)
def test_norm_random(tmp_path: Path, where: str) -> None:
    for out in assert_random(tmp_path, norm_model(where)):
        assert input_shape(out, "norm", 1) == (C // 2,)


def test_bn_training_outputs_block(tmp_path: Path) -> None:
    """A BatchNormalization whose running-mean output is used cannot be pruned through."""
    g = G(opset=14)
    x = g.input("x", [1, 3, 8, 8])
    h = g.conv(x, 3, C, name="c1")
    ins = [h] + [g.const(1 + 0.1 * g.w(C)), g.const(g.w(C)), g.const(g.w(C)), g.const(abs(g.w(C)) + 0.5)]
    y, mean, var = g.op("BatchNormalization", ins, n_out=3, training_mode=1, name="norm")
    y = g.conv(y, C, 4, name="head")
    a = analysis_of(tmp_path, g.model([y, mean]))
    grp = group_of(a, "c1")
    assert not grp.prunable
    assert any("BatchNormalization" in r for r in grp.blocked)
