"""ConvTranspose: W is [C_in, C_out/group, k, k], so it consumes on axis 0 and produces on axis 1."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnx

from builders import G
from topology import analysis_of, assert_exact, assert_random, consumer_names, group_of, input_shape, zero_cols


def convt(g: G, x: str, cin: int, cout: int, name: str, weight=None, group: int = 1) -> str:
    w = weight if weight is not None else g.w(cin, cout // group, 2, 2)
    return g.op("ConvTranspose", [x, g.const(w), g.const(g.w(cout))], name=name, kernel_shape=[2, 2],
                strides=[2, 2], group=group)


def up_model(zero_t: Sequence[int] = (), zero_head: Sequence[int] = ()) -> onnx.ModelProto:
    """x → c1(8) → Relu → up(6, stride 2) → BN → Relu → up2(4) → Relu → head(3).

    ``zero_t``: c1 channels whose up weights (rows of axis 0) are zero;
    ``zero_head``: up channels whose up2 weights are zero."""
    g = G()
    x = g.input("x", [1, 3, 4, 4])
    h = g.op("Relu", [g.conv(x, 3, 8, name="c1")])
    h = g.op("Relu", [g.bn(convt(g, h, 8, 6, "up", weight=zero_cols(g.w(8, 6, 2, 2), list(zero_t), axis=0)), 6)])
    h = g.op("Relu", [convt(g, h, 6, 4, "up2", weight=zero_cols(g.w(6, 4, 2, 2), list(zero_head), axis=0))])
    y = g.conv(h, 4, 3, name="head")
    return g.model([y])


def test_conv_transpose_groups(tmp_path: Path) -> None:
    a = analysis_of(tmp_path, up_model())
    assert consumer_names(group_of(a, "c1")) == {"up"}
    assert consumer_names(group_of(a, "up")) == {"up2"}
    assert consumer_names(group_of(a, "up2")) == {"head"}
    assert group_of(a, "up").n_channels == 6
    assert all(group_of(a, n).prunable for n in ("c1", "up", "up2"))


def test_conv_transpose_exact_input(tmp_path: Path) -> None:
    out = assert_exact(tmp_path, up_model(zero_t=[0, 7]), "c1", [0, 7])
    assert input_shape(out, "up", 1) == (6, 6, 2, 2)


def test_conv_transpose_exact_output(tmp_path: Path) -> None:
    out = assert_exact(tmp_path, up_model(zero_head=[2, 3, 5]), "up", [2, 3, 5])
    assert input_shape(out, "up", 1) == (8, 3, 2, 2)
    assert input_shape(out, "up", 2) == (3,)
    assert input_shape(out, "up2", 1) == (3, 4, 2, 2)


def test_conv_transpose_random(tmp_path: Path) -> None:
    for out in assert_random(tmp_path, up_model()):
        assert input_shape(out, "up", 1) == (4, 3, 2, 2)
        assert input_shape(out, "up2", 1) == (3, 2, 2, 2)


def test_grouped_conv_transpose_is_blocked(tmp_path: Path) -> None:
    """Grouped ConvTranspose is not supported: the group feeding it is blocked, naming it."""
    g = G()
    x = g.input("x", [1, 3, 4, 4])
    h = g.op("Relu", [g.conv(x, 3, 8, name="c1")])
    h = convt(g, h, 8, 4, "up", group=2)
    y = g.conv(h, 4, 3, name="head")
    a = analysis_of(tmp_path, g.model([y]))
    grp = group_of(a, "c1")
    assert not grp.prunable
    assert any("ConvTranspose 'up'" in r and "grouped" in r for r in grp.blocked)
    # up creates no group of its own, so head's input is not pruned either.
    assert not any(p.name == "up" for grp in a.groups for p in grp.producers)
