"""``--method relief`` (NNrelief, Dekhovich et al.): connection scores, I_k and the α rule
computed by hand on tiny Gemm/MatMul, Flatten→Gemm and Conv consumers; dead channels;
structured removal; connection granularity; determinism; the shipped CNN."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxprune
from builders import G, calibrated, run, save
from onnxprune.errors import InputError
from onnxprune.methods import REGISTRY, MethodOptions, relief
from onnxprune.methods.relief import view_scores

MODELS = Path(__file__).resolve().parents[1] / "models"
RELIEF = REGISTRY["relief"]


# ----------------------------------------------------------------------------- helpers
def calibrated_relief(path: Path, data: list[dict]):
    """(analysis, views, stats) of ``path`` calibrated on ``data`` with relief's requests."""
    return calibrated(path, data, "relief")


def view_named(views, name: str):
    return next(v for v in views if v.node.name == name)


def removed_positions(analysis, selection: dict, producer: str) -> list[int]:
    """Positions (in the group's class order) that ``selection`` removes from ``producer``'s group."""
    group = next(g for g in analysis.groups if any(p.name == producer for p in g.producers))
    gone = set(selection.get(group.id, np.zeros(0)).tolist())
    return [i for i, c in enumerate(group.classes.tolist()) if c in gone]


def initializer(path: Path, node_name: str, index: int) -> np.ndarray:
    m = onnx.load(str(path))
    node = next(n for n in m.graph.node if n.name == node_name)
    return numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == node.input[index]))


