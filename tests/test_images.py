"""Image folders (issue 15, item 6): ``--channels GRAY|RGB|BGR`` (``L`` an alias of GRAY;
GRAY by default for a model whose input has one channel), and every PNG kind Pillow writes
read correctly: RGBA and LA (alpha dropped, stored colours kept), palettes with a
transparent entry (no Pillow warning), 16-bit grayscale (on the 8-bit scale, not clipped),
bilevel.  Real PNG files, written by Pillow."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from builders import save, small_cnn
from onnxprune.cli import main
from onnxprune.data import InputSpec, Preprocess, load_image
from test_bad_input import expect_refusal

ROOT = Path(__file__).resolve().parent.parent
MNIST = ROOT / "models" / "mnist_cnn.onnx"
GRAY = InputSpec("x", np.dtype(np.float32), (None, 1, 6, 5))
COLOUR = InputSpec("x", np.dtype(np.float32), (None, 3, 6, 5))
RAW = Preprocess(scale=1.0)  # pixel values as read


def _read(path: Path, spec: InputSpec, pre: Preprocess = RAW) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's palette-transparency warning would be a second stderr line
        return load_image(path, spec, pre)


def _rgb(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (6, 5, 3), dtype=np.uint8)


def test_rgba_drops_alpha_and_keeps_the_stored_colours(tmp_path):
    rgb = _rgb()
    alpha = np.zeros((6, 5, 1), np.uint8)  # fully transparent: the colours still count
    alpha[:3] = 255
    Image.fromarray(np.concatenate([rgb, alpha], axis=2), mode="RGBA").save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode == "RGBA"
    np.testing.assert_array_equal(_read(tmp_path / "a.png", COLOUR), rgb.transpose(2, 0, 1))
    luma = np.asarray(Image.fromarray(rgb).convert("L"), np.float32)
    np.testing.assert_array_equal(_read(tmp_path / "a.png", GRAY)[0], luma)
    # BGR reverses the colour channels, NHWC keeps them last.
    bgr = _read(tmp_path / "a.png", InputSpec("x", np.dtype(np.float32), (None, 6, 5, 3)),
                Preprocess(scale=1.0, channels="BGR", layout="NHWC"))
    np.testing.assert_array_equal(bgr, rgb[..., ::-1])


def test_palette_with_a_transparent_entry(tmp_path):
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [40, 80, 120]], np.uint8)
    index = np.random.default_rng(1).integers(0, 4, (6, 5)).astype(np.uint8)
    img = Image.fromarray(index, mode="P")
    img.putpalette(colours.ravel().tolist())
    img.save(tmp_path / "p.png", transparency=bytes([0, 128, 255, 255]))  # per-entry alpha: a tRNS chunk
    reopened = Image.open(tmp_path / "p.png")
    assert reopened.mode == "P" and isinstance(reopened.info["transparency"], bytes)
    np.testing.assert_array_equal(_read(tmp_path / "p.png", COLOUR), colours[index].transpose(2, 0, 1))
    luma = np.asarray(Image.fromarray(colours[index]).convert("L"), np.float32)
    np.testing.assert_array_equal(_read(tmp_path / "p.png", GRAY)[0], luma)


def test_sixteen_bit_grayscale_is_read_on_the_8_bit_scale(tmp_path):
    values = np.array([0, 257, 1000, 32768, 65535] * 6, np.uint16).reshape(6, 5)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    got = _read(tmp_path / "g16.png", GRAY, Preprocess())  # --scale 1/255: 65535 -> 1.0
    np.testing.assert_allclose(got[0], values / 65535.0, rtol=1e-6)
    # A colour model reads the gray value into all three channels.
    np.testing.assert_allclose(_read(tmp_path / "g16.png", COLOUR, Preprocess()), np.stack([values / 65535.0] * 3), rtol=1e-6)


def test_la_and_bilevel(tmp_path):
    gray = _rgb()[..., 0]
    la = np.stack([gray, np.full_like(gray, 7)], axis=2)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(_read(tmp_path / "la.png", GRAY)[0], gray)
    np.testing.assert_array_equal(_read(tmp_path / "la.png", COLOUR), np.stack([gray] * 3))
    Image.fromarray(gray > 127).save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode == "1"
    np.testing.assert_array_equal(_read(tmp_path / "b.png", GRAY)[0], np.where(gray > 127, 255, 0))


def _digits_as_16_bit_pngs(folder: Path, n: int = 48) -> Path:
    folder.mkdir()
    digits = np.load(ROOT / "models/data/calib/calib_000.npy")[:n]
    for i, d in enumerate(digits):
        Image.fromarray(np.round(d[0] * 65535).astype(np.uint16)).save(folder / f"d{i:03d}.png")
    return folder


def test_mnist_cnn_calibrates_from_16_bit_pngs_with_channels_gray(tmp_path):
    folder = _digits_as_16_bit_pngs(tmp_path / "pngs")
    spec = InputSpec("input", np.dtype(np.float32), (None, 1, 28, 28))
    want = np.load(ROOT / "models/data/calib/calib_000.npy")[0]
    np.testing.assert_allclose(_read(folder / "d000.png", spec, Preprocess(channels="GRAY")), want, atol=1e-4)
    for channels in ("GRAY", "gray", "L"):
        assert main([str(MNIST), str(tmp_path / "o.onnx"), "--calib", str(folder), "--channels", channels,
                     "--ratio", "0.3", "--max-samples", "16", "-q"]) == 0


def test_colour_channels_for_a_one_channel_model_are_refused(capsys, tmp_path):
    folder = _digits_as_16_bit_pngs(tmp_path / "pngs", n=4)
    expect_refusal(capsys, tmp_path, [str(MNIST), str(tmp_path / "o.onnx"), "--calib", str(folder), "--channels", "RGB", "-q"],
                   [MNIST], "--channels RGB reads images as 3 channels, but input 'input' takes 1")


def test_gray_for_a_three_channel_model_is_refused(capsys, tmp_path):
    src = save(small_cnn(), tmp_path / "m.onnx")
    folder = tmp_path / "pngs"
    folder.mkdir()
    Image.fromarray(_rgb()).save(folder / "a.png")
    expect_refusal(capsys, tmp_path, [str(src), str(tmp_path / "o.onnx"), "--calib", str(folder), "--channels", "GRAY", "-q"],
                   [src], "--channels GRAY reads images as 1 channel, but input 'x' takes 3")


def test_a_folder_read_by_several_threads_gives_the_same_samples_in_order(tmp_path):
    """The eval folder is read by several threads: the same samples in the same order as
    one reader; a file that cannot be read fails at its place; leaving early leaves no
    reading thread behind."""
    import threading

    import pytest

    from onnxprune.data import InputError, source_items

    for i in range(11):
        Image.fromarray(_rgb(i)).save(tmp_path / f"{i:02d}.png")
    one = list(source_items(tmp_path, [COLOUR], RAW)())
    four = list(source_items(tmp_path, [COLOUR], RAW, workers=4)())
    assert [w for w, _ in four] == [w for w, _ in one] and len(one) == 11
    assert all(np.array_equal(a["x"], b["x"]) for (_, a), (_, b) in zip(one, four))

    (tmp_path / "05.png").write_bytes(b"not a png")
    read = []
    with pytest.raises(InputError, match="05.png: not a readable image"):
        for where, _ in source_items(tmp_path, [COLOUR], RAW, workers=4)():
            read.append(Path(where).name)
    assert read == [f"{i:02d}.png" for i in range(5)]
    assert not [t for t in threading.enumerate() if t.name.startswith("onnxprune-decode")]
