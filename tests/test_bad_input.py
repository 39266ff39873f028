"""Bad input: one clear line on stderr, exit code 2, nothing written, input untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import G, save
from onnxprune.cli import main


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cnn() -> onnx.ModelProto:
    g = G()
    x = g.input("x", ["N", 3, 8, 8])
    a = g.op("Relu", [g.conv(x, 3, 8, name="c1")])
    b = g.op("GlobalAveragePool", [g.conv(a, 8, 8, name="c2")])
    return g.model([g.gemm(g.op("Flatten", [b]), 8, 4, name="fc")])


def expect_refusal(capsys, tmp_path: Path, args: list[str], inputs: list[Path], needle: str) -> str:
    """Run the CLI; assert exit 2, a single stderr line containing ``needle``, no new files."""
    before = {p: _digest(p) for p in inputs if p.exists()}
    listing = sorted(p.name for p in tmp_path.iterdir())
    code = main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == listing, "something was written"
    assert {p: _digest(p) for p in before} == before, "the input was modified"
    return lines[0]


def test_missing_file(capsys, tmp_path):
    expect_refusal(capsys, tmp_path, [str(tmp_path / "nope.onnx"), str(tmp_path / "o.onnx")], [], "not found")


def test_not_onnx(capsys, tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is a text file, not a model\n")
    expect_refusal(capsys, tmp_path, [str(bad), str(tmp_path / "o.onnx")], [bad], "not an ONNX model")


def test_empty_file(capsys, tmp_path):
    bad = tmp_path / "empty.onnx"
    bad.write_bytes(b"")
    expect_refusal(capsys, tmp_path, [str(bad), str(tmp_path / "o.onnx")], [bad], "not an ONNX model")


def test_truncated_protobuf(capsys, tmp_path):
    full = _cnn().SerializeToString()
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(full[: len(full) // 2])
    expect_refusal(capsys, tmp_path, [str(bad), str(tmp_path / "o.onnx")], [bad], "cut.onnx")


@pytest.mark.parametrize("ratio", ["1", "1.5", "-0.1"])
def test_ratio_outside_range(capsys, tmp_path, ratio):
    src = save(_cnn(), tmp_path / "m.onnx")
    expect_refusal(capsys, tmp_path, [str(src), str(tmp_path / "o.onnx"), "--ratio", ratio], [src], "--ratio")


def test_ratio_not_a_number(capsys, tmp_path):
    src = save(_cnn(), tmp_path / "m.onnx")
    expect_refusal(capsys, tmp_path, [str(src), str(tmp_path / "o.onnx"), "--ratio", "half"], [src], "--ratio")


def test_output_equals_input(capsys, tmp_path):
    src = save(_cnn(), tmp_path / "m.onnx")
    expect_refusal(capsys, tmp_path, [str(src), str(src)], [src], "is the input model")
    # The same file reached through another spelling of the path.
    expect_refusal(capsys, tmp_path, [str(src), str(tmp_path / "." / "m.onnx")], [src], "is the input model")


def test_output_folder_missing(capsys, tmp_path):
    src = save(_cnn(), tmp_path / "m.onnx")
    expect_refusal(capsys, tmp_path, [str(src), str(tmp_path / "no" / "o.onnx")], [src], "does not exist")


def test_output_folder_unwritable(capsys, tmp_path):
    # Root ignores permission bits, so use a "folder" that is a file: writing under it fails for anyone.
    src = save(_cnn(), tmp_path / "m.onnx")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    expect_refusal(capsys, tmp_path, [str(src), str(blocker / "o.onnx")], [src, blocker], "output folder")


def _quantized(op: str) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.INT32, None)
    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.uint8), "w")
    if op == "MatMulInteger":
        x = helper.make_tensor_value_info("x", TensorProto.UINT8, [2, 3])
        w = numpy_helper.from_array(np.ones((3, 4), np.uint8), "w")
        node = helper.make_node("MatMulInteger", ["x", "w"], ["y"], name="q")
    elif op == "ConvInteger":
        node = helper.make_node("ConvInteger", ["x", "w"], ["y"], name="q")
    else:
        y = helper.make_tensor_value_info("y", TensorProto.UINT8, None)
        s = numpy_helper.from_array(np.array(0.1, np.float32), "s")
        z = numpy_helper.from_array(np.array(0, np.uint8), "z")
        node = helper.make_node("QLinearConv", ["x", "s", "z", "w", "s", "z", "s", "z"], ["y"], name="q")
        graph = helper.make_graph([node], "q", [x], [y], [w, s, z])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    graph = helper.make_graph([node], "q", [x], [y], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("op", ["QLinearConv", "ConvInteger", "MatMulInteger"])
def test_quantized_graph(capsys, tmp_path, op):
    src = save(_quantized(op), tmp_path / "q.onnx")
    line = expect_refusal(capsys, tmp_path, [str(src), str(tmp_path / "o.onnx")], [src], "quantized")
    assert op in line


def _if_model(conv_outside: bool) -> onnx.ModelProto:
    """Weights inside both branches of an If; optionally a prunable Conv pair before it."""
    rng = np.random.default_rng(0)

    def branch(name: str) -> onnx.GraphProto:
        w = numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), f"{name}_w")
        node = helper.make_node("MatMul", ["feat", f"{name}_w"], [f"{name}_y"], name=f"{name}_mm")
        return helper.make_graph([node], name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [2, 8])], [w])

    nodes, inits = [], []
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 6, 6]),
              helper.make_tensor_value_info("cond", TensorProto.BOOL, [])]
    src = "x"
    if conv_outside:
        for i, (cin, cout) in enumerate([(4, 8), (8, 4)]):
            inits.append(numpy_helper.from_array(rng.standard_normal((cout, cin, 3, 3)).astype(np.float32), f"w{i}"))
            nodes.append(helper.make_node("Conv", [src, f"w{i}"], [f"conv{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
            nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"], name=f"relu{i}"))
            src = f"relu{i}"
    nodes.append(helper.make_node("GlobalAveragePool", [src], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["feat"], name="flat"))
    nodes.append(helper.make_node("If", ["cond"], ["y"], name="branchy", then_branch=branch("then"), else_branch=branch("else")))
    graph = helper.make_graph(nodes, "cf", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_weights_only_inside_if(capsys, tmp_path):
    src = save(_if_model(conv_outside=False), tmp_path / "if.onnx")
    expect_refusal(capsys, tmp_path, [str(src), str(tmp_path / "o.onnx")], [src], "nothing outside control flow is prunable: 2 MatMul nodes are inside the subgraphs of If 'branchy'")


def test_if_prunes_outside_and_leaves_subgraphs_untouched(capsys, tmp_path):
    src = save(_if_model(conv_outside=True), tmp_path / "if.onnx")
    out = tmp_path / "o.onnx"
    assert main([str(src), str(out), "--ratio", "0.5", "-q"]) == 0, capsys.readouterr().err
    before, after = onnx.load(str(src)), onnx.load(str(out))

    def subgraphs(m: onnx.ModelProto) -> list[tuple]:
        # Nodes and weights; inferred value_info may legitimately be added.
        return [
            ([x.SerializeToString() for x in a.g.node], [x.SerializeToString() for x in a.g.initializer])
            for n in m.graph.node for a in n.attribute if a.HasField("g")
        ]

    assert subgraphs(before) == subgraphs(after)
    w0 = {t.name: t for t in after.graph.initializer}["w0"]
    assert list(w0.dims) == [4, 4, 3, 3]  # conv0 (read only outside the If) lost half its filters
    # conv1's channels reach the If through Flatten: they stay.
    assert list({t.name: t for t in after.graph.initializer}["w1"].dims)[0] == 4


def test_external_data_outside_folder(capsys, tmp_path):
    inner = tmp_path / "model"
    inner.mkdir()
    proto = _cnn()
    onnx.save(proto, str(inner / "m.onnx"), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    (tmp_path / "secret.data").write_bytes((inner / "m.onnx.data").read_bytes())
    proto = onnx.load(str(inner / "m.onnx"), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../secret.data"
    onnx.save(proto, str(inner / "m.onnx"))
    src = inner / "m.onnx"
    expect_refusal(capsys, inner, [str(src), str(inner / "o.onnx")], [src], "outside the model's folder")


def test_external_data_absolute_path(capsys, tmp_path):
    proto = _cnn()
    onnx.save(proto, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    proto = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = str(tmp_path / "m.onnx.data")
    onnx.save(proto, str(tmp_path / "m.onnx"))
    src = tmp_path / "m.onnx"
    expect_refusal(capsys, tmp_path, [str(src), str(tmp_path / "o.onnx")], [src], "outside the model's folder")


def test_old_opset(capsys, tmp_path):
    proto = _cnn()
    proto.opset_import[0].version = 9
    src = tmp_path / "old.onnx"
    src.write_bytes(proto.SerializeToString())
    expect_refusal(capsys, tmp_path, [str(src), str(tmp_path / "o.onnx")], [src], "opset 9")


def test_directory_as_input(capsys, tmp_path):
    d = tmp_path / "dir.onnx"
    d.mkdir()
    expect_refusal(capsys, tmp_path, [str(d), str(tmp_path / "o.onnx")], [], "not a file")