def alpha_rule_by_hand(scores: list[float], alpha: float) -> set[int]:
    """Items (indices into ``scores``) kept: the shortest prefix of the descending sort
    whose cumulative sum reaches ``alpha`` (ties: lower index first)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept, total = set(), 0.0
    for i in order:
        if total >= alpha - 1e-9:
            break
        kept.add(i)
        total += scores[i]
    return kept


# ------------------------------------------------------------------------- dense consumer
# fc1 is the identity, so the consumer fc2 reads h = relu(x):
#   X = [[1, 2, 1], [3, -5, -1]]  ->  H = [[1, 2, 1], [3, 0, 0]],  E|h| = [2, 1, 0.5].
X_FC = np.array([[1, 2, 1], [3, -5, -1]], np.float32)
W2 = np.array([[2, -1, 4], [0.5, 0, -8]], np.float32)  # [out j, in k]
B2 = np.array([1, -2], np.float32)


def fc_model(head: str = "gemm1", dead: bool = False) -> onnx.ModelProto:
    """x[N,3] → fc1 (identity; channel 2 dead when ``dead``) → Relu → fc2 (W2, B2) → y[N,2]."""
    g = G()
    x = g.input("x", ["N", 3])
    w1 = np.eye(3, dtype=np.float32)
    b1 = np.zeros(3, np.float32)
    if dead:
        w1[2], b1[2] = 0, -1  # relu(-1) = 0 on every sample
    h = g.op("Relu", [g.op("Gemm", [x, g.const(w1), g.const(b1)], name="fc1", transB=1)])
    if head == "gemm1":
        y = g.op("Gemm", [h, g.const(W2), g.const(B2)], name="fc2", transB=1)
    elif head == "gemm0":
        y = g.op("Gemm", [h, g.const(np.ascontiguousarray(W2.T)), g.const(B2)], name="fc2")
    else:  # MatMul + Add: the bias is the Add's constant
        y = g.op("Add", [g.op("MatMul", [h, g.const(np.ascontiguousarray(W2.T))], name="fc2"), g.const(B2)])
    return g.model([y])


def fc_by_hand() -> tuple[np.ndarray, np.ndarray]:
    """s_jk = |W_jk|·E|x_k| / S_j, bias |b_j| / S_j, S_j = Σ_i |W_ji|·E|x_i| + |b_j|."""
    h = np.maximum(X_FC.astype(np.float64), 0)
    m = np.abs(h).mean(axis=0)
    assert m.tolist() == [2.0, 1.0, 0.5]
    s = np.zeros((2, 3))
    bias = np.zeros(2)
    for j in range(2):
        S = sum(abs(W2[j, i]) * m[i] for i in range(3)) + abs(B2[j])
        for k in range(3):
            s[j, k] = abs(W2[j, k]) * m[k] / S
        bias[j] = abs(B2[j]) / S
    # Row 0: |W|·m = [4, 1, 2], |b| = 1, S = 8; row 1: [1, 0, 4], |b| = 2, S = 7.
    np.testing.assert_allclose(s, [[4 / 8, 1 / 8, 2 / 8], [1 / 7, 0, 4 / 7]])
    np.testing.assert_allclose(bias, [1 / 8, 2 / 7])
    return s, bias


@pytest.mark.parametrize("head", ["gemm1", "gemm0", "matmul"])
def test_dense_scores_by_hand(tmp_path: Path, head: str) -> None:
    path = save(fc_model(head), tmp_path / "fc.onnx")
    analysis, views, stats = calibrated_relief(path, [{"x": X_FC}])
    s, bias = fc_by_hand()
    vs = view_scores(analysis, stats, view_named(views, "fc2"))
    np.testing.assert_allclose(vs.s, s, rtol=1e-6)
    np.testing.assert_allclose(vs.bias, bias, rtol=1e-6)
    # I_k = max_j s_jk = [1/2, 1/8, 4/7], per channel class of fc1.
    imp = RELIEF.scores(analysis, stats, views, MethodOptions())
    group = next(g for g in analysis.groups if g.prunable)
    np.testing.assert_allclose([imp[int(c)] for c in group.classes], s.max(axis=0), rtol=1e-6)
    np.testing.assert_allclose(s.max(axis=0), [1 / 2, 1 / 8, 4 / 7])


def test_dense_alpha_rule_by_hand(tmp_path: Path) -> None:
    """α_fc = 0.7. Row 0 sorted: k0 .5, k2 .25 → .75 ≥ .7: keeps {k0, k2}.  Row 1 sorted:
    k2 4/7, bias 2/7 → 6/7 ≥ .7: keeps {k2, bias}.  k1 is pruned at both rows → removed."""
    s, bias = fc_by_hand()
    keeps = [alpha_rule_by_hand([*s[j], bias[j]], 0.7) for j in range(2)]
    assert keeps == [{0, 2}, {2, 3}]  # 3 = the bias item
    removed_by_hand = [k for k in range(3) if not any(k in kept for kept in keeps)]
    assert removed_by_hand == [1]

    path = save(fc_model(), tmp_path / "fc.onnx")
    analysis, views, stats = calibrated_relief(path, [{"x": X_FC}])
    opts = MethodOptions(alpha_fc=0.7)
    assert RELIEF.own_rule(opts) and not RELIEF.own_rule(MethodOptions())
    sel = RELIEF.select(analysis, stats, views, opts, analysis.groups)
    assert removed_positions(analysis, sel, "fc1") == removed_by_hand
    # A higher α keeps more: at 0.9 row 0 needs k0, k2, k1 (.5+.25+.125) → nothing removed.
    sel = RELIEF.select(analysis, stats, views, MethodOptions(alpha_fc=0.9), analysis.groups)
    assert removed_positions(analysis, sel, "fc1") == []


def test_dense_prune_removes_exactly_the_pruned_channel(tmp_path: Path) -> None:
    path = save(fc_model(), tmp_path / "fc.onnx")
    out = tmp_path / "out.onnx"
    _, r = onnxprune.prune(path, out, method="relief", calib=[{"x": X_FC}], compensate="none",
                           method_options=MethodOptions(alpha_fc=0.7), latency=False)
    assert initializer(out, "fc1", 1).shape == (2, 3) and initializer(out, "fc2", 1).shape == (2, 2)
    feed = {"x": np.array([[0.5, -1, 2], [1, 1, 1], [-3, 2, 0.25]], np.float32)}
    (y,) = run(out, feed)
    (y0,) = run(path, feed)
    assert y.shape == y0.shape
    h = np.maximum(feed["x"], 0)
    np.testing.assert_allclose(y, h[:, [0, 2]] @ W2[:, [0, 2]].T + B2, rtol=1e-6)
    # Channel granularity: only the removed channel's 2 connections are gone; the α rule
    # also prunes (1, k0), which connection granularity would write.
    rep = r.method_report
    assert (rep["connections_total"], rep["connections_pruned"], rep["connections_zeroed"]) == (6, 2, 0)
    assert rep["connection_compression"] == pytest.approx(2 / 6)
    assert rep["rule_connection_compression"] == pytest.approx(3 / 6)


def test_dense_connection_granularity(tmp_path: Path) -> None:
    path = save(fc_model(), tmp_path / "fc.onnx")
    out = tmp_path / "out.onnx"
    _, r = onnxprune.prune(path, out, method="relief", calib=[{"x": X_FC}], compensate="none", latency=False,
                           method_options=MethodOptions(alpha_fc=0.7, granularity="connection"))
    # k1 is sliced out; (j=1, k0) is pruned on a kept channel → written as 0.
    np.testing.assert_array_equal(initializer(out, "fc2", 1), [[2, 4], [0, -8]])
    np.testing.assert_array_equal(initializer(out, "fc2", 2), B2)  # biases are never zeroed
    rep = r.method_report
    assert rep["granularity"] == "connection"
    assert (rep["connections_total"], rep["connections_removed"], rep["connections_zeroed"]) == (6, 2, 1)
    assert rep["connections_pruned"] == 3 and rep["connection_compression"] == pytest.approx(0.5)
    assert rep["connections_remaining"] == 3

    # A second round (what --steps does) sees the written zero as already pruned: fc2 is now
    # [[2, 4], [0, -8]] over E|h| = [2, .5]; row 0 (4/7, 2/7, bias 1/7) keeps both, row 1
    # (0, 2/3, bias 1/3) keeps k2 and its bias; nothing new goes.
    again = tmp_path / "again.onnx"
    _, r2 = onnxprune.prune(out, again, method="relief", calib=[{"x": X_FC}], compensate="none", latency=False,
                            method_options=MethodOptions(alpha_fc=0.7, granularity="connection"))
    rep2 = r2.method_report
    assert (rep2["connections_total"], rep2["connections_removed"], rep2["connections_zeroed"]) == (4, 0, 0)
    assert (rep2["connections_already_zero"], rep2["connections_pruned"], rep2["connections_remaining"]) == (1, 1, 3)
    # Over both rounds: 3 of the original 6 connections remain.
    assert 1 - rep2["connections_remaining"] / rep["connections_total"] == pytest.approx(0.5)


@pytest.mark.parametrize("compensate", ["bias", "lstsq"])
@pytest.mark.parametrize("steps", [1, 2])
def test_zeroed_connections_are_compensated(tmp_path: Path, compensate: str, steps: int) -> None:
    """The zeroed connection (j=1, k0) takes W2[1, 0]·E[h0] = 0.5·2 out of row 1 on average,
    and the removed channel k1 takes W2[:, 1]·E[h1] = [-1, 0]: fc2's bias becomes
    B2 + [-1, 0] + [0, 1] = [0, -1], by the bias delta and by the bias fit alike, while the
    zero stays.  A second round (``--steps 2``) zeroes nothing new and must not put the
    first round's connection back a second time."""
    path = save(fc_model(), tmp_path / "fc.onnx")
    out = tmp_path / "out.onnx"
    _, r = onnxprune.prune(path, out, method="relief", calib=[{"x": X_FC}], compensate=compensate, steps=steps,
                           latency=False, method_options=MethodOptions(alpha_fc=0.7, granularity="connection"))
    np.testing.assert_array_equal(initializer(out, "fc2", 1), [[2, 4], [0, -8]])
    np.testing.assert_allclose(initializer(out, "fc2", 2), [0, -1], atol=1e-6)


