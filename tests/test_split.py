"""Split and Slice on the channel axis: each output reads a sub-range of one group."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from builders import G
from onnxprune.groups import Group
from topology import (
    analysis_of, assert_exact, assert_random, consumer_names, group_of, input_shape, producer_names, zero_cols,
)

INT_MAX = np.iinfo(np.int64).max

# (opset, how the sizes are given, sizes the graph ends up with)
SPLITS = [
    (13, "input", [3, 5]),
    (18, "input", [3, 5]),
    (11, "attr", [3, 5]),
    (13, "equal", [4, 4]),
    (11, "equal", [4, 4]),
    (18, "num_outputs", [4, 4]),
]


def split_model(opset: int, how: str, sizes: list[int], zero: Sequence[int] = ()) -> onnx.ModelProto:
    """x → c1(8) → Relu → Split(axis=1) → ca / cb.  ``zero``: c1 channels whose weights
    the reader of their chunk sees as zero."""
    g = G(opset=opset)
    x = g.input("x", [1, 3, 8, 8])
    h = g.op("Relu", [g.conv(x, 3, 8, name="c1")])
    if how == "input":
        parts = g.op("Split", [h, g.const(np.array(sizes, np.int64))], n_out=2, axis=1, name="split")
    elif how == "attr":
        parts = g.op("Split", [h], n_out=2, axis=1, split=sizes, name="split")
    elif how == "num_outputs":
        parts = g.op("Split", [h], n_out=2, axis=1, num_outputs=2, name="split")
    else:
        parts = g.op("Split", [h], n_out=2, axis=1, name="split")
    wa = zero_cols(g.w(4, sizes[0], 3, 3), [c for c in zero if c < sizes[0]])
    wb = zero_cols(g.w(5, sizes[1], 3, 3), [c - sizes[0] for c in zero if c >= sizes[0]])
    ya = g.conv(parts[0], sizes[0], 4, name="ca", weight=wa)
    yb = g.conv(parts[1], sizes[1], 5, name="cb", weight=wb)
    return g.model([ya, yb])


def split_sizes(path: Path) -> list[int]:
    """The sizes the Split in the file at ``path`` uses (input or attribute)."""
    m = onnx.load(str(path))
    node = next(n for n in m.graph.node if n.op_type == "Split")
    assert not any(a.name == "num_outputs" for a in node.attribute) or len(node.input) < 2
    if len(node.input) > 1 and node.input[1]:
        t = next(t for t in m.graph.initializer if t.name == node.input[1])
        return numpy_helper.to_array(t).tolist()
    attr = next((a for a in node.attribute if a.name == "split"), None)
    assert attr is not None, "an equal split needs explicit sizes once pruned"
    return list(attr.ints)


def assert_chunks(group: Group, ranges: list[tuple[int, int]]) -> None:
    """Each channel range ``[start, stop)`` is one of the group's must-keep-one chunks."""
    chunks = {tuple(int(c) for c in chunk) for chunk in group.keep_any}
    for start, stop in ranges:
        assert tuple(int(c) for c in np.sort(group.classes[start:stop])) in chunks


@pytest.mark.parametrize("opset,how,sizes", SPLITS)
def test_split_groups(tmp_path: Path, opset: int, how: str, sizes: list[int]) -> None:
    a = analysis_of(tmp_path, split_model(opset, how, sizes))
    g = group_of(a, "c1")
    assert g.prunable and g.n_channels == 8
    assert consumer_names(g) == {"ca", "cb"}
    # Each Split output is a chunk that must keep a channel.
    assert_chunks(g, [(0, sizes[0]), (sizes[0], 8)])


@pytest.mark.parametrize("opset,how,sizes", SPLITS)
def test_split_exact(tmp_path: Path, opset: int, how: str, sizes: list[int]) -> None:
    removed = [1, sizes[0], 7]  # one from the first chunk, two from the second
    out = assert_exact(tmp_path, split_model(opset, how, sizes, removed), "c1", removed)
    assert split_sizes(out) == [sizes[0] - 1, sizes[1] - 2]
    assert input_shape(out, "ca", 1)[1] == sizes[0] - 1
    assert input_shape(out, "cb", 1)[1] == sizes[1] - 2


@pytest.mark.parametrize("opset,how,sizes", SPLITS)
def test_split_random(tmp_path: Path, opset: int, how: str, sizes: list[int]) -> None:
    for out in assert_random(tmp_path, split_model(opset, how, sizes), seeds=(0, 3)):
        kept = split_sizes(out)
        assert sum(kept) == 4 and min(kept) >= 1


