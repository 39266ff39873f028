"""No writes outside the output's temp folder: onnxruntime's symbolic shape inference (run
while loading) saves ``sym_shape_infer_temp.onnx`` into the current directory when it
cannot finish, following a symlink planted there."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx import helper

import onnxprune
from builders import G, save
from onnxprune.cli import main

VICTIM = b"an unrelated file that must survive\n"


def _incomplete_for_symbolic_inference(path: Path) -> Path:
    """A Conv, then an op of an unknown domain: symbolic inference stops at it."""
    g = G()
    x = g.input("x", ["N", 3, 8, 8])
    a = g.op("Relu", [g.conv(x, 3, 8, name="c1")])
    m = g.model([a])
    m.graph.node.append(helper.make_node("Mystery", [a], ["z"], domain="custom.x", name="myst"))
    m.graph.node.append(helper.make_node("Relu", ["z"], ["y"], name="r2"))
    m.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", "C", "H", "W"]))
    m.opset_import.append(helper.make_opsetid("custom.x", 1))
    return save(m, path)


def _plant(cwd: Path, victim: Path) -> None:
    victim.write_bytes(VICTIM)
    for name in ("sym_shape_infer_temp.onnx", "sym_shape_infer_temp.onnx.data"):
        os.symlink(victim, cwd / name)


def test_load_writes_nothing_into_the_current_directory(tmp_path, monkeypatch):
    model = _incomplete_for_symbolic_inference(tmp_path / "m.onnx")
    cwd, victim = tmp_path / "cwd", tmp_path / "victim.txt"
    cwd.mkdir()
    _plant(cwd, victim)
    before = sorted(os.listdir(cwd))
    monkeypatch.chdir(cwd)
    report = onnxprune.analyze(model)
    assert any("Mystery" in r for g in report.groups for r in g.blocked)
    assert victim.read_bytes() == VICTIM
    assert sorted(os.listdir(cwd)) == before


def test_cli_writes_nothing_into_the_current_directory(capsys, tmp_path, monkeypatch):
    model = _incomplete_for_symbolic_inference(tmp_path / "m.onnx")
    cwd, victim = tmp_path / "cwd", tmp_path / "victim.txt"
    cwd.mkdir()
    _plant(cwd, victim)
    monkeypatch.chdir(cwd)
    main([str(model), str(tmp_path / "o.onnx"), "-q"])  # nothing prunable (the group reaches Mystery): exit 2
    assert victim.read_bytes() == VICTIM
    assert sorted(os.listdir(cwd)) == ["sym_shape_infer_temp.onnx", "sym_shape_infer_temp.onnx.data"]