def test_connection_granularity_keeps_earlier_zeros_under_lstsq(tmp_path: Path) -> None:
    """A consumer with one zero connection left by an earlier round (1 of 24 weights, far
    below compensate.SPARSE_SHARE) loses a channel: under connection granularity it gets the
    bias fit and its zero stays; under channel granularity least squares refits it."""
    rng = np.random.default_rng(0)
    w2 = rng.standard_normal((4, 6)).astype(np.float32)
    w2[0, 0] = 0
    g = G()
    x = g.input("x", ["N", 6])
    w1 = np.diag([3, 3, 3, 3, 3, 0.1]).astype(np.float32)  # channel 5 has the smallest I_k
    h = g.op("Relu", [g.op("Gemm", [x, g.const(w1), g.const(np.zeros(6, np.float32))], name="fc1", transB=1)])
    y = g.op("Gemm", [h, g.const(w2), g.const(np.zeros(4, np.float32))], name="fc2", transB=1)
    path = save(g.model([y]), tmp_path / "m.onnx")
    xs = rng.standard_normal((128, 6)).astype(np.float32)
    xs[:, 5] = xs[:, 0] + 0.1 * xs[:, 5]  # the removed channel is predictable from channel 0
    data = [{"x": xs[i : i + 32]} for i in range(0, 128, 32)]
    for granularity, zero_stays in (("connection", True), ("channel", False)):
        out = tmp_path / f"{granularity}.onnx"
        onnxprune.prune(path, out, method="relief", ratio=1 / 6, round_to=1, calib=data, compensate="lstsq",
                        latency=False, method_options=MethodOptions(granularity=granularity))
        w = initializer(out, "fc2", 1)
        assert w.shape == (4, 5)
        assert (w[0, 0] == 0) == zero_stays, (granularity, w[0, 0])


