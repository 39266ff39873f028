"""Every form of --calib, and every way it can be wrong (exit 2, one line, nothing written)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxprune
from builders import G, save
from onnxprune.cli import main
from onnxprune.data import InputSpec, Preprocess, batches, load_image, source_items

from test_bad_input import expect_refusal

ROOT = Path(__file__).resolve().parent.parent


def _cnn(inputs: int = 1) -> onnx.ModelProto:
    g = G()
    x = g.input("x", ["N", 3, 8, 8])
    a = g.op("Relu", [g.conv(x, 3, 8, name="c1")])
    if inputs == 2:
        s = g.input("s", ["N", 8, 8, 8])
        a = g.op("Add", [a, s])
    b = g.op("Relu", [g.conv(a, 8, 8, name="c2")])
    return g.model([g.gemm(g.op("Flatten", [g.op("GlobalAveragePool", [b])]), 8, 4, name="fc")])


def _x(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)


def test_npy_folder_single_samples_and_batches(tmp_path):
    src = save(_cnn(), tmp_path / "m.onnx")
    d = tmp_path / "calib"
    d.mkdir()
    for i in range(5):
        np.save(d / f"one_{i}.npy", _x(1, i)[0])  # one sample, no batch axis
    np.save(d / "batch.npy", _x(7, 9))  # a batch
    _, r = onnxprune.prune(src, calib=str(d), method="wanda", ratio=0.25, batch_size=4, eval_samples=0)
    assert r.calibration["samples"] == 12


def test_npz_folder_multi_input(tmp_path):
    src = save(_cnn(inputs=2), tmp_path / "m.onnx")
    d = tmp_path / "calib"
    d.mkdir()
    for i in range(3):
        s = np.random.default_rng(i).standard_normal((4, 8, 8, 8)).astype(np.float32)
        np.savez(d / f"b{i}.npz", x=_x(4, i), s=s)
    _, r = onnxprune.prune(src, calib=str(d), method="flap", ratio=0.25, eval_samples=0)
    assert r.calibration["samples"] == 12


def test_max_samples_and_rebatching():
    spec = [InputSpec("x", np.dtype(np.float32), (None, 3, 8, 8))]
    items = ((f"i{k}", {"x": _x(3, k)}) for k in range(5))
    got = [b["x"].shape[0] for b in batches(items, spec, 4, max_samples=10)]
    assert got == [4, 4, 2]


def test_image_folder_with_preprocessing(tmp_path):
    from PIL import Image

    src = save(_cnn(), tmp_path / "m.onnx")
    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (12 + i, 16, 3), dtype=np.uint8)).save(d / f"p{i}.png")
    code = main([str(src), str(tmp_path / "o.onnx"), "--calib", str(d), "--resize", "10", "--crop", "8",
                 "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "-q"])
    assert code == 0
    spec = InputSpec("x", np.dtype(np.float32), (None, 3, 8, 8))
    arr = load_image(d / "p0.png", spec, Preprocess(resize=10, crop=8, mean=(0.5,) * 3, std=(0.25,) * 3))
    assert arr.shape == (3, 8, 8) and arr.dtype == np.float32
    nhwc = load_image(d / "p0.png", spec, Preprocess(crop=8, layout="NHWC", channels="BGR"))
    assert nhwc.shape == (8, 8, 3) and 0 <= nhwc.min() and nhwc.max() <= 1


def test_iterable_of_dicts_and_generator(tmp_path):
    src = save(_cnn(), tmp_path / "m.onnx")
    _, a = onnxprune.prune(src, calib=[{"x": _x(4, i)} for i in range(3)], method="activation", ratio=0.5, eval_samples=0)
    _, b = onnxprune.prune(src, calib=({"x": _x(4, i)} for i in range(3)), method="activation", ratio=0.5, eval_samples=0)
    assert a.calibration["samples"] == b.calibration["samples"] == 12
    assert [g["kept"] for g in a.groups] == [g["kept"] for g in b.groups]


def _calib_dir(tmp_path: Path, arrays: dict[str, object]) -> Path:
    d = tmp_path / "calib"
    d.mkdir()
    for name, arr in arrays.items():
        if name.endswith(".npz"):
            np.savez(d / name, **arr)
        elif name.endswith(".npy"):
            np.save(d / name, arr)
        else:
            (d / name).write_bytes(arr)
    return d


BAD = {
    "wrong name": ({"a.npz": {"y": np.zeros((2, 3, 8, 8), np.float32)}}, "expected inputs ['x']"),
    "wrong rank": ({"a.npy": np.zeros((2, 3), np.float32)}, "expected rank 4"),
    "wrong dtype": ({"a.npy": np.zeros((2, 3, 8, 8), np.float64)}, "expected dtype float32, found float64"),
    "wrong fixed dim": ({"a.npy": np.zeros((2, 4, 8, 8), np.float32)}, "expected shape [?, 3, 8, 8], found [2, 4, 8, 8]"),
    "nan": ({"a.npy": np.full((2, 3, 8, 8), np.nan, np.float32)}, "NaN or Inf"),
    "inf": ({"a.npy": np.full((2, 3, 8, 8), np.inf, np.float32)}, "NaN or Inf"),
    "empty folder": ({}, "holds no .npy"),
    "corrupt npy": ({"a.npy.bin": b"", "a.npy": np.zeros(1)}, "expected rank 4"),
    "garbage file": ({"z.npy": None}, "cannot be read"),
    "mixed kinds": ({"a.npy": np.zeros((2, 3, 8, 8), np.float32), "b.png": b"\x89PNG"}, "mixes arrays and images"),
    "zero samples": ({"a.npy": np.zeros((0, 3, 8, 8), np.float32)}, "holds no samples"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_calibration_data(capsys, tmp_path, case):
    arrays, needle = BAD[case]
    if case == "garbage file":
        arrays = {}
    d = _calib_dir(tmp_path, arrays)
    if case == "garbage file":
        (d / "z.npy").write_bytes(b"not numpy at all")
    src = save(_cnn(), tmp_path / "m.onnx")
    line = expect_refusal(capsys, tmp_path, [str(src), str(tmp_path / "o.onnx"), "--calib", str(d)], [src], needle)
    if case not in ("empty folder", "mixed kinds"):
        assert ".np" in line  # names the file


def test_missing_calibration_folder(capsys, tmp_path):
    src = save(_cnn(), tmp_path / "m.onnx")
    expect_refusal(capsys, tmp_path, [str(src), str(tmp_path / "o.onnx"), "--calib", str(tmp_path / "nope")], [src], "not found")


def test_data_method_without_data(capsys, tmp_path):
    src = save(_cnn(), tmp_path / "m.onnx")
    expect_refusal(capsys, tmp_path, [str(src), str(tmp_path / "o.onnx"), "--method", "wanda"], [src], "--calib")


def test_images_for_a_two_input_model(capsys, tmp_path):
    from PIL import Image

    src = save(_cnn(inputs=2), tmp_path / "m.onnx")
    d = tmp_path / "imgs"
    d.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "a.png")
    expect_refusal(capsys, tmp_path, [str(src), str(tmp_path / "o.onnx"), "--calib", str(d)], [src], "single-input")


def test_reader_consumed_twice_is_reported():
    spec = [InputSpec("x", np.dtype(np.float32), (None, 3, 8, 8))]

    class Reader:
        def __init__(self):
            self.left = 2

        def get_next(self):
            self.left -= 1
            return {"x": _x(1)} if self.left >= 0 else None

    again = source_items(Reader(), spec)
    assert len(list(again())) == 2
    with pytest.raises(onnxprune.InputError, match="already consumed"):
        list(again())


def _gray_digits(folder: Path, n: int = 64) -> Path:
    """The shipped MNIST calibration digits as 8-bit grayscale PNGs."""
    from PIL import Image

    folder.mkdir()
    digits = np.load(ROOT / "models/data/calib/calib_000.npy")
    for i, d in enumerate(np.concatenate([digits, np.load(ROOT / "models/data/calib/calib_001.npy")])[:n]):
        Image.fromarray(np.round(d[0] * 255).astype(np.uint8), mode="L").save(folder / f"d{i:03d}.png")
    return folder


def test_a_one_channel_model_calibrates_from_grayscale_pngs(tmp_path):
    """The shipped MNIST CNN (input [N, 1, 28, 28]) reads a folder of grayscale PNGs: images
    become one channel, pixel·scale, equal to the digits they were written from."""
    folder = _gray_digits(tmp_path / "pngs")
    code = main([str(ROOT / "models/mnist_cnn.onnx"), str(tmp_path / "o.onnx"), "--calib", str(folder), "--ratio", "0.3", "-q"])
    assert code == 0 and (tmp_path / "o.onnx").is_file()
    spec = InputSpec("input", np.dtype(np.float32), (None, 1, 28, 28))
    arr = load_image(folder / "d000.png", spec, Preprocess())
    want = np.load(ROOT / "models/data/calib/calib_000.npy")[0]
    assert arr.shape == (1, 28, 28)
    np.testing.assert_allclose(arr, np.round(want * 255) / 255, atol=1e-6)
    # --channels L reads a colour image as its luma, for any model.
    from PIL import Image

    Image.fromarray(np.full((28, 28, 3), (255, 0, 0), np.uint8)).save(tmp_path / "red.png")
    red = load_image(tmp_path / "red.png", InputSpec("x", np.dtype(np.float32), (None, 28, 28, 1)),
                     Preprocess(layout="NHWC", channels="L"))
    assert red.shape == (28, 28, 1) and np.allclose(red, 76 / 255)  # ITU-R 601 luma of pure red


def test_grayscale_with_three_different_means_is_refused(capsys, tmp_path):
    folder = _gray_digits(tmp_path / "pngs", n=4)
    model = ROOT / "models/mnist_cnn.onnx"
    expect_refusal(capsys, tmp_path, [str(model), str(tmp_path / "o.onnx"), "--calib", str(folder), "--mean", "0.1,0.2,0.3", "-q"],
                   [model], "one --mean and one --std value")
