"""The CLI and the Python API: options, reports, determinism, the shipped sample models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxprune
from builders import G, params, run, save
from onnxprune.cli import main

ROOT = Path(__file__).resolve().parent.parent
CNN = ROOT / "models" / "mnist_cnn.onnx"
LENET = ROOT / "models" / "lenet300.onnx"


def _net() -> onnx.ModelProto:
    g = G()
    x = g.input("x", ["N", 3, 8, 8])
    a = g.op("Relu", [g.bn(g.conv(x, 3, 16, name="stem"), 16)])
    b = g.op("Relu", [g.conv(a, 16, 12, name="body")])
    c = g.op("GlobalAveragePool", [g.conv(b, 12, 8, name="head")])
    return g.model([g.gemm(g.op("Flatten", [c]), 8, 4, name="fc")])


def test_prune_prints_what_was_removed(capsys, tmp_path):
    src, out = save(_net(), tmp_path / "m.onnx"), tmp_path / "o.onnx"
    assert main([str(src), str(out), "--ratio", "0.5"]) == 0
    text = capsys.readouterr().out
    assert "8 / 16" in text and "6 / 12" in text and "4 / 8" in text
    assert "params" in text and "MACs" in text and "wrote" in text
    assert params(out) < params(src)


def test_report_json(tmp_path):
    src, out, rep = save(_net(), tmp_path / "m.onnx"), tmp_path / "o.onnx", tmp_path / "r.json"
    assert main([str(src), str(out), "--ratio", "0.25", "--round-to", "1", "--report", str(rep), "-q"]) == 0
    data = json.loads(rep.read_text())
    assert data["params"]["after"] < data["params"]["before"]
    assert data["macs"]["after"] < data["macs"]["before"]
    assert data["file_size"]["after"] == out.stat().st_size
    kept = {g["producers"][0]: (g["kept"], g["channels"]) for g in data["groups"]}
    assert kept["Conv 'stem'"] == (12, 16)
    fc = next(g for g in data["groups"] if g["producers"] == ["Gemm 'fc'"])
    assert fc["blocked"] and "graph output" in fc["blocked"][0]
    assert set(data["seconds"]) >= {"load", "groups", "score", "select", "rewrite", "verify"}


def test_analyze_lists_groups_shares_and_blocked(capsys, tmp_path):
    src = save(_net(), tmp_path / "m.onnx")
    js = tmp_path / "a.json"
    assert main(["analyze", str(src), "--json", str(js)]) == 0
    text = capsys.readouterr().out
    for name in ("stem", "body", "head", "fc"):
        assert name in text
    assert "blocked" in text and "graph output" in text
    data = json.loads(js.read_text())
    # Everything but fc's bias (4 of 3,160 params): its outputs are the graph output.
    assert data["prunable_params_share"] == pytest.approx(1 - 4 / 3160) and data["prunable_macs_share"] == 1.0
    assert [g["channels"] for g in data["groups"]] == [16, 12, 8, 4]


@pytest.mark.parametrize("method", ["l1", "l2", "random"])
def test_same_inputs_and_seed_give_identical_bytes(tmp_path, method):
    src = save(_net(), tmp_path / "m.onnx")
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    for out in (a, b):
        assert main([str(src), str(out), "--method", method, "--ratio", "0.4", "--seed", "7", "-q"]) == 0
    assert a.read_bytes() == b.read_bytes()


def test_random_seed_changes_the_choice(tmp_path):
    src = save(_net(), tmp_path / "m.onnx")
    outs = []
    for seed in (1, 2):
        model, _ = onnxprune.prune(src, method="random", ratio=0.5, seed=seed)
        outs.append(model.graph.initializers[next(n for n in model.graph.initializers if "c" in n)].const_value.numpy())
    assert not np.array_equal(outs[0], outs[1])


def test_l1_removes_the_smallest_filters(tmp_path):
    g = G()
    x = g.input("x", ["N", 3, 6, 6])
    w = g.w(6, 3, 3, 3)
    w[[1, 4]] *= 1e-3  # the two weakest filters
    a = g.op("Relu", [g.conv(x, 3, 6, name="c1", weight=w, bias=False)])
    y = g.op("GlobalAveragePool", [g.conv(a, 6, 4, name="c2")])
    src = save(g.model([y]), tmp_path / "m.onnx")
    model, result = onnxprune.prune(src, method="l1", ratio=2 / 6)
    kept = model.graph.initializers[model.graph.node(0).inputs[1].name].const_value.numpy()
    assert kept.shape[0] == 4
    np.testing.assert_array_equal(kept, w[[0, 2, 3, 5]])


def test_api_without_output_writes_nothing(tmp_path):
    src = save(_net(), tmp_path / "m.onnx")
    model, result = onnxprune.prune(src, ratio=0.5)
    assert result.output is None and result.params_after < result.params_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_exclude_keeps_matching_groups_whole(tmp_path):
    src = save(_net(), tmp_path / "m.onnx")
    _, result = onnxprune.prune(src, ratio=0.5, exclude=["bo*"])
    by = {g["producers"][0]: g for g in result.groups}
    assert by["Conv 'body'"]["excluded"] and by["Conv 'body'"]["kept"] == 12
    assert by["Conv 'stem'"]["kept"] == 8


def test_min_keep_and_round_to(tmp_path):
    src = save(_net(), tmp_path / "m.onnx")
    _, result = onnxprune.prune(src, ratio=0.9, min_keep=5, round_to=4)
    kept = {g["producers"][0]: g["kept"] for g in result.groups if not g["blocked"]}
    # 16 → 2 by ratio, min-keep 5, rounded up to 8; 12 → 2 → 5 → 8; 8 → 1 → 5 → 8.
    assert kept == {"Conv 'stem'": 8, "Conv 'body'": 8, "Conv 'head'": 8}


def test_round_to_is_automatic_for_conv_groups(tmp_path):
    """Default rounding keeps a Conv width's alignment (16, else 8, when a step is left);
    Gemm widths stay free; an explicit --round-to overrides both."""
    g = G()
    x = g.input("x", ["N", 3, 8, 8])
    a = g.op("Relu", [g.conv(x, 3, 48, name="c48")])  # 48 % 16 == 0, ≥ 32: rounded to 16
    b = g.op("Relu", [g.conv(a, 48, 24, name="c24")])  # 24 % 8 == 0, ≥ 16: rounded to 8
    c = g.op("Relu", [g.conv(b, 24, 12, name="c12")])  # 12: no alignment to keep
    h = g.op("Relu", [g.gemm(g.op("Flatten", [g.op("GlobalAveragePool", [c])]), 12, 40, name="fc1")])
    src = save(g.model([g.gemm(h, 40, 4, name="fc2")]), tmp_path / "m.onnx")
    kept = lambda r: {gr["producers"][0]: gr["kept"] for gr in r.groups if not gr["blocked"]}  # noqa: E731
    _, auto = onnxprune.prune(src, ratio=0.3)
    assert kept(auto) == {"Conv 'c48'": 48, "Conv 'c24'": 24, "Conv 'c12'": 9, "Gemm 'fc1'": 28}
    _, auto = onnxprune.prune(src, ratio=0.6)
    assert kept(auto) == {"Conv 'c48'": 32, "Conv 'c24'": 16, "Conv 'c12'": 5, "Gemm 'fc1'": 16}
    _, free = onnxprune.prune(src, ratio=0.6, round_to=1)
    assert kept(free) == {"Conv 'c48'": 20, "Conv 'c24'": 10, "Conv 'c12'": 5, "Gemm 'fc1'": 16}


def test_global_threshold_removes_unevenly(tmp_path):
    g = G()
    x = g.input("x", ["N", 3, 6, 6])
    w1 = np.ones((8, 3, 3, 3), np.float32) * np.arange(1, 9, dtype=np.float32)[:, None, None, None]
    w2 = np.ones((8, 8, 3, 3), np.float32)
    w2[:2] *= 1e-3  # two clear outliers in c2; c1's norms are evenly spread
    a = g.op("Relu", [g.conv(x, 3, 8, name="c1", weight=w1)])
    b = g.op("Relu", [g.conv(a, 8, 8, name="c2", weight=w2)])
    y = g.op("GlobalAveragePool", [g.conv(b, 8, 4, name="c3")])
    src = save(g.model([y]), tmp_path / "m.onnx")
    kept = lambda r: {g["producers"][0]: g["kept"] for g in r.groups if not g["blocked"]}  # noqa: E731
    _, local = onnxprune.prune(src, ratio=0.125)
    assert kept(local) == {"Conv 'c1'": 7, "Conv 'c2'": 7}
    model, glob = onnxprune.prune(src, ratio=0.125, global_=True)
    assert kept(glob) == {"Conv 'c1'": 8, "Conv 'c2'": 6}
    c2 = next(n for n in model.graph if n.name == "c2")
    np.testing.assert_array_equal(c2.inputs[1].const_value.numpy(), w2[2:])


def test_ratio_zero_changes_nothing(tmp_path):
    src, out = save(_net(), tmp_path / "m.onnx"), tmp_path / "o.onnx"
    assert main([str(src), str(out), "--ratio", "0", "-q"]) == 0
    feed = {"x": np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_array_equal(run(src, feed)[0], run(out, feed)[0])
    assert params(out) == params(src)


def test_console_script_runs(tmp_path):
    src, out = save(_net(), tmp_path / "m.onnx"), tmp_path / "o.onnx"
    exe = Path(sys.executable).with_name("onnxprune")
    proc = subprocess.run([str(exe), str(src), str(out), "--ratio", "0.5"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    bad = subprocess.run([str(exe), str(src), str(src)], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


@pytest.mark.parametrize("path, least", [(CNN, 0.98), (LENET, 0.96)], ids=["mnist_cnn", "lenet300"])
def test_sample_models_prune_and_keep_accuracy(tmp_path, path, least):
    """The shipped models prune to valid smaller graphs that still read digits: at 50% with
    calibration and the default least-squares compensation (data-free l1 without
    compensation collapses the CNN at 50%), and at a light ratio data-free.  The bounds sit about
    a point under what the code achieves on these 300 digits."""
    x = np.load(ROOT / "models" / "data" / "eval" / "heldout.npz")["input"][:300]
    y = np.load(ROOT / "models" / "data" / "heldout_labels.npy")[:300]
    acc = lambda p: float((run(p, {"input": x})[0].argmax(1) == y).mean())  # noqa: E731
    out = tmp_path / "o.onnx"
    _, result = onnxprune.prune(path, out, method="l1", ratio=0.5, calib=ROOT / "models" / "data" / "calib",
                                max_samples=128)
    assert result.params_after < 0.5 * result.params_before
    assert acc(out) >= least
    _, light = onnxprune.prune(path, out, method="l1", ratio=0.1)
    assert light.params_after < light.params_before
    assert acc(out) >= acc(path) - 0.01


def test_plot_writes_a_png(tmp_path):
    out, png = tmp_path / "o.onnx", tmp_path / "p.png"
    code = main([str(CNN), str(out), "--calib", str(ROOT / "models" / "data" / "calib"), "--target-macs", "0.6", "--compensate", "bias", "--plot", str(png), "-q"])
    assert code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.parametrize("given", [None, "30"])
def test_the_console_script_settles_openblas_threads_before_numpy_loads(tmp_path, given):
    """OpenBLAS reads its thread timeout once, when numpy loads it: the console script sets
    it (a value the user gave stays) before anything imports numpy, here and so in the guarded
    child, which inherits it."""
    import os

    code = (
        "import atexit, os, sys\n"
        "import onnxprune._entry as e\n"
        "real = e._spin.settle\n"
        "def settle(*a):\n"
        "    print('numpy loaded:', 'numpy' in sys.modules)\n"
        "    return real(*a)\n"
        "e._spin.settle = settle\n"
        "atexit.register(lambda: print('timeout:', os.environ.get('OPENBLAS_THREAD_TIMEOUT')))\n"
        "sys.argv = ['onnxprune', 'analyze', sys.argv[1]]\n"
        "e.entry()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    env["ONNXPRUNE_NO_GUARD"] = "1"
    if given is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = given
    proc = subprocess.run([sys.executable, "-c", code, str(CNN)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "numpy loaded: False" in proc.stdout
    assert f"timeout: {given or '16'}" in proc.stdout