@pytest.mark.parametrize("alpha", [0.0, 1.5])
def test_alpha_out_of_range(tmp_path: Path, alpha: float) -> None:
    path = save(fc_model(), tmp_path / "fc.onnx")
    with pytest.raises(InputError, match="alpha-fc"):
        onnxprune.prune(path, method="relief", calib=[{"x": X_FC}], latency=False,
                        method_options=MethodOptions(alpha_fc=alpha))


def test_budget_mode_ranks_by_max_score(tmp_path: Path) -> None:
    """--ratio 1/3 removes the channel with the smallest I_k (k1: 1/8)."""
    path = save(fc_model(), tmp_path / "fc.onnx")
    out = tmp_path / "out.onnx"
    _, r = onnxprune.prune(path, out, method="relief", ratio=1 / 3, calib=[{"x": X_FC}], compensate="none",
                           latency=False)
    np.testing.assert_array_equal(initializer(out, "fc2", 1), W2[:, [0, 2]])
    assert r.method_report["connections_pruned"] == 2 and "rule_connections_pruned" not in r.method_report


# ------------------------------------------------------------------------ dead channels
def test_dead_channel_removed(tmp_path: Path) -> None:
    """fc1's channel 2 is relu(-1) = 0 on every sample: mean |x| = 0 at its only consumer.
    α_fc = 1 keeps every connection that carries anything, so only the dead one goes."""
    path = save(fc_model(dead=True), tmp_path / "fc.onnx")
    x = np.array([[1, 2, 5], [3, 1, -4]], np.float32)
    analysis, views, stats = calibrated_relief(path, [{"x": x}])
    sel = RELIEF.select(analysis, stats, views, MethodOptions(alpha_fc=1.0), analysis.groups)
    assert removed_positions(analysis, sel, "fc1") == [2]
    # Budget mode: removed even at ratio 0 (scored -inf like every data-driven method's dead channels).
    out = tmp_path / "out.onnx"
    _, r = onnxprune.prune(path, out, method="relief", ratio=0.0, calib=[{"x": x}], latency=False)
    assert initializer(out, "fc2", 1).shape == (2, 2)
    assert next(g for g in r.groups if g["removable_channels"] == 3)["dead"] == 1


