"""Constant-only subgraphs are folded at load time.

The TorchScript exporter writes every ``nn.ZeroPad2d`` / ``F.pad`` as a Pad whose pads are
computed from constants only: ConstantOfShape → Concat → Reshape → Slice → Transpose →
Reshape → Cast.  ``load_model`` folds such small constant-only nodes into ``Constant``
nodes before onnx shape inference runs, so the Pad group is prunable and the MACs are
counted with real shapes (inference used to stop at the first such Pad).  Nodes with big
outputs, non-deterministic ops, subgraphs and graph outputs are left alone, and folding
does not change the parameter count.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from builders import G, max_diff, params, remove_exact, run, save
from onnxprune._graph import is_const
from onnxprune.fold import FOLD_LIMIT
from onnxprune._ort import session
from onnxprune.count import count_macs, count_params
from onnxprune.load import load_model
from onnxprune.verify import random_feed
from topology import analysis_of, assert_exact, assert_random, consumer_names, group_of, input_shape

C = 6
i64 = np.int64
INT64_MAX = np.iinfo(np.int64).max
CHAIN = ("ConstantOfShape", "Concat", "Reshape", "Slice", "Transpose", "Cast")


def _exported_pads(g: G, torch_pads: list[int], rank: int = 4) -> str:
    """The pads input as TorchScript writes ``F.pad(x, torch_pads)``: torch's
    (last-dim-first, begin/end pairs) list is padded with zeros, reversed pairwise and
    transposed into ONNX's (all begins, all ends) order, from constants only."""
    zeros = g.op("ConstantOfShape", [g.const(np.array([2 * rank - len(torch_pads)], i64))],
                 value=numpy_helper.from_array(np.array([0], i64)), name="cos")
    cat = g.op("Concat", [g.const(np.array(torch_pads, i64)), zeros], axis=0, name="cat")
    pairs = g.op("Reshape", [cat, g.const(np.array([-1, 2], i64))], name="pairs")
    rev = g.op("Slice", [pairs, g.const(np.array([-1], i64)), g.const(np.array([-INT64_MAX], i64)),
                         g.const(np.array([0], i64)), g.const(np.array([-1], i64))], name="rev")
    flat = g.op("Reshape", [g.op("Transpose", [rev], perm=[1, 0], name="tr"), g.const(np.array([-1], i64))],
                name="flat")
    return g.op("Cast", [flat], to=TensorProto.INT64, name="cast")


def pad_model(zero: list[int] = (), constant_nodes: bool = False) -> onnx.ModelProto:
    """x → c1(C) → Relu → Pad(pads computed from constants; torch order [1, 1, 2, 0]) → head."""
    g = G(opset=17, constant_nodes=constant_nodes)
    x = g.input("x", ["N", 3, 8, 8])
    h = g.op("Relu", [g.conv(x, 3, C, name="c1")])
    padded = g.op("Pad", [h, _exported_pads(g, [1, 1, 2, 0]), g.const(np.array(0.0, np.float32))],
                  mode="constant", name="pad")
    w = g.w(4, C, 3, 3)
    w[:, list(zero)] = 0
    return g.model([g.conv(padded, C, 4, name="head", weight=w, pads=[0, 0, 0, 0])])


# Hand count: c1 writes [6, 8, 8] from 3×3×3 patches; the pads [0, 0, 2, 1, 0, 0, 0, 1]
# make [6, 10, 10], so head writes [4, 8, 8] from 6×3×3 patches (per sample).
PAD_MACS = 6 * 8 * 8 * 27 + 4 * 8 * 8 * 54


