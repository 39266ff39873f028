"""Concat: on the channel axis each input keeps its own group at an offset."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from builders import G
from topology import (
    analysis_of, assert_exact, assert_random, consumer_names, group_of, input_shape, producer_names, zero_cols,
)


def concat_model(zero: Sequence[int] = (), with_input: bool = False) -> onnx.ModelProto:
    """x → a(4), x → b(6) → Concat(axis=1) [a, b] (or [x, a, b]) → Relu → head(5).
    ``zero``: head input channels (positions in the concat) read as zero."""
    g = G()
    x = g.input("x", [1, 3, 8, 8])
    a = g.op("Relu", [g.conv(x, 3, 4, name="a")])
    b = g.op("Sigmoid", [g.conv(x, 3, 6, name="b")])
    parts = [x, a, b] if with_input else [a, b]
    c = g.op("Relu", [g.op("Concat", parts, axis=1, name="cat")])
    cin = 13 if with_input else 10
    y = g.conv(c, cin, 5, name="head", weight=zero_cols(g.w(5, cin, 3, 3), list(zero)))
    return g.model([y])


def test_concat_groups(tmp_path: Path) -> None:
    an = analysis_of(tmp_path, concat_model())
    ga, gb = group_of(an, "a"), group_of(an, "b")
    assert ga.id != gb.id
    assert consumer_names(ga) == consumer_names(gb) == {"head"}
    assert ga.n_channels == 4 and gb.n_channels == 6
    assert ga.prunable and gb.prunable
    # The consumer sees both groups.
    readers = [g for g in an.groups if "head" in consumer_names(g)]
    assert {g.id for g in readers} == {ga.id, gb.id}


def test_concat_exact_second_input(tmp_path: Path) -> None:
    # b's channels 1 and 5 sit at concat positions 4 + 1 and 4 + 5.
    out = assert_exact(tmp_path, concat_model([5, 9]), "b", [1, 5])
    assert input_shape(out, "b", 1)[0] == 4
    assert input_shape(out, "a", 1)[0] == 4
    assert input_shape(out, "head", 1) == (5, 8, 3, 3)


def test_concat_exact_first_input(tmp_path: Path) -> None:
    out = assert_exact(tmp_path, concat_model([0, 2]), "a", [0, 2])
    assert input_shape(out, "head", 1) == (5, 8, 3, 3)


def test_concat_with_graph_input(tmp_path: Path) -> None:
    """The graph input's slice of the concat is fixed; the producers stay prunable."""
    an = analysis_of(tmp_path, concat_model(with_input=True))
    assert group_of(an, "a").prunable and group_of(an, "b").prunable
    out = assert_exact(tmp_path, concat_model([3 + 4 + 2], with_input=True), "b", [2])
    assert input_shape(out, "head", 1) == (5, 12, 3, 3)
    assert_random(tmp_path, concat_model(with_input=True), seeds=(0, 1))


def test_concat_same_tensor_twice(tmp_path: Path) -> None:
    """Concat(a, a): a channel is removed from both copies at once."""
    g = G()
    x = g.input("x", [1, 3, 8, 8])
    a = g.op("Relu", [g.conv(x, 3, 4, name="a")])
    c = g.op("Concat", [a, a], axis=1)
    y = g.conv(c, 8, 5, name="head", weight=zero_cols(g.w(5, 8, 3, 3), [1, 5]))
    proto = g.model([y])
    an = analysis_of(tmp_path, proto)
    assert group_of(an, "a").n_channels == 4
    out = assert_exact(tmp_path, proto, "a", [1])
    assert input_shape(out, "head", 1) == (5, 6, 3, 3)
    assert_random(tmp_path, proto, seeds=(0,))


def test_concat_on_spatial_axis_couples(tmp_path: Path) -> None:
    """Concat along H: both operands carry the channels at the same positions: coupled."""
    g = G()
    x = g.input("x", [1, 3, 8, 8])
    a = g.conv(x, 3, 6, name="a")
    b = g.conv(x, 3, 6, name="b")
    c = g.op("Concat", [a, b], axis=2)
    w = g.w(5, 6, 3, 3)
    w[:, 3] = 0
    y = g.conv(c, 6, 5, name="head", weight=w)
    proto = g.model([y])
    an = analysis_of(tmp_path, proto)
    assert producer_names(group_of(an, "a")) == {"a", "b"}
    out = assert_exact(tmp_path, proto, "a", [3])
    assert input_shape(out, "a", 1)[0] == input_shape(out, "b", 1)[0] == 5
    assert_random(tmp_path, proto, seeds=(0, 1))


def test_concat_random(tmp_path: Path) -> None:
    outs = assert_random(tmp_path, concat_model())
    for out in outs:
        assert input_shape(out, "head", 1)[1] == 2 + 3
        assert np.prod(input_shape(out, "a", 1)) > 0