def test_min_keep(tmp_path: Path) -> None:
    """Dead k2 and α_fc = 0.3: E|h| = [2, 1.5, 0]; row 0 (|W|·m = [4, 1.5, 0], |b| = 1) keeps
    k0 alone (4/6.5 ≥ .3); row 1 ([1, 0, 0], |b| = 2) keeps its bias alone (2/3).  k1 and k2
    are both pruned everywhere; --min-keep 2 lets only one go: the dead one first."""
    path = save(fc_model(dead=True), tmp_path / "fc.onnx")
    x = np.array([[1, 2, 5], [3, 1, -4]], np.float32)
    analysis, views, stats = calibrated_relief(path, [{"x": x}])
    sel = RELIEF.select(analysis, stats, views, MethodOptions(alpha_fc=0.3, min_keep=1), analysis.groups)
    assert removed_positions(analysis, sel, "fc1") == [1, 2]
    sel = RELIEF.select(analysis, stats, views, MethodOptions(alpha_fc=0.3, min_keep=2), analysis.groups)
    assert removed_positions(analysis, sel, "fc1") == [2]


# ------------------------------------------------------------------------ Flatten → Gemm
def test_flatten_gemm_scores_by_hand(tmp_path: Path) -> None:
    """x[N,2,1,2] → c1 (1×1 identity) → Relu → Flatten → fc(4→2): feature f belongs to
    channel f // 2; I_k is the max over the rows and over the channel's two features."""
    g = G()
    x = g.input("x", ["N", 2, 1, 2])
    eye = np.eye(2, dtype=np.float32).reshape(2, 2, 1, 1)
    h = g.op("Relu", [g.op("Conv", [x, g.const(eye), g.const(np.zeros(2, np.float32))], name="c1", kernel_shape=[1, 1])])
    wf = np.array([[1, 0, 2, -1], [0, 3, 0.5, 0]], np.float32)
    bf = np.array([0, 1], np.float32)
    y = g.op("Gemm", [g.op("Flatten", [h], axis=1), g.const(wf), g.const(bf)], name="fc", transB=1)
    path = save(g.model([y]), tmp_path / "flat.onnx")
    xs = np.array([[[[1, 4]], [[2, 0]]], [[[3, -4]], [[0, 6]]]], np.float32)
    analysis, views, stats = calibrated_relief(path, [{"x": xs}])
    feats = np.maximum(xs.astype(np.float64), 0).reshape(2, 4)  # [[1, 4, 2, 0], [3, 0, 0, 6]]
    m = np.abs(feats).mean(axis=0)
    assert m.tolist() == [2, 2, 1, 3]
    s = np.zeros((2, 4))
    for j in range(2):
        S = sum(abs(wf[j, i]) * m[i] for i in range(4)) + abs(bf[j])
        s[j] = [abs(wf[j, f]) * m[f] / S for f in range(4)]
    vs = view_scores(analysis, stats, view_named(views, "fc"))
    np.testing.assert_allclose(vs.s, s, rtol=1e-6)
    imp = RELIEF.scores(analysis, stats, views, MethodOptions())
    group = next(gr for gr in analysis.groups if gr.prunable)
    by_hand = [max(s[j, f] for j in range(2) for f in (2 * k, 2 * k + 1)) for k in range(2)]
    np.testing.assert_allclose([imp[int(c)] for c in group.classes], by_hand, rtol=1e-6)


