"""Topology: multi-head self-attention, as the torch exporters write it.

Q, K, V projections (MatMul + Add) → Reshape [B, T, H·d] → [B, T, H, d] → Transpose →
QKᵀ (MatMul of two computed tensors) → scale, mask, Softmax (and TorchScript's
IsNaN/Where guard) → ·V → Transpose → Reshape [B, T, H·d] → output projection.  A head
is one channel of the group made by the Q, K and V projections and read by the output
projection: removing it drops d columns of Wq, Wk, Wv, d rows of Wo, and rewrites every
shape constant that encodes H or H·d.

Three ways of writing the head shapes:

- ``runtime``: TorchScript's ``Concat(Shape→Gather, Shape→Gather, -1, d)``;
- ``concat``: the same with the constant pieces ``H``, ``d`` and ``H·d`` (rewritten);
- ``static``: constant shapes ``[2, T, H, d]`` (rewritten to the kept heads);
- ``dynamo``: the dynamo exporter's kᵀ through ``[B·H, T, d]`` with shapes read from
  ``Shape(k)`` by Slice (folded into one Transpose at load time).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxprune
from builders import G, max_diff, run, save
from onnxprune._ort import session
from onnxprune.verify import random_feed
from topology import analysis_of, assert_exact, assert_random, consumer_names, group_of, producer_names, zero_cols

C, HEADS, D, T = 16, 4, 4, 5  # hidden width, heads, head size, tokens (static style)
ZERO_HEADS = [1, 3]


def _linear(g: G, x: str, k: int, n: int, name: str, weight: np.ndarray | None = None) -> str:
    y = g.op("MatMul", [x, g.const(weight if weight is not None else g.w(k, n))], name=name)
    return g.op("Add", [y, g.const(g.w(n))], name=f"{name}_bias")


def _dim(g: G, x: str, i: int) -> str:
    """Unsqueeze(Gather(Shape(x), i)): one dim read at run time, as a 1-element tensor."""
    gathered = g.op("Gather", [g.op("Shape", [x]), g.const(np.array(i, dtype=np.int64))], axis=0)
    return g.op("Unsqueeze", [gathered, g.const(np.array([0], dtype=np.int64))])


def _ints(*xs: int) -> np.ndarray:
    return np.array(xs, dtype=np.int64)


def attention(style: str = "runtime", zero_heads: list[int] | None = None, heads: int = HEADS, seed: int = 0,
              mask: bool = True) -> onnx.ModelProto:
    """One post-LN-free attention block with a residual connection; Wo's rows of the heads
    ``zero_heads`` are zero, so those heads contribute nothing."""
    g = G(opset=17, seed=seed)
    batch, seq = (2, T) if style == "static" else ("batch", "seq")
    x = g.input("x", [batch, seq, C])
    hd = heads * D
    q, k, v = (_linear(g, x, C, hd, name) for name in ("wq", "wk", "wv"))

    def split(t: str) -> str:
        if style == "static":
            shape = g.const(_ints(2, T, heads, D))
        elif style == "concat":
            shape = g.op("Concat", [_dim(g, x, 0), _dim(g, x, 1), g.const(_ints(heads)), g.const(_ints(D))], axis=0)
        else:
            shape = g.op("Concat", [_dim(g, x, 0), _dim(g, x, 1), g.const(_ints(-1)), g.const(_ints(D))], axis=0)
        return g.op("Reshape", [t, shape])

    qh = g.op("Transpose", [split(q)], perm=[0, 2, 1, 3])  # [B, H, T, d]
    if style == "dynamo":
        kh = g.op("Transpose", [split(k)], perm=[0, 2, 1, 3])
        shape = g.op("Shape", [kh])
        last = g.op("Slice", [shape, g.const(_ints(-1)), g.const(_ints(2**62))])
        second = g.op("Slice", [shape, g.const(_ints(-2)), g.const(_ints(-1))])
        lead = g.op("Slice", [shape, g.const(_ints(-(2**62))), g.const(_ints(-2))])
        merged = g.op("Reshape", [kh, g.op("Concat", [g.const(_ints(-1)), second, last], axis=0)])
        flipped = g.op("Transpose", [merged], perm=[0, 2, 1])
        kt = g.op("Reshape", [flipped, g.op("Concat", [lead, last, second], axis=0)])  # [B, H, d, T]
    else:
        kt = g.op("Transpose", [split(k)], perm=[0, 2, 3, 1])
    vh = g.op("Transpose", [split(v)], perm=[0, 2, 1, 3])
    scale = g.const(np.float32(D**-0.25))
    scores = g.op("MatMul", [g.op("Mul", [qh, scale]), g.op("Mul", [kt, scale])], name="qk")
    if mask:
        keep = g.input("mask", [batch, seq], dtype=onnx.TensorProto.FLOAT)
        bias = g.op("Mul", [g.op("Sub", [g.const(np.float32(1.0)), keep]), g.const(np.float32(-1e4))])
        bias = g.op("Unsqueeze", [bias, g.const(_ints(1, 2))])  # [B, 1, 1, T]
        scores = g.op("Add", [scores, bias], name="masked")
    probs = g.op("Softmax", [scores], axis=-1)
    # TorchScript guards fully masked rows: where(isnan(p), 0, p).
    probs = g.op("Where", [g.op("IsNaN", [probs]), g.const(np.array([0.0], np.float32)), probs])
    ctx = g.op("Transpose", [g.op("MatMul", [probs, vh], name="av")], perm=[0, 2, 1, 3])  # [B, T, H, d]
    if style == "static":
        merged_shape = g.const(_ints(2, T, hd))
    elif style == "concat":
        merged_shape = g.op("Concat", [_dim(g, x, 0), _dim(g, x, 1), g.const(_ints(hd))], axis=0)
    else:
        merged_shape = g.op("Concat", [_dim(g, x, 0), _dim(g, x, 1), g.const(_ints(-1))], axis=0)
    wo = g.w(hd, C)
    for h in zero_heads or []:
        wo[h * D : (h + 1) * D] = 0
    y = _linear(g, g.op("Reshape", [ctx, merged_shape]), hd, C, "wo", weight=wo)
    return g.model([g.op("Add", [y, x], name="residual")])


STYLES = ["runtime", "concat", "static", "dynamo"]


@pytest.mark.parametrize("style", STYLES)
def test_heads_are_one_group(tmp_path, style):
    analysis = analysis_of(tmp_path, attention(style))
    group = group_of(analysis, "wq")
    assert group.prunable, group.blocked
    assert producer_names(group) == {"wq", "wk", "wv"}
    assert consumer_names(group) == {"wo"}
    assert len(group.classes) == HEADS  # one channel per head, not per head dim


@pytest.mark.parametrize("style", STYLES)
def test_heads_with_zero_output_rows_removed_exactly(tmp_path, style):
    out = assert_exact(tmp_path, attention(style, zero_heads=ZERO_HEADS), "wq", ZERO_HEADS)
    shapes = {t.name: tuple(t.dims) for t in onnx.load(str(out)).graph.initializer}
    kept = (HEADS - len(ZERO_HEADS)) * D
    assert sorted(shapes.values()).count((C, kept)) == 3  # Wq, Wk, Wv lost whole heads
    assert (kept, C) in shapes.values()  # Wo lost the heads' rows
    consts = [a.tolist() for a in _int_consts(out)]
    if style == "static":
        assert [2, T, HEADS - len(ZERO_HEADS), D] in consts and [2, T, kept] in consts
    if style == "concat":
        assert consts.count([HEADS - len(ZERO_HEADS)]) == 3  # the H piece of Q's, K's and V's shape
        assert [kept] in consts and [HEADS * D] not in consts  # the H·d piece of the merge


def _int_consts(path: Path) -> list[np.ndarray]:
    m = onnx.load(str(path))
    return [onnx.numpy_helper.to_array(t) for t in m.graph.initializer if t.data_type == onnx.TensorProto.INT64]


def test_dynamo_batch_merge_is_folded(tmp_path):
    """The [B·H, T, d] detour becomes one Transpose: the head axis never disappears."""
    analysis = analysis_of(tmp_path, attention("dynamo"))
    ops = [n.op_type for n in analysis.model.graph]
    assert ops.count("Reshape") == 4  # Q, K, V split + the merge before Wo; K's detour is gone
    assert "Slice" not in ops and "Shape" in ops  # the Slice reads of Shape(k) went with it
    folded = next(n for n in analysis.model.graph if n.name.endswith("_unmerged"))
    assert list(folded.attributes["perm"].value) == [0, 1, 3, 2]


@pytest.mark.parametrize("style", STYLES)
def test_heads_random(tmp_path, style):
    assert_random(tmp_path, attention(style), ratio=0.5)


def test_wanda_removes_the_head_the_output_projection_ignores(tmp_path):
    """Data-driven: the heads whose Wo rows are zero score 0 and go first; the outputs
    do not move (no compensation needed), and the pruned model has half the heads."""
    src = save(attention("runtime", zero_heads=ZERO_HEADS), tmp_path / "in.onnx")
    sess = session(str(src))
    calib = [random_feed(sess, seed=s) for s in range(4)]
    for item in calib:
        item["mask"] = np.ones_like(item["mask"])
    out = tmp_path / "out.onnx"
    _, result = onnxprune.prune(src, out, method="wanda", ratio=0.5, calib=calib, compensate="none", latency=False)
    kept = (HEADS - len(ZERO_HEADS)) * D
    assert (C, kept) in {tuple(t.dims) for t in onnx.load(str(out)).graph.initializer}
    feed = calib[0]
    assert max_diff(run(src, feed), run(out, feed)) <= 1e-5


def test_single_head_q_and_k_lose_the_same_dims(tmp_path):
    """Without a head split, QKᵀ sums over the projection width: Q and K keep the same
    dims (one group); V's width is read by the MLP after the attention."""
    g = G()
    x = g.input("x", [1, 5, 8])
    q = g.op("MatMul", [x, g.const(g.w(8, 8))], name="wq")
    wk = zero_cols(g.w(8, 8), [2, 6], axis=1)  # k dims 2 and 6 are zero: q·k ignores them
    k = g.op("MatMul", [x, g.const(wk)], name="wk")
    v = g.op("MatMul", [x, g.const(g.w(8, 8))], name="wv")
    scores = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 2, 1])], name="qk")
    attn = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v], name="av")
    h = g.op("Relu", [g.op("MatMul", [attn, g.const(g.w(8, 16))], name="fc1")])
    proto = g.model([g.op("MatMul", [h, g.const(g.w(16, 8))], name="fc2")])
    analysis = analysis_of(tmp_path, proto)
    qk = group_of(analysis, "wq")
    assert qk.prunable and producer_names(qk) == {"wq", "wk"} and not qk.consumers
    vg = group_of(analysis, "wv")
    assert vg.prunable and consumer_names(vg) == {"fc1"}
    assert_exact(tmp_path, proto, "wq", [2, 6])


