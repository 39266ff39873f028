"""Topology: Gather on [N, T, C] tokens.

A ViT takes its class token with ``x[:, 0]`` (Gather along the token axis): the channels pass
through to the classifier, which reads them.  Gather along the channel axis itself is an
index mapping onnxprune does not rewrite: blocked, with the reason.
"""

from __future__ import annotations

import numpy as np

from builders import G
from topology import analysis_of, assert_exact, assert_random, consumer_names, group_of, zero_cols

C = 8


def tokens(axis: int = 1, index=0, zero: list[int] | None = None):
    g = G()
    x = g.input("x", ["batch", 5, 6])
    h = g.op("Relu", [g.op("MatMul", [x, g.const(g.w(6, C))], name="embed")])
    t = g.op("Gather", [h, g.const(np.array(index, dtype=np.int64))], axis=axis)
    w = g.w(C, 3) if axis == 1 else g.w(len(index), 3)
    if zero:
        w = zero_cols(w, zero, axis=0)
    return g.model([g.op("MatMul", [t, g.const(w)], name="head")])


def test_gather_on_the_token_axis(tmp_path):
    for index in (0, [0, 2]):
        group = group_of(analysis_of(tmp_path, tokens(index=index)), "embed")
        assert group.prunable, group.blocked
        assert consumer_names(group) == {"head"}
    assert_exact(tmp_path, tokens(zero=[1, 6]), "embed", [1, 6])
    assert_random(tmp_path, tokens(index=[0, 2]), seeds=(0,))


def test_gather_on_the_channel_axis_is_blocked(tmp_path):
    group = group_of(analysis_of(tmp_path, tokens(axis=2, index=[0, 1, 3, 4, 5])), "embed")
    assert not group.prunable
    assert any("Gather" in r and "gathers along the channel axis" in r for r in group.blocked), group.blocked
