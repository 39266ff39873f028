"""External data: read (dynamo-style `X.onnx.data`), written beside the output, and used
automatically for outputs too large for one protobuf."""

from __future__ import annotations

import hashlib
import re
import shutil

import numpy as np
import onnx

import onnxprune
import onnxprune.load
from builders import G, params, run


def _net() -> onnx.ModelProto:
    g = G()
    x = g.input("x", ["N", 3, 8, 8])
    a = g.op("Relu", [g.conv(x, 3, 16, name="c1")])
    b = g.op("Relu", [g.conv(a, 16, 16, name="c2")])
    return g.model([g.op("GlobalAveragePool", [g.conv(b, 16, 4, name="c3")])])


def _feed() -> dict:
    return {"x": np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)}


def test_external_in_external_out(tmp_path):
    src_dir, out_dir = tmp_path / "src", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    src = src_dir / "m.onnx"
    onnx.save(_net(), str(src), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    data_digest = hashlib.sha256((src_dir / "m.onnx.data").read_bytes()).hexdigest()
    out = out_dir / "p.onnx"
    _, result = onnxprune.prune(src, out, ratio=0.5)
    locations = _locations(out)
    (data,) = locations  # relative, beside the model, never the temp name; named by its content
    assert re.fullmatch(r"p\.onnx\.[0-9a-f]{16}\.data", data)
    assert data == f"p.onnx.{hashlib.sha256((out_dir / data).read_bytes()).hexdigest()[:16]}.data"
    assert run(out, _feed())[0].shape == run(src, _feed())[0].shape
    assert result.params_after < result.params_before
    assert hashlib.sha256((src_dir / "m.onnx.data").read_bytes()).hexdigest() == data_digest
    assert sorted(p.name for p in out_dir.iterdir()) == ["p.onnx", data]


def _locations(model) -> set[str]:
    proto = onnx.load(str(model), load_external_data=False)
    return {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}


def test_large_output_goes_to_external_data(tmp_path, monkeypatch):
    # Stand-in for a > 2 GB model: lower the threshold rather than allocate gigabytes.
    monkeypatch.setattr(onnxprune.load, "EXTERNAL_DATA_THRESHOLD", 100)
    src = tmp_path / "m.onnx"
    onnx.save(_net(), str(src))
    out = tmp_path / "p.onnx"
    onnxprune.prune(src, out, ratio=0.25, round_to=1)
    (data,) = _locations(out)
    assert (tmp_path / data).is_file()
    assert params(out) < params(src)
    assert run(out, _feed())[0].shape == (2, 4, 1, 1)


def test_inline_stays_inline(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(_net(), str(src))
    onnxprune.prune(src, tmp_path / "p.onnx", ratio=0.25)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "p.onnx"]


def test_external_data_with_calibration_and_the_refit_gives_the_inline_models_weights(tmp_path, monkeypatch):
    """The data-driven path (calibration, the measured allocation's probes, the lstsq refit
    on segments) on a model whose weights live in an external file: the segments are built
    from bytes, so their tensors must travel inline (they named the file relative to the
    working directory and onnxruntime refused them).  Run from another working directory."""
    src_dir, work = tmp_path / "src", tmp_path / "work"
    src_dir.mkdir()
    work.mkdir()
    inline, external = src_dir / "inline.onnx", src_dir / "m.onnx"
    onnx.save(_net(), str(inline))
    onnx.save(_net(), str(external), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    rng = np.random.default_rng(1)
    calib = [{"x": rng.standard_normal((8, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    monkeypatch.chdir(work)
    outs = {}
    for name, src in (("inline", inline), ("external", external)):
        outs[name] = tmp_path / f"{name}_p.onnx"
        _, result = onnxprune.prune(src, outs[name], calib=calib, target_macs=0.6, compensate="lstsq")
        assert result.params_after < result.params_before
    a = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(outs["inline"])).graph.initializer}
    b = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(outs["external"])).graph.initializer}
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_external_data_on_ray_workers(tmp_path, monkeypatch):
    """The graphs Ray's workers get (the probes' and the refit's) carry the external
    tensors' bytes: a worker has no file at the relative location."""
    import tempfile

    src = tmp_path / "m.onnx"
    onnx.save(_net(), str(src), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    rng = np.random.default_rng(1)
    calib = [{"x": rng.standard_normal((8, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    short = tempfile.mkdtemp(prefix="opr-", dir="/tmp")  # Ray's socket paths must stay short
    monkeypatch.setattr(tempfile, "tempdir", short)
    one, ray_out = tmp_path / "one.onnx", tmp_path / "ray.onnx"
    try:
        onnxprune.prune(src, one, calib=calib, target_macs=0.6, compensate="lstsq")
        onnxprune.prune(src, ray_out, calib=calib, target_macs=0.6, compensate="lstsq", ray="local", workers=2)
    finally:
        shutil.rmtree(short, ignore_errors=True)
    a = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(one)).graph.initializer}
    b = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(ray_out)).graph.initializer}
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_the_error_curve_of_an_external_data_model_equals_the_inline_ones(tmp_path, monkeypatch):
    """``--plot``'s points prune copies of the loaded model: a copy of an external-data
    model still finds its tensors (from another working directory too)."""
    from onnxprune import api
    from onnxprune.config import PruneConfig

    ext, inline = tmp_path / "ext", tmp_path / "inline"
    ext.mkdir()
    inline.mkdir()
    onnx.save(_net(), str(ext / "m.onnx"), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    onnx.save(_net(), str(inline / "m.onnx"))
    data = [{"x": np.random.default_rng(k).standard_normal((4, 3, 8, 8)).astype(np.float32)} for k in range(3)]
    monkeypatch.chdir(tmp_path)
    curves = []
    for folder in (ext, inline):
        config = PruneConfig(calib=data, target_macs=0.7, progress=False, latency=False, batch_size=4)
        _, result = api.prune_with(config, folder / "m.onnx", None, sweep=(0.8, 0.5))
        curves.append(result.sweep)
    assert len(curves[0]) == 3 and curves[0] == curves[1]


def test_the_input_file_list_follows_the_file_on_disk(tmp_path, monkeypatch):
    """The checks and the save ask for the model's files several times and the model is
    parsed once for them; a model replaced in between (another file, another size) is read
    again, and its new data file counted."""
    src = tmp_path / "m.onnx"
    onnx.save(_net(), str(src))
    parses = []
    shipped = onnx.load
    monkeypatch.setattr(onnx, "load", lambda *a, **k: parses.append(a[0]) or shipped(*a, **k))
    assert onnxprune.load.input_files(src) == [src]
    assert onnxprune.load.input_files(src) == [src] and len(parses) == 1
    onnx.save(_net(), str(src), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    assert onnxprune.load.input_files(src) == [src, tmp_path / "m.onnx.data"] and len(parses) == 2
