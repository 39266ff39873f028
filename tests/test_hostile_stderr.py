"""Third-party noise: onnxruntime's log, onnx_ir's log records and Python warnings stay off
stderr unless -v, so every failure is exactly one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from builders import save
from onnxprune.cli import main
from test_bad_input import _cnn


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _untyped_value_info(tmp_path: Path) -> Path:
    """A value_info with a shape but no element type: onnx_ir logs "Skipping serialization"
    each time it saves the model, and onnxruntime refuses to load it."""
    proto = _cnn()
    vi = onnx.ValueInfoProto(name=proto.graph.node[0].output[0])
    vi.type.tensor_type.shape.dim.add().dim_param = "N"
    proto.graph.value_info.append(vi)
    return save(proto, tmp_path / "untyped.onnx")


# pytest's log capture takes the records that would reach stderr through logging's
# last-resort handler, so the records are checked in ``caplog``.
def test_one_line_without_verbose(capfd, caplog, tmp_path):
    src = _untyped_value_info(tmp_path)
    assert main([str(src), str(tmp_path / "o.onnx"), "-q"]) == 2
    err = _lines(capfd.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Skipping serialization" not in caplog.text


def test_verbose_lets_third_party_lines_through(capfd, caplog, tmp_path):
    src = _untyped_value_info(tmp_path)
    assert main([str(src), str(tmp_path / "o.onnx"), "-q", "-v"]) == 2
    assert "Skipping serialization" in caplog.text
    assert _lines(capfd.readouterr().err)[-1].startswith("error: ")


def _unused_initializer(tmp_path: Path) -> Path:
    """onnxruntime logs a warning ("Removing initializer") for every session on this model."""
    proto = _cnn()
    proto.graph.initializer.append(numpy_helper.from_array(np.ones(3, np.float32), "unused"))
    return save(proto, tmp_path / "unused.onnx")


def test_onnxruntime_log_silent(capfd, tmp_path):
    src = _unused_initializer(tmp_path)
    assert main([str(src), str(tmp_path / "o.onnx"), "-q"]) == 0
    assert _lines(capfd.readouterr().err) == []
    assert main([str(src), str(tmp_path / "o2.onnx"), "-q", "-v"]) == 0
    assert "Removing initializer" in capfd.readouterr().err
    # -v does not outlive its run.
    assert main([str(src), str(tmp_path / "o3.onnx"), "-q"]) == 0
    assert _lines(capfd.readouterr().err) == []


def test_one_line_in_a_real_process(tmp_path):
    import subprocess
    import sys

    src = _untyped_value_info(tmp_path)
    run = subprocess.run([sys.executable, "-m", "onnxprune", str(src), str(tmp_path / "o.onnx"), "-q"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert len(_lines(run.stderr)) == 1 and run.stderr.startswith("error: "), run.stderr