# -------------------------------------------------------------------------- Conv consumer
# c1 is a 1×1 identity, so c2 reads h = relu(x).  Two samples, explicit maps:
#   ch0: ones both times                 → M0 = ones
#   ch1: P = [[0,1,0],[1,2,1],[0,1,0]], then -P (relu: 0) → M1 = P / 2
#   ch2: 4 at (0,0), then 2 at (2,2)     → M2 = [[2,0,0],[0,0,0],[0,0,1]]
P1 = np.array([[0, 1, 0], [1, 2, 1], [0, 1, 0]], np.float32)
X_CONV = np.zeros((2, 3, 3, 3), np.float32)
X_CONV[:, 0] = 1
X_CONV[0, 1], X_CONV[1, 1] = P1, -P1
X_CONV[0, 2, 0, 0], X_CONV[1, 2, 2, 2] = 4, 2
# c2: 2 filters, 2×2 kernel, stride 2, pads 1 → a 2×2 output map.
WC = np.zeros((2, 3, 2, 2), np.float32)
WC[0, 0] = 1
WC[0, 1] = [[1, -1], [0, 0]]
WC[0, 2] = [[0, 0], [0, 0.5]]
WC[1, 0] = [[0, 0], [0, -2]]
WC[1, 1] = [[0, 0], [0, 0.1]]
WC[1, 2] = [[0, 0], [0, 1]]
BC = np.array([0.5, -1], np.float32)


def conv_model(spatial=(3, 3)) -> onnx.ModelProto:
    g = G()
    x = g.input("x", ["N", 3, *spatial])
    eye = np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1)
    h = g.op("Relu", [g.op("Conv", [x, g.const(eye), g.const(np.zeros(3, np.float32))], name="c1", kernel_shape=[1, 1])])
    y = g.op("Conv", [h, g.const(WC), g.const(BC)], name="c2", kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1])
    return g.model([y])


def conv_norm_by_hand(kernel: np.ndarray, mean_map: np.ndarray, stride: int, pad: int) -> float:
    """‖ |kernel| ∗ mean_map ‖_F with zero padding, by explicit loops."""
    kh, kw = kernel.shape
    h, w = mean_map.shape
    oh, ow = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1
    out = np.zeros((oh, ow))
    for oy in range(oh):
        for ox in range(ow):
            for ky in range(kh):
                for kx in range(kw):
                    iy, ix = oy * stride + ky - pad, ox * stride + kx - pad
                    if 0 <= iy < h and 0 <= ix < w:
                        out[oy, ox] += abs(kernel[ky, kx]) * mean_map[iy, ix]
    return float(np.sqrt((out**2).sum()))


def conv_by_hand() -> tuple[np.ndarray, np.ndarray]:
    maps = np.abs(np.maximum(X_CONV.astype(np.float64), 0)).mean(axis=0)  # [C, 3, 3]
    F = np.array([[conv_norm_by_hand(WC[j, k], maps[k], 2, 1) for k in range(3)] for j in range(2)])
    # Worked out on paper: |1|∗ones at pad 1 / stride 2 covers 1, 2, 2, 4 taps → ‖·‖ = 5;
    # 2·ones at tap (1,1) → 2 everywhere → 4; 0.1·M1 at the corners → 0; M2's corners → √5.
    assert F[0, 0] == 5 and F[1, 0] == 4 and F[1, 1] == 0
    assert F[0, 1] == pytest.approx(np.sqrt(2.5)) and F[0, 2] == pytest.approx(np.sqrt(1.25))
    assert F[1, 2] == pytest.approx(np.sqrt(5))
    hw = 2 * 2  # output positions
    bias = np.abs(BC.astype(np.float64)) * np.sqrt(hw)
    S = F.sum(axis=1) + bias
    return F / S[:, None], bias / S


def test_conv_scores_by_hand(tmp_path: Path) -> None:
    path = save(conv_model(), tmp_path / "conv.onnx")
    analysis, views, stats = calibrated_relief(path, [{"x": X_CONV}])
    s, bias = conv_by_hand()
    vs = view_scores(analysis, stats, view_named(views, "c2"))
    np.testing.assert_allclose(vs.s, s, rtol=1e-6)
    np.testing.assert_allclose(vs.bias, bias, rtol=1e-6)
    imp = RELIEF.scores(analysis, stats, views, MethodOptions())
    group = next(g for g in analysis.groups if g.prunable)
    np.testing.assert_allclose([imp[int(c)] for c in group.classes], s.max(axis=0), rtol=1e-6)


