"""What blocks a group, and that a block stays confined to the groups it concerns."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxprune
from builders import G, run, save
from onnxprune._ort import session
from onnxprune.verify import random_feed
from topology import analysis_of, assert_exact, assert_random, consumer_names, group_of, input_shape, zero_cols


def _two_branches(g: G, x: str, zero: Sequence[int] = ()) -> str:
    """A clean branch x → c2(6) → Relu → c3(4, reads ``zero`` of c2 as zero): prunable."""
    h = g.op("Relu", [g.conv(x, 3, 6, name="c2")])
    return g.conv(h, 6, 4, name="c3", weight=zero_cols(g.w(4, 6, 3, 3), list(zero)))


# ----------------------------------------------------------------------------- unknown ops


def custom_op_model() -> onnx.ModelProto:
    """c1 → com.example::Mystery → graph output, beside a clean branch (not run: no kernel)."""
    g = G()
    x = g.input("x", [1, 3, 6, 6])
    h = g.op("Relu", [g.conv(x, 3, 5, name="c1")])
    g.nodes.append(helper.make_node("Mystery", [h], ["mystery_out"], name="mystery", domain="com.example"))
    y = _two_branches(g, x)
    graph = helper.make_graph(
        g.nodes, "custom", g.inputs,
        [helper.make_tensor_value_info("mystery_out", TensorProto.FLOAT, [1, 5, 6, 6]),
         helper.make_tensor_value_info(y, TensorProto.FLOAT, None)],
        initializer=g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    model.ir_version = 8
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    return model


def test_custom_domain_op_blocks_only_its_group(tmp_path: Path) -> None:
    a = analysis_of(tmp_path, custom_op_model())
    grp = group_of(a, "c1")
    assert not grp.prunable
    assert any("com.example::Mystery" in r and "op table" in r for r in grp.blocked), grp.blocked
    assert group_of(a, "c2").prunable
    assert not any("Mystery" in r for r in group_of(a, "c2").blocked + group_of(a, "c3").blocked)


def einsum_model(zero: Sequence[int] = (), zero_after: Sequence[int] = ()) -> onnx.ModelProto:
    """c1 → Einsum (NCHW→NHWC) → Transpose back → c4 → Relu → c5, beside a clean branch.

    c4 reads no prunable channels (Einsum carries none onward), so it starts a new group;
    ``zero_after``: c4 channels c5 reads as zero."""
    g = G()
    x = g.input("x", [1, 3, 6, 6])
    h = g.op("Relu", [g.conv(x, 3, 5, name="c1")])
    h = g.op("Einsum", [h], equation="nchw->nhwc", name="einsum")
    h = g.op("Transpose", [h], perm=[0, 3, 1, 2])
    h = g.op("Relu", [g.conv(h, 5, 6, name="c4")])
    y1 = g.conv(h, 6, 2, name="c5", weight=zero_cols(g.w(2, 6, 3, 3), list(zero_after)))
    return g.model([y1, _two_branches(g, x, zero)])


def test_einsum_blocks_exactly_the_groups_reaching_it(tmp_path: Path) -> None:
    a = analysis_of(tmp_path, einsum_model())
    grp = group_of(a, "c1")
    assert not grp.prunable
    assert grp.blocked == ["Einsum 'einsum': op 'Einsum' is not in onnxprune's op table"]
    # Groups the Einsum does not see are untouched by the block.
    for name in ("c2", "c4"):
        assert group_of(a, name).prunable and not group_of(a, name).blocked
    assert consumer_names(group_of(a, "c4")) == {"c5"}


def test_einsum_model_prunes_around_the_block(tmp_path: Path) -> None:
    assert_exact(tmp_path, einsum_model(zero=[1, 2]), "c2", [1, 2])
    out = assert_exact(tmp_path, einsum_model(zero_after=[0, 5]), "c4", [0, 5])
    assert input_shape(out, "c1", 1)[0] == 5
    for out in assert_random(tmp_path, einsum_model(), seeds=(0, 1)):
        assert input_shape(out, "c1", 1)[0] == 5  # the blocked group keeps every channel
        assert input_shape(out, "c4", 1)[0] == 3 and input_shape(out, "c2", 1)[0] == 3


# ----------------------------------------------------------------------------- graph outputs


def test_graph_output_channels_are_never_removed(tmp_path: Path) -> None:
    """c1's activations are returned as a graph output and read by c2: c1 is kept whole;
    c2's output is the other graph output; only the middle group can go."""
    g = G()
    x = g.input("x", [1, 3, 6, 6])
    feat = g.op("Relu", [g.conv(x, 3, 6, name="c1")], name="feat")
    h = g.op("Relu", [g.conv(feat, 6, 8, name="c2")])
    y = g.conv(h, 8, 4, name="c3")
    proto = g.model([feat, y])
    a = analysis_of(tmp_path, proto)
    for name in ("c1", "c3"):
        grp = group_of(a, name)
        assert not grp.prunable and any("is a graph output" in r for r in grp.blocked)
    assert group_of(a, "c2").prunable
    src = save(proto, tmp_path / "outputs.onnx")
    feed = random_feed(session(str(src)), seed=0)
    reference = run(src, feed)
    for seed in range(3):
        out = tmp_path / f"p{seed}.onnx"
        onnxprune.prune(src, out, method="random", ratio=0.9, seed=seed)
        assert [r.shape for r in run(out, feed)] == [r.shape for r in reference]
        assert input_shape(out, "c1", 1)[0] == 6 and input_shape(out, "c3", 1)[0] == 4
        assert input_shape(out, "c2", 1)[0] == 1
        # c1's output is returned unchanged, value for value.
        np.testing.assert_allclose(run(out, feed)[0], reference[0], atol=1e-6)


