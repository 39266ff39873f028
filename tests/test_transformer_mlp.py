"""Topology: transformer MLPs on [B, T, C] tensors.

- MatMul (+Add bias) → activation → MatMul, with the activations real exports emit: the
  Gelu op (opset 20, the dynamo exporter), its Erf decomposition (TorchScript),
  Relu, SiLU as x·Sigmoid(x), and the Swish op (opset 24);
- gated MLPs: SwiGLU ``(SiLU(x W1) * (x W3)) W2`` and GeGLU, where two producers are
  multiplied elementwise and must lose the same intermediate channels;
- the hidden (residual-stream) dimension behind LayerNormalization stays blocked, with a
  reason naming LayerNormalization, in both pre-LN (GPT) and post-LN (BERT) blocks.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest

import onnxprune
from builders import G
from topology import analysis_of, assert_exact, assert_random, consumer_names, group_of, producer_names, zero_cols

C, H = 16, 32  # hidden and intermediate widths
ZERO = [0, 5, 17, 31]  # intermediate channels whose outgoing weights are zero


def _act(g: G, x: str, act: str) -> str:
    if act == "gelu":
        return g.op("Gelu", [x])
    if act == "erf":  # x * 0.5 * (1 + erf(x / sqrt(2))), as TorchScript writes F.gelu
        e = g.op("Erf", [g.op("Div", [x, g.const(np.float32(np.sqrt(2.0)))])])
        return g.op("Mul", [g.op("Mul", [x, g.op("Add", [e, g.const(np.float32(1.0))])]), g.const(np.float32(0.5))])
    if act == "relu":
        return g.op("Relu", [x])
    if act == "silu":
        return g.op("Mul", [x, g.op("Sigmoid", [x])])
    if act == "swish":
        return g.op("Swish", [x])
    raise ValueError(act)


_OPSET = {"gelu": 20, "swish": 24}


def _linear(g: G, x: str, k: int, n: int, name: str, weight: np.ndarray | None = None, bias: bool = True) -> str:
    w = weight if weight is not None else g.w(k, n)
    y = g.op("MatMul", [x, g.const(w)], name=name)
    return g.op("Add", [y, g.const(g.w(n))], name=f"{name}_bias") if bias else y


def mlp(act: str = "gelu", zero: list[int] | None = None, seed: int = 0):
    """x → fc1 → act → fc2 (+ residual) → out; fc2's rows ``zero`` are zero."""
    g = G(opset=_OPSET.get(act, 17), seed=seed)
    x = g.input("x", ["batch", "seq", C])
    h = _linear(g, x, C, H, "fc1")
    a = _act(g, h, act)
    w2 = g.w(H, C)
    if zero:
        w2 = zero_cols(w2, zero, axis=0)
    y = _linear(g, a, H, C, "fc2", weight=w2)
    return g.model([g.op("Add", [y, x], name="residual")])


def gated(kind: str = "swiglu", zero: list[int] | None = None, bias: bool = False, seed: int = 0):
    """SwiGLU / GeGLU: (act(x W1) * (x W3)) W2, the LLaMA / T5 v1.1 MLP."""
    g = G(opset=20 if kind == "geglu" else 17, seed=seed)
    x = g.input("x", ["batch", "seq", C])
    gate = _act(g, _linear(g, x, C, H, "w1", bias=bias), "silu" if kind == "swiglu" else "gelu")
    up = _linear(g, x, C, H, "w3", bias=bias)
    w2 = g.w(H, C)
    if zero:
        w2 = zero_cols(w2, zero, axis=0)
    y = _linear(g, g.op("Mul", [gate, up], name="gate_mul"), H, C, "w2", weight=w2, bias=bias)
    return g.model([g.op("Add", [y, x], name="residual")])


def _supported(opset: int) -> bool:
    return opset <= 21 or tuple(int(p) for p in onnxruntime.__version__.split(".")[:2]) >= (1, 22)


ACTS = [a for a in ("gelu", "erf", "relu", "silu", "swish") if _supported(_OPSET.get(a, 17))]


@pytest.mark.parametrize("act", ACTS)
def test_mlp_intermediate_is_a_group(tmp_path, act):
    analysis = analysis_of(tmp_path, mlp(act))
    group = group_of(analysis, "fc1")
    assert group.prunable, group.blocked
    assert producer_names(group) == {"fc1"} and consumer_names(group) == {"fc2"}
    assert len(group.classes) == H


@pytest.mark.parametrize("act", ACTS)
def test_mlp_exact(tmp_path, act):
    assert_exact(tmp_path, mlp(act, zero=ZERO), "fc1", ZERO)


@pytest.mark.parametrize("act", ["gelu", "erf", "silu"])
def test_mlp_random(tmp_path, act):
    assert_random(tmp_path, mlp(act))