def test_conv_alpha_rule_by_hand(tmp_path: Path) -> None:
    """α_conv = 0.5: row 0 (≈ .575, .182, .128, bias .115) keeps k0 alone; row 1
    (≈ .486, 0, .271, bias .243) needs k0 then k2.  k1 is pruned everywhere → removed."""
    s, bias = conv_by_hand()
    keeps = [alpha_rule_by_hand([*s[j], bias[j]], 0.5) for j in range(2)]
    assert keeps == [{0}, {0, 2}]
    path = save(conv_model(), tmp_path / "conv.onnx")
    analysis, views, stats = calibrated_relief(path, [{"x": X_CONV}])
    sel = RELIEF.select(analysis, stats, views, MethodOptions(alpha_conv=0.5), analysis.groups)
    assert removed_positions(analysis, sel, "c1") == [1]
    # α_fc alone set: conv layers use the default α_conv 0.9 → row 0 needs k0, k1, k2 → none removed.
    sel = RELIEF.select(analysis, stats, views, MethodOptions(alpha_fc=0.5), analysis.groups)
    assert removed_positions(analysis, sel, "c1") == []

    out = tmp_path / "out.onnx"
    _, r = onnxprune.prune(path, out, method="relief", calib=[{"x": X_CONV}], latency=False,
                           method_options=MethodOptions(alpha_conv=0.5, granularity="connection"))
    # k1 sliced out; (j=0, k2) pruned on a kept channel → its whole kernel written as 0.
    expected = WC[:, [0, 2]].copy()
    expected[0, 1] = 0
    np.testing.assert_array_equal(initializer(out, "c2", 1), expected)
    feed = {"x": np.random.default_rng(0).standard_normal((2, 3, 3, 3)).astype(np.float32)}
    assert run(out, feed)[0].shape == run(path, feed)[0].shape == (2, 2, 2, 2)
    rep = r.method_report
    assert (rep["connections_total"], rep["connections_removed"], rep["connections_zeroed"]) == (6, 2, 1)
    assert (rep["weights_total"], rep["weights_pruned"]) == (24, 12)
    assert rep["connection_compression"] == pytest.approx(0.5)


def test_conv_dynamic_spatial_fallback(tmp_path: Path) -> None:
    """Spatial size not static: the map is taken as constant, s_jk ∝ E|x_k|·‖W[j,k]‖₁, bias |b_j|."""
    path = save(conv_model(spatial=("H", "W")), tmp_path / "conv.onnx")
    analysis, views, stats = calibrated_relief(path, [{"x": X_CONV}])
    assert not RELIEF.requests(analysis, views, MethodOptions())
    m = np.abs(np.maximum(X_CONV.astype(np.float64), 0)).mean(axis=(0, 2, 3))
    c = np.array([[np.abs(WC[j, k]).sum() * m[k] for k in range(3)] for j in range(2)])
    S = c.sum(axis=1) + np.abs(BC)
    vs = view_scores(analysis, stats, view_named(views, "c2"))
    np.testing.assert_allclose(vs.s, c / S[:, None], rtol=1e-6)
    np.testing.assert_allclose(vs.bias, np.abs(BC) / S, rtol=1e-6)


