"""Squeeze-and-excitation: GlobalAveragePool → Conv → Relu → Conv → gate → Mul(x, gate).

The gate's producer and the gated tensor's producer are coupled by the Mul."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnx
import pytest

from builders import G
from topology import (
    analysis_of, assert_exact, assert_random, consumer_names, group_of, input_shape, producer_names, zero_cols,
)

C, R = 8, 4


def se_model(gate: str, zero: Sequence[int] = (), zero_squeeze: Sequence[int] = ()) -> onnx.ModelProto:
    """x → c1(C) → Relu = a; s = gate(s2(Relu(s1(GAP(a))))); head(a * s).

    ``zero``: channels of the {c1, s2} group that s1 and head both read as zero;
    ``zero_squeeze``: channels of s1 that s2 reads as zero."""
    g = G()
    x = g.input("x", [1, 3, 8, 8])
    a = g.op("Relu", [g.conv(x, 3, C, name="c1")])
    s = g.op("GlobalAveragePool", [a])
    s = g.op("Relu", [g.conv(s, C, R, k=1, name="s1", weight=zero_cols(g.w(R, C, 1, 1), list(zero)))])
    s = g.conv(s, R, C, k=1, name="s2", weight=zero_cols(g.w(C, R, 1, 1), list(zero_squeeze)))
    s = g.op("Sigmoid", [s]) if gate == "sigmoid" else g.op("HardSigmoid", [s], alpha=0.2, beta=0.5)
    h = g.op("Mul", [a, s], name="scale")
    y = g.conv(h, C, 5, name="head", weight=zero_cols(g.w(5, C, 3, 3), list(zero)))
    return g.model([y])


@pytest.mark.parametrize("gate", ["sigmoid", "hardsigmoid"])
def test_se_groups(tmp_path: Path, gate: str) -> None:
    a = analysis_of(tmp_path, se_model(gate))
    main = group_of(a, "c1")
    assert producer_names(main) == {"c1", "s2"}
    assert consumer_names(main) == {"s1", "head"}
    squeeze = group_of(a, "s1")
    assert producer_names(squeeze) == {"s1"} and consumer_names(squeeze) == {"s2"}
    assert main.prunable and squeeze.prunable


@pytest.mark.parametrize("gate", ["sigmoid", "hardsigmoid"])
def test_se_exact_main(tmp_path: Path, gate: str) -> None:
    out = assert_exact(tmp_path, se_model(gate, zero=[2, 5, 6]), "c1", [2, 5, 6])
    assert input_shape(out, "c1", 1)[0] == input_shape(out, "s2", 1)[0] == C - 3
    assert input_shape(out, "s1", 1)[1] == input_shape(out, "head", 1)[1] == C - 3


@pytest.mark.parametrize("gate", ["sigmoid", "hardsigmoid"])
def test_se_exact_squeeze(tmp_path: Path, gate: str) -> None:
    out = assert_exact(tmp_path, se_model(gate, zero_squeeze=[1]), "s1", [1])
    assert input_shape(out, "s1", 1)[0] == R - 1
    assert input_shape(out, "s2", 1) == (C, R - 1, 1, 1)


@pytest.mark.parametrize("gate", ["sigmoid", "hardsigmoid"])
def test_se_random(tmp_path: Path, gate: str) -> None:
    for out in assert_random(tmp_path, se_model(gate)):
        assert input_shape(out, "c1", 1)[0] == input_shape(out, "s2", 1)[0] == C // 2
        assert input_shape(out, "s1", 1)[0] == R // 2