def test_split_never_empties_a_chunk(tmp_path: Path) -> None:
    """A one-channel chunk keeps its channel whatever the scores (an empty Split output
    would give its reader a Conv with no input channels, which onnxruntime refuses)."""
    proto = split_model(13, "input", [1, 7])
    for out in assert_random(tmp_path, proto, seeds=tuple(range(8)), ratio=0.9):
        assert split_sizes(out)[0] == 1


def test_split_on_spatial_axis(tmp_path: Path) -> None:
    """Split along H: both halves carry every channel, both readers are consumers."""
    g = G()
    x = g.input("x", [1, 3, 8, 8])
    h = g.conv(x, 3, 6, name="c1")
    top, bottom = g.op("Split", [h, g.const(np.array([3, 5], np.int64))], n_out=2, axis=2)
    ya = g.conv(top, 6, 4, name="ca", weight=zero_cols(g.w(4, 6, 3, 3), [2]))
    yb = g.conv(bottom, 6, 4, name="cb", weight=zero_cols(g.w(4, 6, 3, 3), [2]))
    proto = g.model([ya, yb])
    a = analysis_of(tmp_path, proto)
    assert consumer_names(group_of(a, "c1")) == {"ca", "cb"}
    out = assert_exact(tmp_path, proto, "c1", [2])
    assert input_shape(out, "ca", 1)[1] == input_shape(out, "cb", 1)[1] == 5
    assert_random(tmp_path, proto, seeds=(0,))


def test_split_glu_couples_halves(tmp_path: Path) -> None:
    """GLU: Split in halves, a * Sigmoid(b): channel j of each half go together."""
    g = G()
    x = g.input("x", [1, 3, 8, 8])
    h = g.conv(x, 3, 8, name="c1")
    a, b = g.op("Split", [h, g.const(np.array([4, 4], np.int64))], n_out=2, axis=1, name="split")
    glu = g.op("Mul", [a, g.op("Sigmoid", [b])])
    y = g.conv(glu, 4, 3, name="head", weight=zero_cols(g.w(3, 4, 3, 3), [1]))
    proto = g.model([y])
    an = analysis_of(tmp_path, proto)
    grp = group_of(an, "c1")
    assert grp.n_channels == 4 and consumer_names(grp) == {"head"}
    out = assert_exact(tmp_path, proto, "c1", [1])
    assert input_shape(out, "c1", 1)[0] == 6
    assert split_sizes(out) == [3, 3]
    assert_random(tmp_path, proto, seeds=(0, 1))


# ----------------------------------------------------------------------------- Slice


def slice_model(zero: Sequence[int] = (), opset: int = 13) -> onnx.ModelProto:
    """x → c1(10) → Slice [2:6] → ca, Slice [-3:INT_MAX] → cb; c1's channels 0, 1, 6 are
    read by nobody.  ``zero``: c1 channels the reader of their slice sees as zero."""
    g = G(opset=opset)
    x = g.input("x", [1, 3, 8, 8])
    h = g.op("Relu", [g.conv(x, 3, 10, name="c1")])
    one = g.const(np.array([1], np.int64))
    sa = g.op("Slice", [h, g.const(np.array([2], np.int64)), g.const(np.array([6], np.int64)), one], name="sa")
    sb = g.op("Slice", [h, g.const(np.array([-3], np.int64)), g.const(np.array([INT_MAX], np.int64)), one,
                        g.const(np.array([1], np.int64))], name="sb")
    ya = g.conv(sa, 4, 4, name="ca", weight=zero_cols(g.w(4, 4, 3, 3), [c - 2 for c in zero if 2 <= c < 6]))
    yb = g.conv(sb, 3, 5, name="cb", weight=zero_cols(g.w(5, 3, 3, 3), [c - 7 for c in zero if c >= 7]))
    return g.model([ya, yb])


def test_slice_groups(tmp_path: Path) -> None:
    a = analysis_of(tmp_path, slice_model())
    g = group_of(a, "c1")
    assert producer_names(g) == {"c1"} and consumer_names(g) == {"ca", "cb"}
    assert g.prunable and g.n_channels == 10
    assert_chunks(g, [(2, 6), (7, 10)])


@pytest.mark.parametrize("opset", [11, 13])
def test_slice_exact(tmp_path: Path, opset: int) -> None:
    # 0, 1 and 6 are dead channels; 3 is read by ca, 8 by cb.
    removed = [0, 1, 3, 6, 8]
    out = assert_exact(tmp_path, slice_model(removed, opset), "c1", removed)
    assert input_shape(out, "c1", 1)[0] == 5
    assert input_shape(out, "ca", 1)[1] == 3
    assert input_shape(out, "cb", 1)[1] == 2


def test_slice_random(tmp_path: Path) -> None:
    assert_random(tmp_path, slice_model(), seeds=(0, 1, 2, 3))


