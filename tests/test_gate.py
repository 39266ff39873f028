"""The CI gate: --max-error / --min-agreement fail with exit 3 and write nothing, unless --force."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onnxprune.cli import main

ROOT = Path(__file__).resolve().parent.parent
CNN = str(ROOT / "models" / "mnist_cnn.onnx")
CALIB = str(ROOT / "models" / "data" / "calib")
EVAL = str(ROOT / "models" / "data" / "eval")
LABELS = str(ROOT / "models" / "data" / "heldout_labels.npy")


def test_max_error_violation_exits_3_and_writes_nothing(capsys, tmp_path):
    out = tmp_path / "o.onnx"
    code = main([CNN, str(out), "--calib", CALIB, "--compensate", "bias", "--ratio", "0.5", "--max-error", "0.01", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3
    assert len(err) == 1 and "relative L2 error" in err[0] and "nothing written" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_force_writes_anyway(capsys, tmp_path):
    out = tmp_path / "o.onnx"
    code = main([CNN, str(out), "--calib", CALIB, "--compensate", "bias", "--ratio", "0.5", "--max-error", "0.01", "--force", "-q"])
    assert code == 0 and out.is_file()
    assert "written anyway" in capsys.readouterr().err


def test_min_agreement_with_eval_and_labels(tmp_path):
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    args = [CNN, str(out), "--calib", CALIB, "--compensate", "bias", "--eval", EVAL, "--labels", LABELS, "--ratio", "0.1", "--round-to", "1", "--report", str(rep), "-q"]
    assert main(args + ["--min-agreement", "0.9"]) == 0
    fid = json.loads(rep.read_text())["fidelity"]
    assert fid["samples"] == 1000 and fid["source"] == "eval data"
    assert fid["accuracy_before"] == pytest.approx(0.988) and fid["agreement"] >= 0.98
    out.unlink()
    assert main(args + ["--min-agreement", "0.9999"]) == 3
    assert not out.exists()


def test_gate_without_samples_is_refused(capsys, tmp_path):
    code = main([CNN, str(tmp_path / "o.onnx"), "--max-error", "0.1"])
    assert code == 2 and "--eval or --calib" in capsys.readouterr().err