@pytest.mark.parametrize("chunk_bytes", [None, 1])
def test_grouped_conv_scores_by_hand(tmp_path: Path, monkeypatch, chunk_bytes: int | None) -> None:
    """gc: 4 → 4 channels, group 2, 3×3 kernel, pad 1, stride 1.  Filter j of group
    g = j // 2 reads channels 2g, 2g+1; local index k is one class across both groups.
    ``chunk_bytes`` 1: one input and one output channel per chunk gives the same scores."""
    if chunk_bytes is not None:
        monkeypatch.setattr(relief, "_CHUNK_BYTES", chunk_bytes)
    rng = np.random.default_rng(7)
    g = G()
    x = g.input("x", ["N", 4, 4, 4])
    eye = np.eye(4, dtype=np.float32).reshape(4, 4, 1, 1)
    h = g.op("Relu", [g.op("Conv", [x, g.const(eye), g.const(np.zeros(4, np.float32))], name="c1", kernel_shape=[1, 1])])
    wg = rng.integers(-3, 4, size=(4, 2, 3, 3)).astype(np.float32)
    bg = np.array([1, 0, -2, 0.5], np.float32)
    y = g.op("Conv", [h, g.const(wg), g.const(bg)], name="gc", kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=2)
    path = save(g.model([y]), tmp_path / "grouped.onnx")
    xs = rng.integers(-2, 5, size=(3, 4, 4, 4)).astype(np.float32)
    analysis, views, stats = calibrated_relief(path, [{"x": xs}])

    maps = np.abs(np.maximum(xs.astype(np.float64), 0)).mean(axis=0)
    s = np.zeros((4, 2))
    for j in range(4):
        grp = j // 2
        F = [conv_norm_by_hand(wg[j, k], maps[grp * 2 + k], 1, 1) for k in range(2)]
        S = sum(F) + abs(bg[j]) * np.sqrt(16)
        s[j] = np.array(F) / S
    vs = view_scores(analysis, stats, view_named(views, "gc"))
    np.testing.assert_allclose(vs.s, s, rtol=1e-6)
    imp = RELIEF.scores(analysis, stats, views, MethodOptions())
    group = next(gr for gr in analysis.groups if any(p.name == "c1" for p in gr.producers))
    np.testing.assert_allclose([imp[int(c)] for c in group.classes], s.max(axis=0), rtol=1e-6)


# ---------------------------------------------------------------------------- determinism
def test_deterministic(tmp_path: Path) -> None:
    path = save(conv_model(), tmp_path / "conv.onnx")
    outs = []
    for i in range(2):
        out = tmp_path / f"out{i}.onnx"
        onnxprune.prune(path, out, method="relief", calib=[{"x": X_CONV}], latency=False,
                        method_options=MethodOptions(alpha_conv=0.5, granularity="connection"))
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


# ------------------------------------------------------------------------ the shipped CNN
@pytest.mark.parametrize("granularity", ["channel", "connection"])
def test_shipped_cnn(tmp_path: Path, granularity: str) -> None:
    """α_conv 0.9 / α_fc 0.95, the default compensation, 256 calibration samples, 1,000 held-out
    digits: both granularities keep the accuracy within about a point of the original's, and the
    connection granularity zeroes more than half of the consumer weights (its compression is
    the rule's), the channel one none (the rule's connections of kept channels stay)."""
    out = tmp_path / "cnn.onnx"
    _, r = onnxprune.prune(
        MODELS / "mnist_cnn.onnx", out, method="relief", calib=MODELS / "data" / "calib",
        eval_data=MODELS / "data" / "eval", labels=MODELS / "data" / "heldout_labels.npy", latency=False,
        method_options=MethodOptions(alpha_conv=0.9, alpha_fc=0.95, granularity=granularity),
    )
    assert r.params_after < r.params_before and r.macs_after < r.macs_before
    onnx.checker.check_model(str(out), full_check=True)
    assert r.fidelity["accuracy_before"] == pytest.approx(0.988)
    assert r.fidelity["accuracy_after"] >= 0.975
    rep = r.method_report
    assert rep["granularity"] == granularity
    assert 0 < rep["connections_pruned"] < rep["connections_total"]
    if granularity == "connection":
        assert rep["connections_zeroed"] > 0 and rep["connection_compression"] > 0.58
        assert rep["connection_compression"] == pytest.approx(rep["rule_connection_compression"])
    else:
        assert rep["connections_zeroed"] == 0 and rep["rule_connection_compression"] > rep["connection_compression"]
