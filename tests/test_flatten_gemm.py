"""Flatten / Reshape to [B, C·H·W] then Gemm or MatMul: each channel is a block of H·W
weight rows (columns with transB=1)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from builders import G
from topology import (
    analysis_of, assert_exact, assert_random, consumer_names, group_of, input_shape, node_of, zero_cols,
)

C, H, W, N = 4, 3, 3, 10
FEAT = C * H * W


def head_model(flatten: str, head: str, zero: Sequence[int] = (), batch: int | str = 1) -> onnx.ModelProto:
    """x → c1(C) → Relu → flatten → head(N) → Relu → out(3).

    ``flatten``: "flatten", "reshape-1" ([-1, C·H·W]), "reshape0" ([0, C·H·W]) or
    "reshape0-1" ([0, -1]: nothing to rewrite);
    ``head``: "gemm1"/"gemm0" (transB) or "matmul".  ``zero``: channels of c1 whose H·W
    block of head weights is zero."""
    g = G()
    x = g.input("x", [batch, 3, H, W])
    h = g.op("Relu", [g.conv(x, 3, C, name="c1")])
    if flatten == "flatten":
        f = g.op("Flatten", [h], axis=1, name="flat")
    else:
        target = {"reshape-1": [-1, FEAT], "reshape0": [0, FEAT], "reshape0-1": [0, -1]}[flatten]
        f = g.op("Reshape", [h, g.const(np.array(target, np.int64), name="shape")], name="flat")
    rows = [k * H * W + i for k in zero for i in range(H * W)]
    wk = g.w(FEAT, N)  # [K, N]
    wk[rows] = 0
    if head == "gemm1":
        y = g.gemm(f, FEAT, N, trans_b=1, name="fc", weight=np.ascontiguousarray(wk.T))
    elif head == "gemm0":
        y = g.gemm(f, FEAT, N, trans_b=0, name="fc", weight=wk)
    else:
        y = g.op("Add", [g.op("MatMul", [f, g.const(wk)], name="fc"), g.const(g.w(N))])
    y = g.gemm(g.op("Relu", [y]), N, 3, name="out")
    return g.model([y])


CASES = [
    ("flatten", "gemm1"),
    ("flatten", "gemm0"),
    ("flatten", "matmul"),
    ("reshape-1", "gemm1"),
    ("reshape-1", "gemm0"),
    ("reshape-1", "matmul"),
    ("reshape0", "gemm1"),
    ("reshape0", "gemm0"),
    ("reshape0", "matmul"),
    ("reshape0-1", "gemm1"),
]


def head_in(path: Path) -> int:
    """The input width of the fc weight in the file at ``path``."""
    shape = input_shape(path, "fc", 1)
    if node_of(path, "fc").op_type == "Gemm" and any(a.name == "transB" and a.i for a in node_of(path, "fc").attribute):
        return shape[1]
    return shape[0]


def reshape_target(path: Path) -> list[int] | None:
    m = onnx.load(str(path))
    node = next((n for n in m.graph.node if n.op_type == "Reshape"), None)
    if node is None:
        return None
    t = next(t for t in m.graph.initializer if t.name == node.input[1])
    return numpy_helper.to_array(t).tolist()


@pytest.mark.parametrize("flatten,head", CASES)
def test_flatten_groups(tmp_path: Path, flatten: str, head: str) -> None:
    a = analysis_of(tmp_path, head_model(flatten, head))
    g = group_of(a, "c1")
    assert consumer_names(g) == {"fc"} and g.n_channels == C and g.prunable
    assert consumer_names(group_of(a, "fc")) == {"out"}


@pytest.mark.parametrize("flatten,head", CASES)
def test_flatten_exact(tmp_path: Path, flatten: str, head: str) -> None:
    out = assert_exact(tmp_path, head_model(flatten, head, [1, 3]), "c1", [1, 3])
    assert head_in(out) == (C - 2) * H * W
    if flatten in ("reshape-1", "reshape0"):
        lead = -1 if flatten == "reshape-1" else 0
        assert reshape_target(out) == [lead, (C - 2) * H * W]
    elif flatten == "reshape0-1":
        assert reshape_target(out) == [0, -1]


@pytest.mark.parametrize("flatten,head", CASES)
def test_flatten_random(tmp_path: Path, flatten: str, head: str) -> None:
    for out in assert_random(tmp_path, head_model(flatten, head), seeds=(0, 1)):
        assert head_in(out) == (C // 2) * H * W


@pytest.mark.parametrize("flatten", ["flatten", "reshape-1", "reshape0"])
def test_flatten_dynamic_batch(tmp_path: Path, flatten: str) -> None:
    proto = head_model(flatten, "gemm1", [0], batch="N")
    assert group_of(analysis_of(tmp_path, proto), "c1").prunable
    assert_exact(tmp_path, proto, "c1", [0])
    assert_random(tmp_path, head_model(flatten, "gemm1", batch="N"), seeds=(0,))


def test_flatten_channels_last(tmp_path: Path) -> None:
    """Transpose to NHWC then Flatten(axis=3) → [N·H·W, C]: the channels stay an axis."""
    g = G()
    x = g.input("x", [1, 3, H, W])
    h = g.conv(x, 3, C, name="c1")
    f = g.op("Flatten", [g.op("Transpose", [h], perm=[0, 2, 3, 1])], axis=3)
    y = g.op("MatMul", [f, g.const(np.where(np.arange(C)[:, None] == 2, 0, g.w(C, 5)).astype(np.float32))], name="fc")
    proto = g.model([g.op("Relu", [y])])
    assert consumer_names(group_of(analysis_of(tmp_path, proto), "c1")) == {"fc"}
    out = assert_exact(tmp_path, proto, "c1", [2])
    assert input_shape(out, "fc", 1) == (C - 1, 5)


def test_flatten_into_batch_axis_is_blocked(tmp_path: Path) -> None:
    """Flatten(axis=2) of NCHW merges the channels into the leading axis: blocked."""
    g = G()
    x = g.input("x", [1, 3, H, W])
    h = g.conv(x, 3, C, name="c1")
    f = g.op("Flatten", [h], axis=2)
    y = g.op("MatMul", [f, g.const(g.w(H * W, 5))], name="fc")
    grp = group_of(analysis_of(tmp_path, g.model([y])), "c1")
    assert not grp.prunable and any("Flatten" in r and "leading" in r for r in grp.blocked)


def test_reshape_splitting_channels_is_blocked(tmp_path: Path) -> None:
    """ShuffleNet's channel shuffle: [N, G, C/G, H, W] splits the channel axis (like heads),
    the Transpose swaps the two parts and the merge back interleaves them: blocked, named."""
    g = G()
    x = g.input("x", [1, 3, H, W])
    h = g.conv(x, 3, C, name="c1")
    r = g.op("Reshape", [h, g.const(np.array([1, 2, C // 2, H, W], np.int64))], name="split_channels")
    r = g.op("Transpose", [r], perm=[0, 2, 1, 3, 4])
    r = g.op("Reshape", [r, g.const(np.array([1, C, H, W], np.int64))], name="shuffled")
    y = g.conv(r, C, 3, name="head")
    grp = group_of(analysis_of(tmp_path, g.model([y])), "c1")
    assert not grp.prunable
    assert any("Reshape 'shuffled'" in r and "splits or moves" in r for r in grp.blocked), grp.blocked


@pytest.mark.parametrize("squash", ["flatten", "squeeze", "squeeze-all", "reshape"])
def test_pooled_classifier_head(tmp_path: Path, squash: str) -> None:
    """GlobalAveragePool → Flatten / Squeeze / Reshape → Gemm: one weight column per channel."""

    def model(zero: Sequence[int] = ()) -> onnx.ModelProto:
        g = G(opset=13)
        x = g.input("x", [2, 3, H, W])
        p = g.op("GlobalAveragePool", [g.op("Relu", [g.conv(x, 3, C, name="c1")])])
        if squash == "flatten":
            f = g.op("Flatten", [p])
        elif squash == "squeeze":
            f = g.op("Squeeze", [p, g.const(np.array([2, 3], np.int64))])
        elif squash == "squeeze-all":
            f = g.op("Squeeze", [p])
        else:
            f = g.op("Reshape", [p, g.const(np.array([2, C], np.int64))])
        return g.model([g.gemm(f, C, 5, name="fc", weight=zero_cols(g.w(5, C), list(zero)))])

    assert consumer_names(group_of(analysis_of(tmp_path, model()), "c1")) == {"fc"}
    out = assert_exact(tmp_path, model([0, 2]), "c1", [0, 2])
    assert input_shape(out, "fc", 1) == (5, C - 2)
    assert_random(tmp_path, model(), seeds=(0,))


def _runtime_flatten_model() -> onnx.ModelProto:
    """c1 → Relu → Reshape to [Shape(h)[0], -1] (the shape assembled at run time, as the
    TorchScript exporter writes a flatten) → fc, with a symbolic batch."""
    g = G()
    x = g.input("x", ["N", 3, H, W])
    h = g.op("Relu", [g.conv(x, 3, C, name="c1")])
    first = g.op("Gather", [g.op("Shape", [h]), g.const(np.array(0, np.int64))], axis=0)
    target = g.op("Concat", [g.op("Unsqueeze", [first, g.const(np.array([0], np.int64))]),
                             g.const(np.array([-1], np.int64))], axis=0)
    f = g.op("Reshape", [h, target], name="flat")
    return g.model([g.gemm(f, FEAT, N, trans_b=1, name="fc")])


def test_runtime_flatten_shape_without_the_symbolic_pass(tmp_path: Path, monkeypatch) -> None:
    """A flatten whose shape is assembled at run time gets [N, C·H·W] from onnxprune's own
    rule, as onnxruntime's symbolic pass gives it, without loading that pass (and sympy)."""
    from onnxprune import shapes
    from onnxprune.load import load_model

    path = tmp_path / "m.onnx"
    onnx.save(_runtime_flatten_model(), str(path))
    calls = []
    real = shapes._symbolic_infer
    monkeypatch.setattr(shapes, "_symbolic_infer", lambda *a: calls.append(1) or real(*a))
    model, _ = load_model(path)
    flat = next(n for n in model.graph if n.op_type == "Reshape").outputs[0]
    assert [getattr(d, "value", d) for d in flat.shape] == ["N", FEAT] and not calls
    # The symbolic pass, run on the same graph with the rule switched off, agrees.
    monkeypatch.setattr(shapes, "_flattening_reshapes", lambda graph: 0)
    model, _ = load_model(path)
    flat = next(n for n in model.graph if n.op_type == "Reshape").outputs[0]
    assert [getattr(d, "value", d) for d in flat.shape] == ["N", FEAT] and calls


@pytest.mark.parametrize("src,target,want", [
    (["N", 4, 3, 3], [-1, 36], ["N", 36]),
    (["N", 4, 3, 3], [0, -1], ["N", 36]),
    (["N", 4, 3, 3], ["N", -1], ["N", 36]),
    (["N", 4, 6], [-1, 24], ["N", 24]),
    (["N", 4, 6], [-1, 6], None),  # the -1 stands for 4·N
    ([2, 4, 6], [-1, 6], [8, 6]),
    (["N", "S", 6], [-1, 6], None),  # the -1 stands for N·S: left to the symbolic pass
    (["N", 4, 6], [-1, 5], None),  # 24 not a multiple of 5
    (["N", 4, 6], [-1, -1], None),
])
def test_reshape_dims_rule(src, target, want) -> None:
    import onnx_ir as ir

    from onnxprune.shapes import _reshaped

    sym = lambda ds: [ir.SymbolicDim(d) if isinstance(d, str) else d for d in ds]  # noqa: E731
    got = _reshaped(sym(src), sym(target), 0)
    assert (got if got is None else [getattr(d, "value", d) for d in got]) == want
