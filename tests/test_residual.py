"""Residual blocks: an Add of two computed tensors couples their producers into one group."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnx

from builders import G
from topology import (
    analysis_of, assert_exact, assert_random, consumer_names, group_of, input_shape, producer_names, zero_cols,
)


def residual(zero: Sequence[int] = (), blocks: int = 2) -> onnx.ModelProto:
    """x → c0(8) → Relu = a; ``blocks`` times: a → bK1(6) → Relu → bK2(8); a = Relu(a + ·);
    then a → head(4).  ``zero``: channels of the stem group whose weights every reader of
    the 8-channel stream (each bK1 and head) reads as zero."""
    g = G()
    x = g.input("x", [1, 3, 8, 8])
    a = g.op("Relu", [g.conv(x, 3, 8, name="c0")])
    for k in range(blocks):
        h = g.op("Relu", [g.conv(a, 8, 6, name=f"b{k}1", weight=zero_cols(g.w(6, 8, 3, 3), list(zero)))])
        h = g.conv(h, 6, 8, name=f"b{k}2")
        a = g.op("Relu", [g.op("Add", [a, h], name=f"add{k}")])
    y = g.conv(a, 8, 4, name="head", weight=zero_cols(g.w(4, 8, 3, 3), list(zero)))
    return g.model([y])


def test_residual_groups(tmp_path: Path) -> None:
    a = analysis_of(tmp_path, residual())
    stem = group_of(a, "c0")
    assert producer_names(stem) == {"c0", "b02", "b12"}
    assert consumer_names(stem) == {"b01", "b11", "head"}
    assert stem.n_channels == 8 and len(stem.classes) == 8 and stem.prunable
    for k in range(2):
        inner = group_of(a, f"b{k}1")
        assert producer_names(inner) == {f"b{k}1"} and consumer_names(inner) == {f"b{k}2"}
    # 1 stem + 2 inner + head
    assert len(a.groups) == 4


def test_residual_single_block_groups(tmp_path: Path) -> None:
    a = analysis_of(tmp_path, residual(blocks=1))
    assert producer_names(group_of(a, "c0")) == {"c0", "b02"}


def test_residual_exact(tmp_path: Path) -> None:
    out = assert_exact(tmp_path, residual([1, 4, 6]), "c0", [1, 4, 6])
    for name in ("c0", "b02", "b12"):
        assert input_shape(out, name, 1)[0] == 5
    for name in ("b01", "b11", "head"):
        assert input_shape(out, name, 1)[1] == 5


def test_residual_exact_inner(tmp_path: Path) -> None:
    g = G()
    x = g.input("x", [1, 3, 8, 8])
    a = g.op("Relu", [g.conv(x, 3, 8, name="c0")])
    h = g.op("Relu", [g.conv(a, 8, 6, name="b1")])
    h = g.conv(h, 6, 8, name="b2", weight=zero_cols(g.w(8, 6, 3, 3), [0, 5]))
    y = g.conv(g.op("Add", [a, h]), 8, 4, name="head")
    out = assert_exact(tmp_path, g.model([y]), "b1", [0, 5])
    assert input_shape(out, "b2", 1) == (8, 4, 3, 3)


def test_residual_identity_from_input_is_fixed(tmp_path: Path) -> None:
    """A skip from the graph input couples the block's output to unprunable channels."""
    g = G()
    x = g.input("x", [1, 8, 8, 8])
    h = g.op("Relu", [g.conv(x, 8, 6, name="b1")])
    h = g.conv(h, 6, 8, name="b2")
    y = g.conv(g.op("Add", [x, h]), 8, 4, name="head")
    a = analysis_of(tmp_path, g.model([y]))
    assert not group_of(a, "b2").prunable
    assert group_of(a, "b1").prunable


def test_residual_random(tmp_path: Path) -> None:
    outs = assert_random(tmp_path, residual())
    for out in outs:
        assert input_shape(out, "c0", 1)[0] == input_shape(out, "b02", 1)[0] == input_shape(out, "b12", 1)[0] == 4
