"""``x.chunk(2, dim=1)`` as the TorchScript exporter writes it: two channel Slices whose
bounds are computed from the tensor's own shape (Shape → Gather → Div → Mul).

``load_model`` folds a static shape read into constants only once shape inference has
reached the tensor, and onnx's data propagation stops at the Div, so every chunk block
of a chain needs one more round of inference and folding to get its shapes: six blocks
need seven.  Load used to stop after four rounds, leaving the later chunks with unknown
dims, so the Concat that joins them back blocked its group ("size ... on the concat axis
unknown").  Torchvision's shufflenet_v2 (TorchScript export) needs nine rounds, swin_t six.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from builders import G
from topology import analysis_of, assert_random, group_of

C = 8
BLOCKS = 6
i64 = np.int64


def _chunk_block(g: G, h: str, k: int) -> str:
    """h → chunk(2) by shape arithmetic → [a, Relu(c(b))] → Concat."""
    shape = g.op("Shape", [h], name=f"shape{k}")
    c = g.op("Gather", [shape, g.const(np.array(1, i64))], axis=0, name=f"gather{k}")
    half = g.op("Div", [g.op("Add", [c, g.const(np.array(1, i64))], name=f"add{k}"), g.const(np.array(2, i64))],
                name=f"div{k}")
    half = g.op("Unsqueeze", [half, g.const(np.array([0], i64))], name=f"unsq{k}")
    one = g.op("Mul", [half, g.const(np.array([1], i64))], name=f"mul1_{k}")
    two = g.op("Mul", [half, g.const(np.array([2], i64))], name=f"mul2_{k}")
    axes, zero = g.const(np.array([1], i64)), g.const(np.array([0], i64))
    a = g.op("Slice", [h, zero, one, axes], name=f"slice_a{k}")
    b = g.op("Slice", [h, one, two, axes], name=f"slice_b{k}")
    b = g.op("Relu", [g.conv(b, C // 2, C // 2, k=1, name=f"c{k}")], name=f"relu{k}")
    return g.op("Concat", [a, b], axis=1, name=f"cat{k}")


def chunk_model(blocks: int = BLOCKS):
    """x → stem(C) → Relu → ``blocks`` chunk blocks → head."""
    g = G(opset=17)
    x = g.input("x", ["N", 3, 6, 6])
    h = g.op("Relu", [g.conv(x, 3, C, name="stem")], name="relu")
    for k in range(blocks):
        h = _chunk_block(g, h, k)
    return g.model([g.conv(h, C, 4, name="head")])


def test_chunk_chain_shapes_are_static_and_groups_prunable(tmp_path: Path) -> None:
    analysis = analysis_of(tmp_path, chunk_model())
    for k in range(BLOCKS):
        for side in "ab":
            node = next(n for n in analysis.model.graph if n.name == f"slice_{side}{k}")
            assert list(node.outputs[0].shape)[1:] == [C // 2, 6, 6], (node.name, node.outputs[0].shape)
    for producer in ["stem"] + [f"c{k}" for k in range(BLOCKS)]:
        group = group_of(analysis, producer)
        assert not group.blocked, group.blocked
        assert group.prunable


def test_chunk_prunes_randomly(tmp_path: Path) -> None:
    assert_random(tmp_path, chunk_model())