def test_fused_attention_op_blocks_with_its_name(tmp_path):
    """onnxruntime's fused com.microsoft Attention packs Q, K, V in one weight whose
    layout onnxprune does not rewrite: the projection feeding it is blocked, by name."""
    g = G()
    x = g.input("x", [1, 5, 8])
    h = g.op("MatMul", [x, g.const(g.w(8, 8))], name="proj")
    node = onnx.helper.make_node("Attention", [h, g.const(g.w(8, 24)), g.const(g.w(24))], ["att"],
                                 domain="com.microsoft", num_heads=2, name="fused")
    g.nodes.append(node)
    graph = onnx.helper.make_graph(g.nodes, "t", g.inputs, [onnx.helper.make_tensor_value_info("att", 1, [1, 5, 8])],
                                   initializer=g.inits)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17),
                                                         onnx.helper.make_opsetid("com.microsoft", 1)])
    proto.ir_version = 8
    analysis = analysis_of(tmp_path, proto)
    group = group_of(analysis, "proj")
    assert not group.prunable
    assert any("com.microsoft::Attention" in r for r in group.blocked), group.blocked


def test_macs_estimate_counts_the_attention_products(tmp_path):
    """Budgets bisect on ``estimate_after``: with static tokens, QKᵀ and attention·V are a
    real share of the MACs and must shrink with the heads, as the rewritten graph's do."""
    from onnxprune.count import count_macs, estimate_after
    from onnxprune.groups import analyze_groups
    from onnxprune.load import load_model
    from onnxprune.rewrite import apply_removal

    src = save(attention("static"), tmp_path / "in.onnx")
    model, _ = load_model(src)
    analysis = analyze_groups(model)
    removed = group_of(analysis, "wq").classes[ZERO_HEADS]
    _, estimate = estimate_after(analysis, removed)
    before = count_macs(model)
    apply_removal(analysis, removed)
    after = count_macs(model)
    assert after < before and estimate == after


