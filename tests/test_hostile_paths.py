"""Paths that collide: a report, plot or JSON naming an input file, the output or its data
file, and outputs that would land on the input's files, are exit 2 before any work."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import pytest

from builders import save
from test_bad_input import _cnn, expect_refusal


def _external(tmp_path: Path, name: str = "m.onnx", data: str = "m.onnx.data") -> tuple[Path, Path]:
    onnx.save(_cnn(), str(tmp_path / name), save_as_external_data=True, location=data, size_threshold=0)
    return tmp_path / name, tmp_path / data


@pytest.mark.parametrize("flag", ["--report", "--plot"])
@pytest.mark.parametrize("target", ["input", "symlink", "hardlink", "output", "output data", "input data"])
def test_side_output_collides(capsys, tmp_path, flag, target):
    src, data = _external(tmp_path)
    out = tmp_path / "o.onnx"
    paths = {
        "input": src, "output": out, "output data": tmp_path / "o.onnx.data", "input data": data,
        "symlink": tmp_path / "link.json", "hardlink": tmp_path / "hard.json",
    }
    if target == "symlink":
        os.symlink(src, paths[target])
    if target == "hardlink":
        os.link(src, paths[target])
    expect_refusal(capsys, tmp_path, [str(src), str(out), flag, str(paths[target])], [src, data], flag)


def test_existing_output_named_by_report(capsys, tmp_path):
    src = save(_cnn(), tmp_path / "m.onnx")
    out = save(_cnn(), tmp_path / "o.onnx")  # an earlier result: the report must not replace it
    expect_refusal(capsys, tmp_path, [str(src), str(out), "--report", str(tmp_path / "." / "o.onnx")], [src, out],
                   "is the output model")


def test_report_and_plot_on_one_path(capsys, tmp_path):
    src = save(_cnn(), tmp_path / "m.onnx")
    side = tmp_path / "side.out"
    expect_refusal(capsys, tmp_path, [str(src), str(tmp_path / "o.onnx"), "--report", str(side), "--plot", str(side)],
                   [src], "--plot")


@pytest.mark.parametrize("where", ["missing", "under a file"])
def test_report_folder_unusable(capsys, tmp_path, where):
    src = save(_cnn(), tmp_path / "m.onnx")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    report = tmp_path / "no" / "r.json" if where == "missing" else blocker / "r.json"
    expect_refusal(capsys, tmp_path, [str(src), str(tmp_path / "o.onnx"), "--report", str(report)], [src, blocker],
                   "--report")


def test_analyze_json_on_the_input(capsys, tmp_path):
    src = save(_cnn(), tmp_path / "m.onnx")
    expect_refusal(capsys, tmp_path, ["analyze", str(src), "--json", str(src)], [src], "--json")


def test_output_onto_input_external_data(capsys, tmp_path):
    src, data = _external(tmp_path)
    expect_refusal(capsys, tmp_path, [str(src), str(data)], [src, data], "external data file")


def test_input_named_like_output_data(capsys, tmp_path):
    # The input model is called what the output's data file will be: o.onnx -> o.onnx.data.
    src, data = _external(tmp_path, name="o.onnx.data", data="weights.bin")
    expect_refusal(capsys, tmp_path, [str(src), str(tmp_path / "o.onnx")], [src, data], "data file")


def test_input_data_named_like_output_data(capsys, tmp_path):
    src, data = _external(tmp_path, name="m.onnx", data="o.onnx.data")
    expect_refusal(capsys, tmp_path, [str(src), str(tmp_path / "o.onnx")], [src, data], "data file")


def test_report_written_atomically_beside_output(capsys, tmp_path):
    from onnxprune.cli import main

    src = save(_cnn(), tmp_path / "m.onnx")
    report = tmp_path / "r.json"
    assert main([str(src), str(tmp_path / "o.onnx"), "--report", str(report), "-q"]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "o.onnx", "r.json"]
    assert report.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