@pytest.mark.parametrize("kind", ["swiglu", "geglu"])
@pytest.mark.parametrize("bias", [False, True])
def test_gated_mlp_is_one_group(tmp_path, kind, bias):
    analysis = analysis_of(tmp_path, gated(kind, bias=bias))
    group = group_of(analysis, "w1")
    assert group.prunable, group.blocked
    assert producer_names(group) == {"w1", "w3"}  # the elementwise product couples them
    assert consumer_names(group) == {"w2"}
    assert len(group.classes) == H


@pytest.mark.parametrize("kind", ["swiglu", "geglu"])
@pytest.mark.parametrize("bias", [False, True])
def test_gated_mlp_exact(tmp_path, kind, bias):
    out = assert_exact(tmp_path, gated(kind, zero=ZERO, bias=bias), "w1", ZERO)
    shapes = {t.name: tuple(t.dims) for t in onnx.load(str(out)).graph.initializer}
    assert sorted(shapes.values()).count((C, H - len(ZERO))) == 2  # W1 and W3 lost the same columns
    assert (H - len(ZERO), C) in shapes.values()  # W2 lost the rows


@pytest.mark.parametrize("kind", ["swiglu", "geglu"])
def test_gated_mlp_random(tmp_path, kind):
    assert_random(tmp_path, gated(kind, bias=True))


# ----------------------------------------------------------------------------- LayerNorm


def pre_ln_block():
    """GPT-style: h = embed(x); h = h + fc2(gelu(fc1(LN(h)))); out(LN(h))."""
    g = G(opset=17)
    x = g.input("x", ["batch", "seq", 12])
    h = _linear(g, x, 12, C, "embed")
    ln = g.op("LayerNormalization", [h, g.const(1 + 0.1 * g.w(C)), g.const(g.w(C))], axis=-1, name="ln1")
    y = _linear(g, _act(g, _linear(g, ln, C, H, "fc1"), "erf"), H, C, "fc2")
    h = g.op("Add", [h, y], name="residual")
    ln2 = g.op("LayerNormalization", [h, g.const(1 + 0.1 * g.w(C)), g.const(g.w(C))], axis=-1, name="ln2")
    return g.model([_linear(g, ln2, C, 3, "head")])


def post_ln_block():
    """BERT-style: h = LN(embed(x)); h = LN(h + fc2(gelu(fc1(h)))); out(h)."""
    g = G(opset=17)
    x = g.input("x", ["batch", "seq", 12])
    h = g.op("LayerNormalization", [x, g.const(1 + 0.1 * g.w(12)), g.const(g.w(12))], axis=-1, name="ln0")
    h = _linear(g, h, 12, C, "embed")
    h = g.op("LayerNormalization", [h, g.const(1 + 0.1 * g.w(C)), g.const(g.w(C))], axis=-1, name="ln1")
    y = _linear(g, _act(g, _linear(g, h, C, H, "fc1"), "relu"), H, C, "fc2")
    h = g.op("LayerNormalization", [g.op("Add", [y, h], name="residual"), g.const(np.ones(C, np.float32)),
                                    g.const(np.zeros(C, np.float32))], axis=-1, name="ln2")
    return g.model([_linear(g, h, C, 3, "head")])


def test_pre_ln_hidden_dim_is_blocked(tmp_path):
    analysis = analysis_of(tmp_path, pre_ln_block())
    hidden = group_of(analysis, "embed")
    assert producer_names(hidden) == {"embed", "fc2"}  # coupled by the residual Add
    assert not hidden.prunable
    assert any("LayerNormalization 'ln1'" in r and "hidden" in r for r in hidden.blocked), hidden.blocked
    assert group_of(analysis, "fc1").prunable


def test_post_ln_hidden_dim_is_blocked(tmp_path):
    analysis = analysis_of(tmp_path, post_ln_block())
    embed, fc2 = group_of(analysis, "embed"), group_of(analysis, "fc2")
    assert not embed.prunable and any("LayerNormalization 'ln1'" in r for r in embed.blocked), embed.blocked
    # fc2's channels meet ln1's output at the residual Add: the reason says where the
    # hidden dimension comes from, not just that the other operand has no channels.
    assert not fc2.prunable
    assert any(
        "residual" in r and "LayerNormalization 'ln1'" in r and "hidden (residual-stream) dimension" in r
        for r in fc2.blocked
    ), fc2.blocked
    assert group_of(analysis, "fc1").prunable


def test_post_ln_block_prunes_the_mlp(tmp_path):
    assert_random(tmp_path, post_ln_block())
    report = onnxprune.analyze(tmp_path / "random_in.onnx")
    assert [g.name for g in report.groups if g.prunable] == ["fc1"]