def test_product_of_two_tensors_without_channels_is_left_alone(tmp_path):
    """x·xᵀ of a graph input carries no channels: nothing to couple, nothing blocked."""
    g = G()
    x = g.input("x", [2, 5, 8])
    gram = g.op("MatMul", [x, g.op("Transpose", [x], perm=[0, 2, 1])], name="gram")
    y = g.op("MatMul", [g.op("Relu", [g.op("MatMul", [gram, g.const(g.w(5, 6))], name="fc")]), g.const(g.w(6, 3))])
    analysis = analysis_of(tmp_path, g.model([y]))
    assert group_of(analysis, "fc").prunable


def packed_qkv(zero_heads: list[int] | None = None, seed: int = 0) -> onnx.ModelProto:
    """Swin's attention: one packed projection ``qkv = x·W + b`` (W [C, 3·H·d]), then
    ``qkv.reshape(B, T, 3, H, d).permute(2, 0, 3, 1, 4)`` and ``q, k, v = qkv[0], qkv[1], qkv[2]``."""
    g = G(opset=17, seed=seed)
    x = g.input("x", [2, T, C])
    hd = HEADS * D
    qkv = _linear(g, x, C, 3 * hd, "qkv")
    qkv = g.op("Transpose", [g.op("Reshape", [qkv, g.const(_ints(2, T, 3, HEADS, D))])], perm=[2, 0, 3, 1, 4])
    q, k, v = (g.op("Gather", [qkv, g.const(np.array(i, dtype=np.int64))], axis=0) for i in range(3))
    scores = g.op("MatMul", [g.op("Mul", [q, g.const(np.float32(D**-0.5))]), g.op("Transpose", [k], perm=[0, 1, 3, 2])])
    ctx = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
    ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), g.const(_ints(2, T, hd))])
    wo = g.w(hd, C)
    for h in zero_heads or []:
        wo[h * D : (h + 1) * D] = 0
    return g.model([g.op("Add", [_linear(g, ctx, hd, C, "wo", weight=wo), x], name="residual")])


