"""Every ``onnxprune prune`` option that no other test passes through the CLI, passed
through it here on the shipped CNN, with its effect checked on the result (the ``--report``
JSON, the written model, the exit code): a wrong mapping from an option to the API's
configuration fails one of these.  (test_stages.py compares the configuration the CLI builds;
these run the prune.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxprune.cli import main

ROOT = Path(__file__).resolve().parents[1]
CNN = ROOT / "models" / "mnist_cnn.onnx"
CALIB = ROOT / "models" / "data" / "calib"
SMALL = ["--calib", str(CALIB), "--max-samples", "64", "--batch-size", "32"]


def _prune(tmp_path: Path, *args: str, name: str = "o") -> tuple[int, dict | None, Path]:
    out, rep = tmp_path / f"{name}.onnx", tmp_path / f"{name}.json"
    rc = main([str(CNN), str(out), "-q", "--report", str(rep), *args])
    return rc, (json.loads(rep.read_text()) if rep.exists() else None), out


def _kept(report: dict) -> dict[str, tuple[int, int]]:
    """Producers of each prunable group -> (kept, channels)."""
    return {", ".join(g["producers"]): (g["kept"], g["channels"]) for g in report["groups"] if not g["blocked"]}


def _zeros(path: Path) -> int:
    return sum(int((numpy_helper.to_array(t) == 0).sum()) for t in onnx.load(str(path)).graph.initializer
               if t.data_type == onnx.TensorProto.FLOAT)


def test_global_ranks_all_groups_together(tmp_path):
    rc, local, _ = _prune(tmp_path, "--ratio", "0.5", "--round-to", "1", name="local")
    assert rc == 0 and local["selection"] == "ratio 0.5"
    assert all(k == c - c // 2 for k, c in _kept(local).values()), _kept(local)
    rc, glob, _ = _prune(tmp_path, "--ratio", "0.5", "--round-to", "1", "--global", name="global")
    assert rc == 0 and glob["selection"] == "global ratio 0.5"
    kept = _kept(glob)
    assert sum(k for k, _ in kept.values()) == sum(c - c // 2 for _, c in kept.values())  # the same total...
    assert kept != _kept(local)  # ...shared out by one ranking over all groups


def test_target_params(tmp_path):
    rc, rep, out = _prune(tmp_path, "--target-params", "0.5")
    assert rc == 0 and rep["selection"].startswith("target params 0.5")
    kept = rep["params"]["after"] / rep["params"]["before"]
    assert 0.4 <= kept <= 0.5, kept
    assert rep["macs"]["after"] / rep["macs"]["before"] > kept  # the budget was params, not MACs


def test_min_keep(tmp_path):
    rc, rep, _ = _prune(tmp_path, "--ratio", "0.99", "--round-to", "1", "--min-keep", "5")
    assert rc == 0
    assert {k for k, _ in _kept(rep).values()} == {5}, _kept(rep)


def test_exclude(tmp_path):
    rc, rep, _ = _prune(tmp_path, "--ratio", "0.5", "--round-to", "1", "--exclude", "/conv1/*")
    assert rc == 0
    excluded = [g for g in rep["groups"] if g["excluded"]]
    assert len(excluded) == 1 and excluded[0]["producers"] == ["Conv '/conv1/Conv'"], rep["groups"]
    assert excluded[0]["kept"] == excluded[0]["channels"]
    assert all(k < c for k, c in _kept(rep).values() if k and c != excluded[0]["channels"])


def test_memory_budget_splits_the_calibration_runs(tmp_path):
    rc, roomy, _ = _prune(tmp_path, *SMALL, "--compensate", "none", name="roomy")
    assert rc == 0 and roomy["calibration"]["runs_per_batch"] == 1
    rc, tight, _ = _prune(tmp_path, *SMALL, "--compensate", "none", "--memory-budget", "0.05", name="tight")
    assert rc == 0 and tight["calibration"]["runs_per_batch"] > 1


def test_device(tmp_path, capsys):
    import onnxruntime as ort

    assert _prune(tmp_path, "--device", "cpu", name="cpu")[0] == 0
    assert "CUDA requested" not in capsys.readouterr().err
    assert _prune(tmp_path, "--device", "cuda", name="cuda")[0] == 0
    warned = "CUDA requested but onnxruntime has no CUDA provider" in capsys.readouterr().err
    assert warned == ("CUDAExecutionProvider" not in ort.get_available_providers())


def test_steps(tmp_path):
    rc, rep, _ = _prune(tmp_path, *SMALL, "--compensate", "bias", "--ratio", "0.5", "--round-to", "1", "--steps", "2")
    assert rc == 0 and rep["steps"] == 2
    # two rounds of 1 - sqrt(0.5) each: not the one-pass halving
    assert _kept(rep) and all(k < c for k, c in _kept(rep).values())


def _relief(tmp_path, name, *args):
    rc, rep, out = _prune(tmp_path, *SMALL, "--method", "relief", "--compensate", "none", *args, name=name)
    assert rc == 0
    kept = _kept(rep)
    conv = sum(k for p, (k, _) in kept.items() if "Conv" in p)
    fc = sum(k for p, (k, _) in kept.items() if "Gemm" in p)
    return conv, fc, out


def test_relief_alpha_conv_and_alpha_fc_act_on_their_own_layers(tmp_path):
    conv_lo, fc_a, _ = _relief(tmp_path, "a", "--alpha-conv", "0.5", "--alpha-fc", "0.9")
    conv_hi, fc_b, _ = _relief(tmp_path, "b", "--alpha-conv", "0.95", "--alpha-fc", "0.9")
    assert conv_lo < conv_hi and fc_a == fc_b
    conv_c, fc_lo, _ = _relief(tmp_path, "c", "--alpha-conv", "0.95", "--alpha-fc", "0.5")
    assert fc_lo < fc_b and conv_c == conv_hi


def test_relief_granularity_connection_zeroes_connections(tmp_path):
    *_, channel = _relief(tmp_path, "channel", "--alpha-conv", "0.9", "--alpha-fc", "0.9")
    *_, connection = _relief(tmp_path, "connection", "--alpha-conv", "0.9", "--alpha-fc", "0.9",
                             "--granularity", "connection")
    assert _zeros(connection) > _zeros(channel) + 100


def test_relative_tau_and_z(tmp_path):
    def run(name, z):
        rc, rep, _ = _prune(tmp_path, *SMALL, "--method", "relative", "--compensate", "none", "--tau", "0.02",
                            "--z", z, name=name)
        assert rc == 0 and rep["method_report"]["relative"]["tau"] == 0.02
        assert rep["method_report"]["relative"]["z"] == float(z)
        return sum(k for k, _ in _kept(rep).values())

    assert run("z0", "0") < run("z3", "3")  # a larger z keeps more connections, so more channels


def test_mipp_confidence_and_estimator(tmp_path, capsys):
    def run(name, *args):
        rc, rep, _ = _prune(tmp_path, *SMALL, "--method", "mipp", "--compensate", "none", *args, name=name)
        assert rc == 0
        return rep["method_report"]["mipp"]

    linear = run("linear", "--confidence", "0.9")
    assert linear["estimator"] == "linear" and linear["confidence"] == 0.9
    capsys.readouterr()
    # The paper's MLP predictor is for small layers: this CNN's fc1 reads 3136 inputs.
    rc, rep, out = _prune(tmp_path, *SMALL, "--method", "mipp", "--confidence", "0.9", "--mi-estimator", "mlp",
                          name="mlp")
    assert rc == 2 and rep is None and not out.exists()
    assert "--mi-estimator mlp is for small layers only" in capsys.readouterr().err


@pytest.fixture(scope="module")
def pngs(tmp_path_factory) -> Path:
    """32 calibration digits as 8-bit grayscale PNGs."""
    from PIL import Image

    d = tmp_path_factory.mktemp("pngs")
    x = np.load(sorted(CALIB.glob("*.npy"))[0])[:32, 0]
    for i, img in enumerate(x):
        Image.fromarray(np.clip(img * 255, 0, 255).astype(np.uint8), mode="L").save(d / f"{i:02d}.png")
    return d


def test_scale_reaches_the_image_reader(tmp_path, pngs):
    """With the same selection (l1), the bias compensation sees the scaled pixels: another
    --scale writes other biases."""
    base = ["--calib", str(pngs), "--max-samples", "16", "--method", "l1", "--ratio", "0.5", "--compensate", "bias"]
    rc, a, out_a = _prune(tmp_path, *base, name="a")
    rc_b, b, out_b = _prune(tmp_path, *base, "--scale", str(1 / 127.5), name="b")
    rc_c, _, out_c = _prune(tmp_path, *base, "--scale", str(1 / 255), name="c")
    assert rc == rc_b == rc_c == 0 and _kept(a) == _kept(b)
    assert out_a.read_bytes() == out_c.read_bytes()  # --scale 1/255 is the default
    assert out_a.read_bytes() != out_b.read_bytes()


def test_layout_reaches_the_image_reader(tmp_path, pngs, capsys):
    base = ["--calib", str(pngs), "--method", "l1", "--compensate", "none"]
    assert _prune(tmp_path, *base, "--layout", "NCHW", name="nchw")[0] == 0
    capsys.readouterr()
    rc, rep, out = _prune(tmp_path, *base, "--layout", "NHWC", name="nhwc")
    assert rc == 2 and rep is None and not out.exists()  # [N, 28, 28, 1] does not fit [N, 1, 28, 28]
    assert "28" in capsys.readouterr().err
