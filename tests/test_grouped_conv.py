"""Grouped (non-depthwise) Conv: input channel j of every group shares W's column j, so
those channels go together; output channel j of every group goes together too."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnx
import pytest

from builders import G
from topology import analysis_of, assert_exact, assert_random, consumer_names, group_of, input_shape, node_of

CIN, COUT = 8, 12


def grouped_model(groups: int, zero_in: Sequence[int] = (), zero_out: Sequence[int] = ()) -> onnx.ModelProto:
    """x → c1(8) → Relu → gc(12, group=groups) → Relu → head(5).

    ``zero_in``: local input indices j that gc reads as zero in every group;
    ``zero_out``: local output indices j that head reads as zero in every group."""
    g = G()
    x = g.input("x", [1, 3, 8, 8])
    h = g.op("Relu", [g.conv(x, 3, CIN, name="c1")])
    w = g.w(COUT, CIN // groups, 3, 3)
    w[:, list(zero_in)] = 0
    h = g.op("Relu", [g.conv(h, CIN, COUT, group=groups, name="gc", weight=w)])
    wh = g.w(5, COUT, 3, 3)
    per = COUT // groups
    wh[:, [k * per + j for k in range(groups) for j in zero_out]] = 0
    y = g.conv(h, COUT, 5, name="head", weight=wh)
    return g.model([y])


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_groups(tmp_path: Path, groups: int) -> None:
    a = analysis_of(tmp_path, grouped_model(groups))
    inp, out = group_of(a, "c1"), group_of(a, "gc")
    assert consumer_names(inp) == {"gc"} and consumer_names(out) == {"head"}
    # Channels are counted as classes: one per local index.
    assert inp.n_channels == CIN // groups and len(inp.classes) == CIN // groups
    assert out.n_channels == COUT // groups
    assert inp.prunable and out.prunable


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_exact_input(tmp_path: Path, groups: int) -> None:
    out = assert_exact(tmp_path, grouped_model(groups, zero_in=[1]), "c1", [1])
    per = CIN // groups
    assert input_shape(out, "c1", 1)[0] == CIN - groups  # local index 1 of every group
    assert input_shape(out, "gc", 1) == (COUT, per - 1, 3, 3)
    assert next(a.i for a in node_of(out, "gc").attribute if a.name == "group") == groups


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_exact_output(tmp_path: Path, groups: int) -> None:
    out = assert_exact(tmp_path, grouped_model(groups, zero_out=[0, 2]), "gc", [0, 2])
    assert input_shape(out, "gc", 1)[0] == COUT - 2 * groups
    assert input_shape(out, "head", 1)[1] == COUT - 2 * groups


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_random(tmp_path: Path, groups: int) -> None:
    for out in assert_random(tmp_path, grouped_model(groups)):
        cout, per_group = input_shape(out, "gc", 1)[:2]
        cin = input_shape(out, "c1", 1)[0]
        # Kept counts stay whole multiples of the group count.
        assert cout % groups == 0 and cin % groups == 0
        assert cin == per_group * groups
        assert cout == groups * ((COUT // groups) - (COUT // groups) // 2)
        assert input_shape(out, "head", 1)[1] == cout