def test_packed_qkv_is_split_into_three_projections(tmp_path):
    analysis = analysis_of(tmp_path, packed_qkv())
    group = group_of(analysis, "qkv_part0")
    assert group.prunable, group.blocked
    assert producer_names(group) == {"qkv_part0", "qkv_part1", "qkv_part2"} and consumer_names(group) == {"wo"}
    assert len(group.classes) == HEADS
    assert "Gather" not in [n.op_type for n in analysis.model.graph]
    out = assert_exact(tmp_path, packed_qkv(zero_heads=ZERO_HEADS), "qkv_part0", ZERO_HEADS)
    kept = (HEADS - len(ZERO_HEADS)) * D
    assert sorted(tuple(t.dims) for t in onnx.load(str(out)).graph.initializer).count((C, kept)) == 3
    assert_random(tmp_path, packed_qkv(), seeds=(0,))


def test_macs_count_the_static_factor_of_merged_tokens(tmp_path):
    """``nn.MultiheadAttention`` applies its output projection to ``[T·B, E]``; onnxruntime's
    symbolic inference names that dim ``197*batch``: the 197 tokens count, the batch does not."""
    from onnxprune.count import count_macs
    from onnxprune.load import load_model

    g = G()
    x = g.input("x", ["7*batch", 8])
    model, _ = load_model(save(g.model([g.gemm(x, 8, 5, name="proj")]), tmp_path / "m.onnx"))
    assert count_macs(model) == 7 * 8 * 5


def test_folds_are_checked_against_the_original_values(tmp_path, monkeypatch):
    """prune compares the input after load's attention folds with the original on a feed
    before it prunes: a fold that changed the values stops it with a VerificationError."""
    import onnxprune.canonical as graph_mod
    from onnxprune.errors import VerificationError

    src = save(attention("dynamo"), tmp_path / "in.onnx")
    out = tmp_path / "out.onnx"
    onnxprune.prune(src, out, method="l1", ratio=0.5, latency=False)  # the real fold passes

    real = graph_mod._merged_leading

    def wrong(dx, d1, d2, perm):  # the same fold with the last two axes left unswapped
        plan = real(dx, d1, d2, perm)
        return None if plan is None else (None, sorted(plan[1]))

    monkeypatch.setattr(graph_mod, "_merged_leading", wrong)
    with pytest.raises(VerificationError, match="attention folds"):  # here: kᵀ no longer fits q
        onnxprune.prune(src, tmp_path / "bad.onnx", method="l1", ratio=0.5, latency=False)
    assert not (tmp_path / "bad.onnx").exists()


def test_restructured_check_compares_values(tmp_path):
    """A fold that keeps every shape but not the values (here: a weight nudged) is caught."""
    from onnxprune.errors import VerificationError
    from onnxprune.load import load_model
    from onnxprune.verify import check_restructured, run_original

    src = save(packed_qkv(), tmp_path / "in.onnx")
    model, _ = load_model(src)
    feed, reference = run_original(src)
    check_restructured(model, feed, reference)  # the split projections compute the same
    w = next(v for name, v in model.graph.initializers.items() if name.endswith("part1_w"))
    w.const_value = ir.tensor(w.const_value.numpy() * 1.5)
    with pytest.raises(VerificationError, match="changed the model's outputs"):
        check_restructured(model, feed, reference)