@pytest.mark.parametrize("constant_nodes", [False, True], ids=["initializers", "constant-nodes"])
def test_computed_pads_are_folded(tmp_path: Path, constant_nodes: bool) -> None:
    proto = pad_model(constant_nodes=constant_nodes)
    assert {n.op_type for n in proto.graph.node} >= set(CHAIN)
    path = save(proto, tmp_path / "m.onnx")
    model, _ = load_model(path)
    ops = [n.op_type for n in model.graph]
    assert not set(CHAIN) & set(ops), ops
    pad = next(n for n in model.graph if n.op_type == "Pad")
    assert is_const(pad.inputs[1])
    assert numpy_helper.to_array(ir.serde.serialize_tensor(pad.inputs[1].producer().attributes["value"].value)
                                 ).tolist() == [0, 0, 2, 1, 0, 0, 0, 1]
    # Shape inference now reaches past the Pad, and the MACs are counted with real shapes.
    assert [d if isinstance(d, int) else None for d in pad.outputs[0].shape] == [None, C, 10, 10]
    assert count_macs(model) == PAD_MACS
    report = onnxprune.analyze(path)
    assert report.macs == PAD_MACS
    # Folding leaves the parameter count as it was: the unfolded graph counts the same.
    raw = ir.load(str(path))
    assert count_params(model) == count_params(raw) == report.params
    assert report.params == 3 * C * 9 + C + 4 * C * 9 + 4 + 1  # weights, biases, the pad value
    # The folded model computes the same values (written as load_model holds it).
    folded = tmp_path / "folded.onnx"
    ir.save(model, folded)
    onnx.checker.check_model(str(folded), full_check=True)
    feed = random_feed(session(str(path)), seed=1)
    assert max_diff(run(path, feed), run(folded, feed)) == 0.0


@pytest.mark.parametrize("constant_nodes", [False, True], ids=["initializers", "constant-nodes"])
def test_pad_group_prunes_exactly(tmp_path: Path, constant_nodes: bool) -> None:
    proto = pad_model([0, 3], constant_nodes=constant_nodes)
    grp = group_of(analysis_of(tmp_path, proto), "c1")
    assert grp.prunable, grp.blocked
    assert consumer_names(grp) == {"head"}
    out = assert_exact(tmp_path, proto, "c1", [0, 3])
    assert input_shape(out, "head", 1)[1] == C - 2


def test_pad_group_prunes_randomly(tmp_path: Path) -> None:
    for out in assert_random(tmp_path, pad_model(), seeds=(0,)):
        assert input_shape(out, "head", 1)[1] == C // 2
    _, result = onnxprune.prune(tmp_path / "random_in.onnx", method="l1", ratio=0.5)
    # c1 loses half its filters and head half its input channels: both MACs halve.
    assert result.macs_before == PAD_MACS and result.macs_after == PAD_MACS // 2


# ----------------------------------------------------------------------------- left alone


