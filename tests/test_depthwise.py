"""Depthwise Conv (group == C_in, one input channel per group): channels pass through."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxprune
from builders import G, save
from topology import (
    analysis_of, assert_exact, assert_random, consumer_names, group_of, input_shape, node_of, zero_cols,
)

C = 6


def depthwise_model(mult: int, zero: Sequence[int] = (), bn: bool = True) -> onnx.ModelProto:
    """x → c1(C) → Relu → dw(C·mult, group=C) [→ BN] → Relu → head(5).
    ``zero``: c1 channels; head reads every depthwise output made from them as zero."""
    g = G()
    x = g.input("x", [1, 3, 8, 8])
    h = g.op("Relu", [g.conv(x, 3, C, name="c1")])
    h = g.conv(h, C, C * mult, group=C, name="dw")
    if bn:
        h = g.bn(h, C * mult)
    h = g.op("Relu", [h])
    cols = [c * mult + j for c in zero for j in range(mult)]
    y = g.conv(h, C * mult, 5, k=1, name="head", weight=zero_cols(g.w(5, C * mult, 1, 1), cols))
    return g.model([y])


@pytest.mark.parametrize("mult", [1, 2])
def test_depthwise_groups(tmp_path: Path, mult: int) -> None:
    a = analysis_of(tmp_path, depthwise_model(mult))
    g = group_of(a, "c1")
    # The depthwise conv creates no channels of its own: one group from c1 to head.
    assert not any(p.name == "dw" for grp in a.groups for p in grp.producers)
    assert consumer_names(g) == {"head"}
    assert g.n_channels == C and g.prunable
    assert len(a.groups) == 2  # c1 and head


@pytest.mark.parametrize("mult", [1, 2])
def test_depthwise_macs_count_as_prunable(tmp_path: Path, mult: int) -> None:
    # The depthwise conv's filters go with c1's channels: its MACs shrink with the group
    # (torchvision's mobilenet_v2 showed 93 % prunable MACs for 100 %).
    rep = onnxprune.analyze(save(depthwise_model(mult), tmp_path / "m.onnx"))
    assert rep.macs > 0 and rep.prunable_macs == rep.macs


@pytest.mark.parametrize("mult", [1, 2])
def test_depthwise_exact(tmp_path: Path, mult: int) -> None:
    out = assert_exact(tmp_path, depthwise_model(mult, [0, 4]), "c1", [0, 4])
    group = next(a.i for a in node_of(out, "dw").attribute if a.name == "group")
    assert group == C - 2
    assert input_shape(out, "dw", 1) == ((C - 2) * mult, 1, 3, 3)
    assert input_shape(out, "dw", 2) == ((C - 2) * mult,)
    assert input_shape(out, "head", 1) == (5, (C - 2) * mult, 1, 1)


@pytest.mark.parametrize("mult", [1, 2])
def test_depthwise_random(tmp_path: Path, mult: int) -> None:
    for out in assert_random(tmp_path, depthwise_model(mult)):
        group = next(a.i for a in node_of(out, "dw").attribute if a.name == "group")
        assert group == C // 2
        assert input_shape(out, "dw", 1)[0] == group * mult


def test_depthwise_on_graph_input_is_not_a_producer(tmp_path: Path) -> None:
    """A depthwise conv straight on the input has nothing to pass on: no group for it."""
    g = G()
    x = g.input("x", [1, 4, 8, 8])
    h = g.conv(x, 4, 8, group=4, name="dw")
    y = g.conv(h, 8, 3, name="head")
    a = analysis_of(tmp_path, g.model([y]))
    assert [p.name for grp in a.groups for p in grp.producers] == ["head"]


def test_depthwise_in_residual(tmp_path: Path) -> None:
    """MobileNetV2-style: expand → depthwise → project, with a residual around it."""
    g = G()
    x = g.input("x", [1, 3, 8, 8])
    a = g.conv(x, 3, 4, k=1, name="stem")
    h = g.op("Clip", [g.conv(a, 4, 12, k=1, name="expand"), g.const(np.float32(0)), g.const(np.float32(6))])
    h = g.op("Clip", [g.conv(h, 12, 12, group=12, name="dw"), g.const(np.float32(0)), g.const(np.float32(6))])
    h = g.conv(h, 12, 4, k=1, name="project", weight=zero_cols(g.w(4, 12, 1, 1), [5]))
    y = g.conv(g.op("Add", [a, h]), 4, 3, name="head")
    proto = g.model([y])
    an = analysis_of(tmp_path, proto)
    assert {p.name for p in group_of(an, "stem").producers} == {"stem", "project"}
    assert consumer_names(group_of(an, "expand")) == {"project"}
    assert_exact(tmp_path, proto, "expand", [5])
    assert_random(tmp_path, proto, seeds=(0, 1))