def test_shape_of_channels_as_graph_output_blocks(tmp_path: Path) -> None:
    """Returning Shape(x) would change its value: the group is blocked."""
    g = G()
    x = g.input("x", [1, 3, 6, 6])
    h = g.conv(x, 3, 6, name="c1")
    y = g.conv(h, 6, 4, name="c2")
    proto = g.model([y])
    shape_node = helper.make_node("Shape", [h], ["shape_of_h"], name="shape")
    proto.graph.node.append(shape_node)
    proto.graph.output.append(helper.make_tensor_value_info("shape_of_h", TensorProto.INT64, [4]))
    grp = group_of(analysis_of(tmp_path, proto), "c1")
    assert not grp.prunable and any("Shape 'shape'" in r for r in grp.blocked), grp.blocked


def test_static_channel_count_read_is_folded(tmp_path: Path) -> None:
    """Shape → Gather(1) of a static channel count is folded to the constant before the
    analysis: the pruned model keeps reading the original count, so nothing blocks."""
    g = G()
    x = g.input("x", [1, 3, 6, 6])
    h = g.conv(x, 3, 6, name="c1")
    n = g.op("Gather", [g.op("Shape", [h], name="shape"), g.const(np.array([1], np.int64))], axis=0)
    scale = g.op("Cast", [n], to=TensorProto.FLOAT)
    y = g.op("Mul", [g.conv(h, 6, 4, name="c2", weight=zero_cols(g.w(4, 6, 3, 3), [0])), scale])
    proto = g.model([g.op("Relu", [y])])
    assert group_of(analysis_of(tmp_path, proto), "c1").prunable
    assert_exact(tmp_path, proto, "c1", [0])


def test_channel_count_read_at_run_time_blocks(tmp_path: Path) -> None:
    """The whole (dynamic) shape, channel count included, feeds a computation: blocked."""
    g = G()
    x = g.input("x", ["N", 3, 6, 6])
    h = g.conv(x, 3, 6, name="c1")
    total = g.op("Cast", [g.op("ReduceProd", [g.op("Shape", [h], name="shape")], keepdims=1)], to=TensorProto.FLOAT)
    y = g.op("Mul", [g.op("ReduceMean", [g.conv(h, 6, 4, name="c2")], keepdims=0), total])
    grp = group_of(analysis_of(tmp_path, g.model([y])), "c1")
    assert not grp.prunable and any("Shape 'shape'" in r and "read at run time" in r for r in grp.blocked), grp.blocked


# ----------------------------------------------------------------------------- computed operands


