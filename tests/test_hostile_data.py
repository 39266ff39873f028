"""Hostile data: zip bombs, huge images and huge declared inputs are refused in one line
before the memory is spent."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from builders import G, save
from onnxprune import _ort, data
from onnxprune.cli import main
from onnxprune.verify import random_feed
from test_bad_input import _cnn, expect_refusal


def _calib_run(tmp_path: Path, folder: Path) -> tuple[list[str], Path]:
    src = save(_cnn(), tmp_path / "m.onnx")
    return [str(src), str(tmp_path / "o.onnx"), "--calib", str(folder), "-q"], src


def test_npz_member_over_the_bound(capsys, tmp_path, monkeypatch):
    # The real bound is 1 GiB; a 2 MiB member against a 1 MiB bound is the same zip bomb, smaller.
    monkeypatch.setattr(data, "MAX_ARRAY_BYTES", 1 << 20)
    folder = tmp_path / "calib"
    folder.mkdir()
    np.savez_compressed(folder / "bomb.npz", x=np.zeros((8192, 3, 8, 8), np.float32))
    assert (folder / "bomb.npz").stat().st_size < 100_000
    args, src = _calib_run(tmp_path, folder)
    expect_refusal(capsys, tmp_path, args, [src, folder / "bomb.npz"], "more than 1 MiB")


def test_npz_header_announcing_a_huge_array(capsys, tmp_path):
    # A few bytes whose .npy header announces 4 TiB: numpy would allocate it before reading.
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (1 << 40, 3, 8, 8)})
    folder = tmp_path / "calib"
    folder.mkdir()
    with zipfile.ZipFile(folder / "liar.npz", "w") as z:
        z.writestr("x.npy", header.getvalue() + b"\0" * 64)
    args, src = _calib_run(tmp_path, folder)
    expect_refusal(capsys, tmp_path, args, [src, folder / "liar.npz"], "liar.npz")


@pytest.mark.parametrize("side", [9000, 10000])
def test_huge_image(capfd, tmp_path, side):
    # 81 megapixels (over onnxprune's 64) and 100 (over Pillow's own warning threshold, 89):
    # one line either way, no warning spill.  1-bit images keep the test's memory small.
    folder = tmp_path / "calib"
    folder.mkdir()
    Image.new("1", (side, side)).save(folder / "big.png")
    g = G()
    x = g.input("x", ["N", 3, 8, 8])
    out = g.op("GlobalAveragePool", [g.op("Relu", [g.conv(g.op("Relu", [g.conv(x, 3, 8)]), 8, 8)])])
    src = save(g.model([out]), tmp_path / "m.onnx")
    code = main([str(src), str(tmp_path / "o.onnx"), "--calib", str(folder), "-q"])
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "image too large" in err[0], err
    assert not (tmp_path / "o.onnx").exists()


def test_huge_declared_input(capsys, tmp_path):
    g = G()
    x = g.input("x", [1, 3, 8000, 8000])  # 768 MB of float32 for one synthetic sample
    a = g.op("Relu", [g.conv(x, 3, 8, k=1)])
    src = save(g.model([g.conv(a, 8, 4, k=1)]), tmp_path / "big.onnx")
    expect_refusal(capsys, tmp_path, [str(src), str(tmp_path / "o.onnx")], [src], "synthetic test batch")


def test_synthetic_feed_is_float32(tmp_path):
    src = save(_cnn(), tmp_path / "m.onnx")
    feed = random_feed(_ort.session(str(src)))
    assert feed["x"].dtype == np.float32 and feed["x"].shape == (2, 3, 8, 8)
