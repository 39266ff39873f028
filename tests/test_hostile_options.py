"""Hostile option values: NaN/Inf/out of range are exit 2 in the CLI and InputError in the
API, with the same message, before anything is read or written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import onnxprune
from builders import save
from onnxprune.cli import main
from onnxprune.data import Preprocess
from onnxprune.methods import MethodOptions
from test_bad_input import _cnn, expect_refusal

ROOT = Path(__file__).resolve().parents[1]
CNN = ROOT / "models" / "mnist_cnn.onnx"
EVAL = ROOT / "models" / "data" / "eval"
LABELS = ROOT / "models" / "data" / "heldout_labels.npy"

CLI_CASES = [
    (["--max-error", "nan"], "--max-error"),
    (["--max-error", "inf"], "--max-error"),
    (["--max-error", "-0.1"], "--max-error"),
    (["--min-agreement", "1.5"], "--min-agreement"),
    (["--min-agreement", "nan"], "--min-agreement"),
    (["--memory-budget", "nan"], "--memory-budget"),
    (["--memory-budget", "inf"], "--memory-budget"),
    (["--memory-budget", "0"], "--memory-budget"),
    (["--ratio", "nan"], "--ratio"),
    (["--target-macs", "nan"], "--target-macs"),
    (["--target-params", "inf"], "--target-params"),
    (["--target-macs", "0"], "--target-macs"),
    (["--tau", "nan"], "--tau"),
    (["--tau", "-inf"], "--tau"),
    (["--z", "nan"], "--z"),
    (["--confidence", "0"], "--confidence"),
    (["--confidence", "101"], "--confidence"),
    (["--confidence", "nan"], "--confidence"),
    (["--alpha-conv", "0"], "--alpha-conv"),
    (["--alpha-fc", "1.5"], "--alpha-fc"),
    (["--alpha-fc", "nan"], "--alpha-fc"),
    (["--resize", "-3"], "--resize"),
    (["--crop", "0"], "--crop"),
    (["--scale", "nan"], "--scale"),
    (["--scale", "inf"], "--scale"),
    (["--mean", "0,nan,0"], "--mean"),
    (["--std", "1,inf,1"], "--std"),
    (["--std", "1,0,1"], "--std"),
    (["--std", "1,1"], "--std"),
    (["--steps", "0"], "--steps"),
    (["--batch-size", "0"], "--batch-size"),
]


@pytest.mark.parametrize("extra,needle", CLI_CASES, ids=[" ".join(c[0]) for c in CLI_CASES])
def test_cli_refuses_bad_value(capsys, tmp_path, extra, needle):
    src = save(_cnn(), tmp_path / "m.onnx")
    expect_refusal(capsys, tmp_path, [str(src), str(tmp_path / "o.onnx"), *extra], [src], needle)


API_CASES = [
    (dict(max_error=float("nan")), "--max-error"),
    (dict(min_agreement=-0.5), "--min-agreement"),
    (dict(memory_budget_mb=float("inf")), "--memory-budget"),
    (dict(ratio="0.5"), "--ratio"),
    (dict(ratio=True), "--ratio"),
    (dict(batch_size=2.5), "--batch-size"),
    (dict(min_keep="2"), "--min-keep"),
    (dict(seed=1.5), "--seed"),
    (dict(steps=None), "--steps"),
    (dict(method=3), "--method"),
    (dict(method="nope"), "--method"),
    (dict(compensate=None), "--compensate"),
    (dict(target_macs="0.5"), "--target-macs"),
    (dict(preprocess={"resize": 3}), "preprocess"),
    (dict(preprocess=Preprocess(resize=-1)), "--resize"),
    (dict(preprocess=Preprocess(std=(0.0, 1.0, 1.0))), "--std"),
    (dict(method_options={"tau": 1}), "method_options"),
    (dict(method_options=MethodOptions(tau=float("nan"))), "--tau"),
    (dict(method_options=MethodOptions(confidence="0.9")), "--confidence"),
    (dict(exclude=[3]), "--exclude"),
    (dict(exclude=5), "--exclude"),
    (dict(labels=[1, 2, 3], eval_data=[]), "--labels"),
]


@pytest.mark.parametrize("kwargs,needle", API_CASES, ids=[repr(c[0]) for c in API_CASES])
def test_api_raises_input_error(tmp_path, kwargs, needle):
    src = save(_cnn(), tmp_path / "m.onnx")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(onnxprune.InputError) as info:
        onnxprune.prune(src, tmp_path / "o.onnx", **kwargs)
    assert needle in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_api_bad_path_types(tmp_path):
    with pytest.raises(onnxprune.InputError, match="model_path"):
        onnxprune.prune(42)
    with pytest.raises(onnxprune.InputError, match="output_path"):
        onnxprune.prune(save(_cnn(), tmp_path / "m.onnx"), 3.5)
    with pytest.raises(onnxprune.InputError, match="model_path"):
        onnxprune.analyze(None)


def test_api_and_cli_say_the_same(capsys, tmp_path):
    src = save(_cnn(), tmp_path / "m.onnx")
    with pytest.raises(onnxprune.InputError) as info:
        onnxprune.prune(src, tmp_path / "o.onnx", max_error=float("nan"))
    line = expect_refusal(capsys, tmp_path, [str(src), str(tmp_path / "o.onnx"), "--max-error", "nan"], [src], "")
    assert line == f"error: {info.value}"


def test_string_exclude_is_one_pattern(tmp_path):
    src = save(_cnn(), tmp_path / "m.onnx")
    as_string = onnxprune.analyze(src, "c1*")
    as_list = onnxprune.analyze(src, ["c1*"])
    assert [g.excluded for g in as_string.groups] == [g.excluded for g in as_list.groups]
    assert sum(g.excluded for g in as_string.groups) == 1
    # Read one character at a time, "c1*" would hold the pattern "*" and exclude everything.
    _, result = onnxprune.prune(src, None, exclude="c1*", latency=False)
    assert sum(g["excluded"] for g in result.groups) == 1


@pytest.mark.parametrize("n", [999, 1001])
def test_labels_not_matching_eval_set(capsys, tmp_path, n):
    labels = tmp_path / "labels.npy"
    full = np.load(LABELS)
    np.save(labels, np.resize(full, n))
    line = expect_refusal(
        capsys, tmp_path,
        [str(CNN), str(tmp_path / "o.onnx"), "--ratio", "0.3", "--eval", str(EVAL), "--labels", str(labels), "-q"],
        [CNN, labels], "--labels",
    )
    assert f"holds {n} labels" in line
    assert (f"more than {n} samples" if n < len(full) else f"holds {len(full)} samples") in line


def test_api_checks_before_steps(tmp_path):
    src = save(_cnn(), tmp_path / "m.onnx")
    with pytest.raises(onnxprune.InputError, match="--target-macs"):
        onnxprune.prune(src, None, steps=2, calib=[], target_macs="0.5")