def test_big_and_unfoldable_constant_nodes_are_left_alone(tmp_path: Path) -> None:
    """A weight computed from constants (Transpose of an initializer: a big input; Expand
    of a scalar: small inputs but a big output), a non-deterministic op, a subgraph and a
    graph output are not folded; the model still loads, analyses and runs the same."""
    g = G(opset=17)
    x = g.input("x", [1, 3, 8, 8])
    w1 = g.op("Transpose", [g.const(g.w(3, C, 3, 3))], perm=[1, 0, 2, 3], name="w1_t")
    h = g.op("Relu", [g.op("Conv", [x, w1], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="c1")])
    shape = g.const(np.array([4, C, 3, 3], i64))
    w2 = g.op("Expand", [g.const(np.array(0.25, np.float32)), shape], name="w2_expand")
    assert 4 * C * 9 > FOLD_LIMIT
    y = g.op("Conv", [h, w2], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="c2")
    noise = g.op("RandomUniformLike", [g.const(np.zeros(4, np.float32))], name="noise", seed=1.0)
    g.op("Mul", [noise, g.const(np.zeros(4, np.float32))], name="unused_noise")
    cond = g.const(np.array(True))
    then = helper.make_graph([helper.make_node("Constant", [], ["t"], value=numpy_helper.from_array(
        np.array([1.0], np.float32)))], "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1])])
    other = helper.make_graph([helper.make_node("Constant", [], ["e"], value=numpy_helper.from_array(
        np.array([2.0], np.float32)))], "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1])])
    branch = g.op("If", [cond], name="branch", then_branch=then, else_branch=other)
    scale = g.op("Mul", [branch, g.const(np.array([3.0], np.float32))], name="scale")  # reads the If: not constant
    out_const = g.op("Cast", [g.const(np.array([1, 2], i64))], to=TensorProto.FLOAT, name="out_cast")
    proto = g.model([g.op("Mul", [y, scale]), out_const])
    path = save(proto, tmp_path / "m.onnx")
    model, _ = load_model(path)
    names = {n.name for n in model.graph}
    assert {"w1_t", "w2_expand", "noise", "branch", "scale", "out_cast"} <= names, names
    ir.save(model, tmp_path / "loaded.onnx")
    feed = {"x": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    assert max_diff(run(path, feed), run(tmp_path / "loaded.onnx", feed)) == 0.0
    # The convolutions' weights are computed at run time: they make no prunable group.
    report = onnxprune.analyze(path)
    assert not any(grp.prunable for grp in report.groups), [grp.to_dict() for grp in report.groups]
    assert report.macs == C * 64 * 27 + 4 * 64 * C * 9  # Expand's static output shape is inferred


def test_small_weight_subgraph_is_folded_exactly(tmp_path: Path) -> None:
    """Small float arithmetic on constants (a per-channel scale computed as Div(a, b)) is
    folded too, bit-exact, and the channel constant is then sliced like any other."""
    g = G(opset=17)
    x = g.input("x", [1, 3, 6, 6])
    scale = g.op("Div", [g.const(np.arange(1, C + 1, dtype=np.float32).reshape(1, C, 1, 1)),
                         g.const(np.array(7.0, np.float32))], name="scale")
    h = g.op("Mul", [g.op("Relu", [g.conv(x, 3, C, name="c1")]), scale])
    w = g.w(2, C, 3, 3)
    w[:, [1, 4]] = 0
    proto = g.model([g.conv(h, C, 2, name="head", weight=w)])
    model, _ = load_model(save(proto, tmp_path / "m.onnx"))
    assert "Div" not in {n.op_type for n in model.graph}
    reference, pruned, out = remove_exact(tmp_path, proto, "c1", [1, 4])
    assert max_diff(reference, pruned) <= 1e-5
    assert params(out) < params(tmp_path / "in.onnx")


# ----------------------------------------------------------------------------- torch export

try:
    import torch
except ImportError:  # the dev extra brings torch; the tests above do not need it
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")


class PadNet(torch.nn.Module if torch is not None else object):
    """Conv → ReLU6 → ZeroPad2d (asymmetric, as EfficientNet's 'same' padding) → Conv."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.c2 = nn.Conv2d(8, 8, 3, stride=2)
        self.c3 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c3(torch.relu(self.c2(self.pad(torch.clamp(self.c1(x), 0, 6)))))


def _export_padnet(path: Path, zero: list[int] = ()) -> Path:
    torch.manual_seed(0)
    model = PadNet().eval()
    with torch.no_grad():
        model.c2.weight[:, list(zero)] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.randn(2, 3, 16, 16),), str(path), dynamo=False, opset_version=17,
            input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        )
    return path


def _pad_group(report_groups):
    return next(grp for grp in report_groups if any(p.op_type == "Conv" and "c1" in p.name for p in grp.producers))


@needs_torch
def test_torchscript_zero_pad_prunes(tmp_path: Path) -> None:
    src = _export_padnet(tmp_path / "padnet.onnx")
    proto = onnx.load(str(src))
    assert {"ConstantOfShape", "Pad"} <= {n.op_type for n in proto.graph.node}, "the exporter idiom changed"
    report = onnxprune.analyze(src)
    grp = _pad_group(report.groups)
    assert grp.prunable, grp.blocked
    assert sum(g.prunable for g in report.groups) == 2  # c1 (through the Pad) and c2; c3 is the output
    # c1: 8×16×16 from 27; c2: 8×8×8 from 72 (17×17 padded, stride 2); c3: 4×8×8 from 8.
    assert report.macs == 8 * 256 * 27 + 8 * 64 * 72 + 4 * 64 * 8
    out = tmp_path / "out.onnx"
    _, result = onnxprune.prune(src, out, method="l1", ratio=0.5)
    onnx.checker.check_model(str(out), full_check=True)
    assert result.params_after < result.params_before and params(out) < params(src)
    assert result.macs_after < result.macs_before
    kept = {g["producers"][0]: g["kept"] for g in result.groups}
    assert kept[next(k for k in kept if "c1" in k)] == 4
    feed = {"x": np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)}
    before, after = run(src, feed), run(out, feed)
    assert [a.shape for a in before] == [a.shape for a in after]
    assert all(np.isfinite(a).all() for a in after)


@needs_torch
def test_torchscript_zero_pad_exact(tmp_path: Path) -> None:
    src = _export_padnet(tmp_path / "padnet.onnx", zero=[1, 5])
    proto = onnx.load(str(src))
    model, _ = load_model(src)
    producer = next(n.name for n in model.graph if n.op_type == "Conv" and "c1" in n.name)
    reference, pruned, out = remove_exact(tmp_path, proto, producer, [1, 5])
    assert max_diff(reference, pruned) <= 1e-5
    assert params(out) < params(tmp_path / "in.onnx")
