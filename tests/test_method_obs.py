"""``obs``: the greedy least-squares (Optimal Brain Surgeon) order, checked against a brute
force that refits the kept weights from scratch at every step, for a Gemm and for a 3×3
Conv (blocks of 9 im2col columns); a channel that is a sum of two others goes first."""

from __future__ import annotations

import numpy as np

import onnxprune
from builders import G, calibrated, save
from onnxprune.calibrate import GramKey, InputRef
from onnxprune.compensate import LSTSQ_RIDGE
from onnxprune.criteria import score_groups


def _brute_order(w: np.ndarray, cov: np.ndarray, blocks: list[np.ndarray]) -> list[int]:
    """Greedy removal order: at each step the block whose removal, with the kept weights
    refitted by ridge least squares from scratch, leaves the least output error
    tr(W (H − H_:S H_SS⁻¹ H_S:) Wᵀ)."""
    h = cov.copy()
    h[np.diag_indices_from(h)] += LSTSQ_RIDGE * np.trace(h) / len(h)
    left, order = list(range(len(blocks))), []
    while len(left) > 1:
        errs = []
        for b in left:
            keep = np.concatenate([blocks[k] for k in left if k != b])
            resid = h - h[:, keep] @ np.linalg.solve(h[np.ix_(keep, keep)], h[keep, :])
            errs.append(float(np.trace(w @ resid @ w.T)))
        order.append(left.pop(int(np.argmin(errs))))
    return order + left


def _data(shape, n=8, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def test_gemm_order_matches_the_brute_force_and_a_dependent_channel_goes_first(tmp_path):
    g = G(seed=3)
    x = g.input("x", ["N", 5])
    w1 = g.w(6, 5)
    w1[5] = w1[0] + w1[1]  # channel 5 = channel 0 + channel 1 (no activation in between)
    h = g.op("Gemm", [x, g.const(w1), g.const(np.zeros(6, np.float32))], name="fc1", transB=1)
    w2 = g.w(3, 6)
    w2[:, 5] *= 4  # the dependent channel carries the largest weights: magnitude would keep it
    y = g.op("Gemm", [h, g.const(w2), g.const(g.w(3))], name="fc2", transB=1)
    path = save(g.model([y]), tmp_path / "m.onnx")
    analysis, views, stats = calibrated(path, _data((32, 5)), "obs")
    (group,) = [gr for gr in analysis.groups if gr.prunable]
    scores = score_groups(analysis, "obs", stats=stats)[group.id]
    order = [int(i) for i in np.argsort(scores, kind="stable")]
    (i,) = [k for k, v in enumerate(views) if v.node.name == "fc2"]
    gram = stats.extra[GramKey(InputRef.of(views[i]))]
    blocks = [np.array([k]) for k in range(6)]
    assert order == _brute_order(w2.astype(np.float64), gram.covariance(), blocks)
    assert order[0] in (0, 1, 5)  # any one of the three dependent channels costs nothing


def test_conv_order_uses_whole_kernel_blocks(tmp_path):
    g = G(seed=4)
    x = g.input("x", ["N", 3, 6, 6])
    a = g.op("Relu", [g.conv(x, 3, 5, name="c1")])
    y = g.op("GlobalAveragePool", [g.conv(a, 5, 4, name="c2")])
    path = save(g.model([y]), tmp_path / "m.onnx")
    analysis, views, stats = calibrated(path, _data((4, 3, 6, 6)), "obs")
    (group,) = [gr for gr in analysis.groups if gr.prunable]
    scores = score_groups(analysis, "obs", stats=stats)[group.id]
    order = [int(i) for i in np.argsort(scores, kind="stable")]
    (i,) = [k for k, v in enumerate(views) if v.node.name == "c2"]
    gram = stats.extra[GramKey(InputRef.of(views[i]))]
    w = views[i].weight().reshape(4, -1)
    blocks = [np.arange(9) + 9 * k for k in range(5)]
    assert order == _brute_order(w, gram.covariance(), blocks)


def test_obs_prunes_end_to_end_and_is_deterministic(tmp_path):
    src = tmp_path / "m.onnx"
    g = G(seed=5)
    x = g.input("x", ["N", 3, 8, 8])
    a = g.op("Relu", [g.conv(x, 3, 8, name="c1")])
    b = g.op("Relu", [g.conv(a, 8, 8, name="c2")])
    save(g.model([g.op("GlobalAveragePool", [g.conv(b, 8, 4, name="c3")])]), src)
    data = _data((4, 3, 8, 8), n=16)
    outs = []
    for k in range(2):
        out = tmp_path / f"o{k}.onnx"
        _, r = onnxprune.prune(src, out, method="obs", calib=data, ratio=0.5, latency=False)
        assert r.params_after < r.params_before
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