def test_slice_of_concat_spans_groups(tmp_path: Path) -> None:
    """Concat(a, b) then a Slice across the seam: the chunk spans both groups."""
    g = G()
    x = g.input("x", [1, 3, 8, 8])
    cat = g.op("Concat", [g.conv(x, 3, 3, name="a"), g.conv(x, 3, 3, name="b")], axis=1)
    s = g.op("Slice", [cat, g.const(np.array([2], np.int64)), g.const(np.array([4], np.int64)),
                       g.const(np.array([1], np.int64))])
    y = g.conv(s, 2, 4, name="head")
    proto = g.model([y])
    an = analysis_of(tmp_path, proto)
    ga, gb = group_of(an, "a"), group_of(an, "b")
    assert ga.id != gb.id
    spanning = [c for c in ga.keep_any if len(c) == 2 and set(c) & set(ga.classes) and set(c) & set(gb.classes)]
    assert len(spanning) == 1
    assert any(np.array_equal(spanning[0], c) for c in gb.keep_any)
    # Whatever both groups lose, the two-channel slice keeps one of its channels.
    assert_random(tmp_path, proto, seeds=tuple(range(6)), ratio=0.7)


def test_strided_channel_slice_is_blocked(tmp_path: Path) -> None:
    g = G()
    x = g.input("x", [1, 3, 8, 8])
    h = g.conv(x, 3, 8, name="c1")
    s = g.op("Slice", [h, g.const(np.array([0], np.int64)), g.const(np.array([8], np.int64)),
                       g.const(np.array([1], np.int64)), g.const(np.array([2], np.int64))])
    y = g.conv(s, 4, 4, name="head")
    grp = group_of(analysis_of(tmp_path, g.model([y])), "c1")
    assert not grp.prunable and any("strided" in r for r in grp.blocked)


def test_slices_sharing_bound_constants(tmp_path: Path) -> None:
    """Two Slices of two different groups share their starts/ends/axes constants (as
    exporters do): each gets the bounds its own pruning needs."""
    g = G()
    x = g.input("x", [1, 3, 8, 8])
    starts, ends, axes = (g.const(np.array([v], np.int64)) for v in (1, 5, 1))
    sa = g.op("Slice", [g.conv(x, 3, 6, name="pa"), starts, ends, axes], name="sa")
    sb = g.op("Slice", [g.conv(x, 3, 6, name="pb"), starts, ends, axes], name="sb")
    ya = g.conv(sa, 4, 3, name="ha", weight=zero_cols(g.w(3, 4, 3, 3), [0, 1]))
    yb = g.conv(sb, 4, 3, name="hb")
    proto = g.model([ya, yb])
    # pa: dead channels 0 and 5 plus 1, 2 (slice positions 0, 1, zero in ha).
    out = assert_exact(tmp_path, proto, "pa", [0, 1, 2, 5])
    assert input_shape(out, "ha", 1)[1] == 2 and input_shape(out, "hb", 1)[1] == 4
    m = onnx.load(str(out))
    inits = {t.name: numpy_helper.to_array(t).tolist() for t in m.graph.initializer}
    bounds = {n.name: (inits[n.input[1]], inits[n.input[2]]) for n in m.graph.node if n.op_type == "Slice"}
    assert bounds == {"sa": ([0], [2]), "sb": ([1], [5])}
    assert_random(tmp_path, proto, seeds=(0, 1, 2))


def test_concat_then_split_negative_axes(tmp_path: Path) -> None:
    """Concat and Split on axis -3 (the channel axis of NCHW), chunks crossing the seam."""
    g = G()
    x = g.input("x", [1, 3, 8, 8])
    cat = g.op("Concat", [g.conv(x, 3, 4, name="a"), g.conv(x, 3, 4, name="b")], axis=-3)
    s1, s2 = g.op("Split", [cat, g.const(np.array([3, 5], np.int64))], n_out=2, axis=-3, name="split")
    y1 = g.conv(s1, 3, 2, name="h1")
    y2 = g.conv(s2, 5, 2, name="h2", weight=zero_cols(g.w(2, 5, 3, 3), [1]))  # s2[1] is b's channel 0
    proto = g.model([y1, y2])
    an = analysis_of(tmp_path, proto)
    assert consumer_names(group_of(an, "a")) == {"h1", "h2"}
    assert consumer_names(group_of(an, "b")) == {"h2"}
    out = assert_exact(tmp_path, proto, "b", [0])
    assert split_sizes(out) == [3, 4]
    for out in assert_random(tmp_path, proto, seeds=(0, 1)):
        assert min(split_sizes(out)) >= 1