@pytest.mark.parametrize("op", ["Add", "Mul"])
def test_computed_operand_with_channels_blocks(tmp_path: Path, op: str) -> None:
    """conv(x) + y where y is a graph input of the same shape: y's channels cannot be
    removed, so c1's cannot either."""
    g = G()
    x = g.input("x", [1, 3, 6, 6])
    other = g.input("other", [1, 6, 6, 6])
    h = g.op(op, [g.conv(x, 3, 6, name="c1"), other], name="combine")
    y = g.conv(h, 6, 4, name="c2")
    a = analysis_of(tmp_path, g.model([y]))
    grp = group_of(a, "c1")
    assert not grp.prunable
    assert any(f"{op} 'combine'" in r and "'other'" in r for r in grp.blocked), grp.blocked


def test_broadcast_computed_operand_does_not_block(tmp_path: Path) -> None:
    """A computed [1,1,H,W] operand broadcasts over the channels: nothing to slice, no block."""
    g = G()
    x = g.input("x", [1, 3, 6, 6])
    mask = g.op("Sigmoid", [g.op("ReduceMean", [x], axes=[1], keepdims=1)])
    h = g.op("Mul", [g.conv(x, 3, 6, name="c1"), mask])
    y = g.conv(h, 6, 4, name="c2", weight=zero_cols(g.w(4, 6, 3, 3), [3]))
    proto = g.model([y])
    assert group_of(analysis_of(tmp_path, proto), "c1").prunable
    assert_exact(tmp_path, proto, "c1", [3])


def test_computed_weight_blocks(tmp_path: Path) -> None:
    """A Conv whose weight is computed at run time can be neither producer nor consumer."""
    g = G()
    x = g.input("x", [1, 3, 6, 6])
    h = g.conv(x, 3, 6, name="c1")
    w = g.op("Mul", [g.const(g.w(4, 6, 3, 3)), g.const(np.float32(2.0))])
    y = g.op("Conv", [h, w], name="c2", kernel_shape=[3, 3])
    a = analysis_of(tmp_path, g.model([y]))
    grp = group_of(a, "c1")
    assert not grp.prunable and any("Conv 'c2'" in r and "computed" in r for r in grp.blocked)


# ----------------------------------------------------------------------------- control flow


def if_model() -> onnx.ModelProto:
    """c1's output is read inside both branches of an If (outer-scope reference)."""
    g = G()
    x = g.input("x", [1, 3, 6, 6])
    cond = g.input("cond", [], dtype=TensorProto.BOOL)
    a = g.op("Relu", [g.conv(x, 3, 6, name="c1")], name="act")
    then_g = helper.make_graph([helper.make_node("Identity", [a], ["then_out"], name="then_id")], "then", [],
                               [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Neg", [a], ["else_out"], name="else_neg")], "else", [],
                               [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, None)])
    branch = g.op("If", [cond], name="branch", then_branch=then_g, else_branch=else_g)
    y = g.conv(branch, 6, 4, name="after")
    return g.model([y, _two_branches(g, x)])


def test_value_read_inside_if_blocks(tmp_path: Path) -> None:
    a = analysis_of(tmp_path, if_model())
    grp = group_of(a, "c1")
    assert not grp.prunable
    assert any("read inside the subgraph of If 'branch'" in r and "act_out" in r for r in grp.blocked), grp.blocked
    assert group_of(a, "c2").prunable  # the other branch is untouched
    assert not any("subgraph" in r for r in group_of(a, "after").blocked)  # the If's output starts fresh


def test_if_model_prunes_elsewhere(tmp_path: Path) -> None:
    for out in assert_random(tmp_path, if_model(), seeds=(0, 1)):
        assert input_shape(out, "c1", 1)[0] == 6


def test_conv_inside_subgraph_is_not_analysed(tmp_path: Path) -> None:
    """A Conv living inside a branch is no producer: subgraphs are not rewritten."""
    g = G()
    x = g.input("x", [1, 3, 6, 6])
    cond = g.input("cond", [], dtype=TensorProto.BOOL)
    w = g.const(g.w(6, 3, 3, 3))
    then_g = helper.make_graph(
        [helper.make_node("Conv", [x, w], ["t"], name="inner", kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
        "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    else_g = helper.make_graph(
        [helper.make_node("Conv", [x, w], ["e"], name="inner2", kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
        "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    branch = g.op("If", [cond], then_branch=then_g, else_branch=else_g)
    y = g.conv(branch, 6, 4, name="c2")
    a = analysis_of(tmp_path, g.model([y]))
    assert {p.name for grp in a.groups for p in grp.producers} == {"c2"}
