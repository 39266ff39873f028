"""Calibration: statistics that merge, stay within the memory budget, match numpy; the
data-driven criteria computed by hand; dead channels; bias compensation; targets."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxprune
from builders import G, params, run, save
from onnxprune import calibrate as calibrate_module
from onnxprune.calibrate import STATISTICS, NotGathered, TensorStats, calibrate
from onnxprune.consumers import consumer_views
from onnxprune.criteria import DATA_DRIVEN, score_groups, statistics_for
from onnxprune.data import batches, input_specs, source_items
from onnxprune._ort import session
from onnxprune.groups import analyze_groups
from onnxprune.load import load_model


def _mlp(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray) -> onnx.ModelProto:
    """x[N,4] → Gemm(W1, transB) → Relu → Gemm(W2, transB) → y."""
    g = G()
    x = g.input("x", ["N", w1.shape[1]])
    h = g.op("Relu", [g.op("Gemm", [x, g.const(w1), g.const(b1)], name="fc1", transB=1)])
    y = g.op("Gemm", [h, g.const(w2), g.const(b2)], name="fc2", transB=1)
    return g.model([y])


def _stats(path, data, batch_size=4, budget=2**30, statistics=STATISTICS, raw=False):
    """Calibrate on ``data`` (through data.batches, or handed over as batches when ``raw``)."""
    model, _ = load_model(path)
    analysis = analyze_groups(model)
    specs = input_specs(session(str(path)))
    tensors = {v.tensor: (v.value, v.axis) for v in consumer_views(analysis)}
    stats, _ = calibrate(
        model, tensors, iter(data) if raw else batches(source_items(data, specs)(), specs, batch_size),
        batch_size=batch_size, providers=["CPUExecutionProvider"], memory_budget=budget, progress=False,
        statistics=statistics,
    )
    return analysis, stats


@pytest.fixture
def mlp(tmp_path):
    rng = np.random.default_rng(3)
    w1, b1 = rng.standard_normal((5, 4)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    w2, b2 = rng.standard_normal((3, 5)).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    x = rng.standard_normal((20, 4)).astype(np.float32)
    path = save(_mlp(w1, b1, w2, b2), tmp_path / "mlp.onnx")
    h = np.maximum(x @ w1.T + b1, 0).astype(np.float64)
    return path, [{"x": x[i : i + 5]} for i in range(0, 20, 5)], w2.astype(np.float64), h


def test_statistics_match_numpy(mlp):
    path, data, _, h = mlp
    _, stats = _stats(path, data)
    (st,) = stats.tensors.values()
    assert st.n == 20 and stats.samples == 20
    np.testing.assert_allclose(st.mean, h.mean(0), rtol=1e-6)
    np.testing.assert_allclose(st.var, h.var(0), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(st.mean_abs, np.abs(h).mean(0), rtol=1e-6)
    np.testing.assert_array_equal(st.nonpos, (h <= 0).sum(0))


def test_statistics_merge_shards(mlp):
    path, data, _, _ = mlp
    _, a = _stats(path, data[:2])
    _, b = _stats(path, data[2:])
    _, both = _stats(path, data)
    merged = a.merge(b)
    assert merged.samples == both.samples == 20
    for name, st in both.tensors.items():
        m = merged.tensors[name]
        assert m.n == st.n
        for field in ("sum", "sumsq", "sumabs", "nonpos"):
            np.testing.assert_allclose(getattr(m, field), getattr(st, field), rtol=1e-9)


def test_tensor_stats_merge_is_additive():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 3, 4, 4)).astype(np.float32)
    a, b, c = TensorStats.empty(3), TensorStats.empty(3), TensorStats.empty(3)
    a.update(x[:2], 1)
    b.update(x[2:], 1)
    c.update(x, 1)
    m = a.merge(b)
    np.testing.assert_allclose(m.sum, c.sum)
    np.testing.assert_allclose(m.var, x.transpose(1, 0, 2, 3).reshape(3, -1).var(1), rtol=1e-5)


def _reference(x: np.ndarray, axis: int) -> dict[str, np.ndarray]:
    """The statistics in float64 from the float32 values, reduced the plain way."""
    axes = tuple(i for i in range(x.ndim) if i != axis)
    r = x.astype(np.float32).astype(np.float64)
    return {"sum": r.sum(axes), "sumsq": (r * r).sum(axes), "sumabs": np.abs(r).sum(axes), "nonpos": (r <= 0).sum(axes)}


@pytest.mark.parametrize("shape, axis", [
    ((3, 4, 300, 300), 1),  # rows longer than a block: pieces of one row
    ((5, 6, 40, 40), 1),  # several channels per block
    ((64, 3, 5, 5), 1),  # several samples per block
    ((50_000, 6), 1),  # [N, C]: rows are samples
    ((7, 40, 33), 2),  # channels last
    ((6, 5, 7), 0),  # channel axis first
])
def test_tensor_stats_match_float64_with_a_large_mean(shape, axis):
    """1e3 + noise: float32 partial sums would drift over long rows or many samples."""
    rng = np.random.default_rng(4)
    x = (1e3 + rng.standard_normal(shape)).astype(np.float32)
    x = np.moveaxis(x, axis, 0)
    x[0] *= -1  # one negative channel and a few exact zeros: count(x <= 0) is not trivial
    x[1].reshape(-1)[::97] = 0.0
    x = np.ascontiguousarray(np.moveaxis(x, 0, axis))
    st = TensorStats.empty(shape[axis])
    for part in np.array_split(x, 2, axis=1 if axis == 0 else 0):  # two batches
        st.update(np.ascontiguousarray(part), axis)
    want = _reference(x, axis)
    assert st.n == x.size // shape[axis]
    for name in ("sum", "sumsq", "sumabs"):
        np.testing.assert_allclose(getattr(st, name), want[name], rtol=1e-6, err_msg=name)
    np.testing.assert_array_equal(st.nonpos, want["nonpos"])


def test_tensor_stats_of_float16_and_empty_tensors():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 3, 6, 6)).astype(np.float16)
    st = TensorStats.empty(3)
    st.update(x, 1)
    st.update(np.zeros((0, 3, 6, 6), np.float16), 1)
    want = _reference(x, 1)
    for name in ("sum", "sumsq", "sumabs"):
        np.testing.assert_allclose(getattr(st, name), want[name], rtol=1e-6)
    np.testing.assert_array_equal(st.nonpos, want["nonpos"])
    assert st.n == 4 * 36


def test_statistics_not_gathered_fail_loudly(mlp):
    st = TensorStats.empty(3, ("sum", "sumsq"))
    st.update(np.ones((2, 3), np.float32), 1)
    assert st.statistics == ("sum", "sumsq")
    for name in ("sumabs", "nonpos", "mean_abs"):
        with pytest.raises(NotGathered, match="sumabs|nonpos"):
            getattr(st, name)
    full = TensorStats.empty(3)
    full.update(np.ones((2, 3), np.float32), 1)
    merged = full.merge(st)  # what one shard lacks, the union lacks
    assert merged.statistics == ("sum", "sumsq") and merged.n == 4
    with pytest.raises(NotGathered):
        merged.sumabs
    assert TensorStats.empty(3, ("sumabs",)).statistics == ("sum", "sumsq", "sumabs")
    with pytest.raises(ValueError, match="unknown statistics"):
        TensorStats.empty(3, ("sum", "median"))

    path, data, _, _ = mlp
    analysis, stats = _stats(path, data, statistics=statistics_for("wanda"))
    (group,) = [g for g in analysis.groups if g.prunable]
    assert score_groups(analysis, "wanda", stats=stats)[group.id].shape == (5,)
    with pytest.raises(NotGathered):
        score_groups(analysis, "activation", stats=stats)


@pytest.mark.parametrize("method", DATA_DRIVEN)
def test_every_method_gets_the_statistics_it_reads(mlp, method):
    path, data, _, _ = mlp
    _, r = onnxprune.prune(path, method=method, ratio=0.4, calib=data, batch_size=4, latency=False)
    assert r.params_after < r.params_before


def _conv_chain(tmp_path, spatial):
    g = G()
    x = g.input("x", ["N", 3, *spatial])
    a = g.op("Relu", [g.conv(x, 3, 8, name="c1")])
    b = g.op("Relu", [g.conv(a, 8, 8, name="c2")])
    c = g.op("Relu", [g.conv(b, 8, 8, name="c3")])
    y = g.op("GlobalAveragePool", [g.conv(c, 8, 4, name="c4")])
    return save(g.model([y]), tmp_path / "m.onnx")


class _Watched:
    """An onnxruntime session that records the bytes each run returns, and the most earlier
    runs whose outputs were still referenced when a run started."""

    def __init__(self, sess, log):
        self.sess, self.log = sess, log
        self.earlier: list = []  # per earlier run, weak references to its outputs

    def run(self, names, feed):
        import weakref

        alive = sum(any(r() is not None for r in refs) for refs in self.earlier)
        self.log["overlap"] = max(self.log.get("overlap", 0), alive)
        outs = self.sess.run(names, feed)
        self.earlier.append([weakref.ref(o) for o in outs])
        self.log.setdefault("runs", []).append((next(iter(feed.values())).shape, sum(o.nbytes for o in outs)))
        return outs

    def __getattr__(self, name):
        return getattr(self.sess, name)


@pytest.fixture
def watched(monkeypatch):
    log: dict = {}
    real = calibrate_module._ort.session
    monkeypatch.setattr(calibrate_module._ort, "session", lambda *a, **k: _Watched(real(*a, **k), log))
    return log


def test_a_run_starts_while_at_most_the_one_before_is_still_folded(tmp_path, watched):
    """The next run is computed ahead while the last one is folded (_collect_ahead): its
    outputs are alive then, no earlier run's are."""
    path = _conv_chain(tmp_path, [8, 8])
    data = [{"x": np.random.default_rng(i).standard_normal((4, 3, 8, 8)).astype(np.float32)} for i in range(3)]
    _, stats = _stats(path, data, budget=9 * 1024)
    assert stats.runs_per_batch == 3 and len(watched["runs"]) == 9
    assert watched["overlap"] <= 1


def test_memory_budget_measures_what_the_shapes_do_not_tell(tmp_path, watched):
    """Spatial dims unknown to shape inference: the plan comes from the first batch's
    measured sizes, again when the input size changes, and every run fits the budget."""
    path = _conv_chain(tmp_path, ["H", "W"])
    rng = np.random.default_rng(0)
    small = [{"x": rng.standard_normal((4, 3, 8, 8)).astype(np.float32)} for _ in range(2)]
    large = [{"x": rng.standard_normal((4, 3, 16, 16)).astype(np.float32)} for _ in range(2)]
    # Two runs are alive at once (one folded, the next computed): each gets half the budget.
    # 8×16×16×4 B = 8 KiB per sample and tensor, 32 KiB per batch of 4; 8×8×8×4 B: 8 KiB per batch.
    budget = 64 * 1024
    _, one = _stats(path, small + large, raw=True)
    watched["runs"].clear()
    _, split = _stats(path, small + large, raw=True, budget=budget)
    assert one.runs_per_batch == 1 and split.runs_per_batch == 3
    runs = watched["runs"]
    assert [shape for shape, _ in runs if shape[0] == 1] == [(1, 3, 8, 8), (1, 3, 16, 16)]  # one probe per input size
    assert len(runs) == 2 + 2 * 1 + 2 * 3  # probes, small batches in one run, large ones in three
    assert all(nbytes <= budget // 2 for _, nbytes in runs)
    for name in one.tensors:
        np.testing.assert_allclose(split.tensors[name].sumsq, one.tensors[name].sumsq)


def test_memory_budget_splits_runs_and_gives_the_same_statistics(tmp_path):
    g = G()
    x = g.input("x", ["N", 3, 8, 8])
    a = g.op("Relu", [g.conv(x, 3, 8, name="c1")])
    b = g.op("Relu", [g.conv(a, 8, 8, name="c2")])
    c = g.op("Relu", [g.conv(b, 8, 8, name="c3")])
    y = g.op("GlobalAveragePool", [g.conv(c, 8, 4, name="c4")])
    path = save(g.model([y]), tmp_path / "m.onnx")
    data = [{"x": np.random.default_rng(i).standard_normal((4, 3, 8, 8)).astype(np.float32)} for i in range(3)]
    _, one = _stats(path, data)
    # One exposed tensor is 8·8·8·4 B = 2 KiB per sample, 8 KiB per batch of 4.
    _, split = _stats(path, data, budget=9 * 1024)
    assert one.runs_per_batch == 1 and split.runs_per_batch == 3
    for name in one.tensors:
        np.testing.assert_allclose(split.tensors[name].sumsq, one.tensors[name].sumsq)


def test_wanda_flap_activation_by_hand(mlp):
    path, data, w2, h = mlp
    analysis, stats = _stats(path, data)
    (group,) = [g for g in analysis.groups if g.prunable]
    col = np.linalg.norm(w2, axis=0)  # ‖W2[:, k]‖
    expected = {
        "wanda": col * np.sqrt((h**2).mean(0)),
        "flap": h.var(0) * col**2,
        "activation": np.abs(h).mean(0),
    }
    for method, want in expected.items():
        got = score_groups(analysis, method, stats=stats)[group.id]
        dead = (h == 0).all(0)
        np.testing.assert_allclose(got[~dead], want[~dead], rtol=1e-5)
        assert np.isneginf(got[dead]).all()


def test_dead_channels_are_always_removed_exactly(tmp_path):
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((6, 4)).astype(np.float32)
    b1 = rng.standard_normal(6).astype(np.float32)
    w1[[1, 4]] = 0.0
    b1[[1, 4]] = -1.0  # ReLU(-1) = 0 for every input: dead
    w2, b2 = rng.standard_normal((3, 6)).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    src = save(_mlp(w1, b1, w2, b2), tmp_path / "m.onnx")
    data = [{"x": rng.standard_normal((8, 4)).astype(np.float32)} for _ in range(3)]
    out = tmp_path / "o.onnx"
    _, result = onnxprune.prune(src, out, method="wanda", ratio=0.0, calib=data, compensate="none")
    fc1 = next(g for g in result.groups if g["producers"] == ["Gemm 'fc1'"])
    assert fc1["kept"] == 4 and fc1["dead"] == 2
    feed = {"x": rng.standard_normal((5, 4)).astype(np.float32)}
    np.testing.assert_allclose(run(out, feed)[0], run(src, feed)[0], atol=1e-5)


@pytest.mark.parametrize("consumer", ["gemm", "matmul", "conv1x1"])
def test_bias_compensation_removes_constant_channels_exactly(tmp_path, consumer):
    """Channels that are constant (non-zero) on the data: removed with their mean folded
    into the consumer's bias, the output does not change; without compensation it does."""
    rng = np.random.default_rng(2)
    g = G()
    if consumer == "conv1x1":
        x = g.input("x", ["N", 4, 5, 5])
        w1 = rng.standard_normal((6, 4, 1, 1)).astype(np.float32)
        w1[[0, 3]] = 0.0
        h = g.op("Relu", [g.conv(x, 4, 6, k=1, name="p", weight=w1, bias=True)])
        y = g.conv(h, 6, 3, k=1, name="c", bias=False, weight=rng.standard_normal((3, 6, 1, 1)).astype(np.float32))
        feed_shape = (6, 4, 5, 5)
    else:
        x = g.input("x", ["N", 4])
        w1 = rng.standard_normal((6, 4)).astype(np.float32)
        w1[[0, 3]] = 0.0
        h = g.op("Relu", [g.op("Gemm", [x, g.const(w1), g.const(np.abs(rng.standard_normal(6)).astype(np.float32) + 0.5)], name="p", transB=1)])
        w2 = rng.standard_normal((6, 3)).astype(np.float32)
        if consumer == "gemm":
            y = g.op("Gemm", [h, g.const(w2)], name="c")
        else:
            y = g.op("MatMul", [h, g.const(w2)], name="c")
        feed_shape = (6, 4)
    if consumer == "conv1x1":  # give the producer's constant channels a positive bias
        for t in g.inits:
            if t.dims == [6]:
                arr = onnx.numpy_helper.to_array(t).copy()
                arr[[0, 3]] = [0.7, 1.3]
                t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
    src = save(g.model([y]), tmp_path / "m.onnx")
    data = [{"x": rng.standard_normal(feed_shape).astype(np.float32)} for _ in range(3)]
    feed = {"x": rng.standard_normal(feed_shape).astype(np.float32)}
    ref = run(src, feed)[0]
    model, _ = load_model(src)
    analysis = analyze_groups(model)
    group = next(gr for gr in analysis.groups if gr.producers[0].name == "p")
    # Force exactly channels 0 and 3 out: score them lowest through a custom ratio on flap
    # (their variance is 0, so flap ranks them last).
    out_b, out_n = tmp_path / "b.onnx", tmp_path / "n.onnx"
    onnxprune.prune(src, out_b, method="flap", ratio=2 / 6, calib=data, compensate="bias")
    onnxprune.prune(src, out_n, method="flap", ratio=2 / 6, calib=data, compensate="none")
    assert params(out_b) < params(src)
    np.testing.assert_allclose(run(out_b, feed)[0], ref, atol=1e-4)
    assert np.abs(run(out_n, feed)[0] - ref).max() > 1e-2
    assert len(group.classes) == 6


def test_target_macs_and_params(tmp_path):
    g = G()
    x = g.input("x", ["N", 3, 8, 8])
    a = g.op("Relu", [g.conv(x, 3, 16, name="c1")])
    b = g.op("Relu", [g.conv(a, 16, 32, name="c2")])
    c = g.op("Relu", [g.conv(b, 32, 16, name="c3")])
    y = g.gemm(g.op("Flatten", [g.op("GlobalAveragePool", [c])]), 16, 5, name="fc")
    src = save(g.model([y]), tmp_path / "m.onnx")
    data = [{"x": np.random.default_rng(i).standard_normal((8, 3, 8, 8)).astype(np.float32)} for i in range(2)]
    for target, key in ((0.5, "macs"), (0.3, "params")):
        kwargs = {"target_macs": target} if key == "macs" else {"target_params": target}
        _, r = onnxprune.prune(src, method="wanda", calib=data, **kwargs)
        before, after = (r.macs_before, r.macs_after) if key == "macs" else (r.params_before, r.params_after)
        assert after / before <= target + 1e-9
        assert after / before > target - 0.1, (key, after / before)


def test_calibration_data_reader_protocol(tmp_path, mlp):
    path, data, _, _ = mlp

    class Reader:  # what onnxruntime.quantization.CalibrationDataReader subclasses look like
        def __init__(self):
            self.it = iter(data)

        def get_next(self):
            return next(self.it, None)

    _, a = _stats(path, Reader())
    _, b = _stats(path, data)
    assert a.samples == b.samples == 20
    (sa,), (sb,) = a.tensors.values(), b.tensors.values()
    np.testing.assert_allclose(sa.sum, sb.sum)


def test_report_has_fidelity_latency_calibration(tmp_path, mlp):
    path, data, _, _ = mlp
    _, r = onnxprune.prune(path, method="activation", ratio=0.4, calib=data, eval_samples=5)
    d = r.to_dict()
    assert d["calibration"]["samples"] + d["calibration"]["held_out"] == 20
    assert d["calibration"]["held_out"] == 4  # every fifth of 20 samples
    assert d["fidelity"]["samples"] == 4 and 0 <= d["fidelity"]["rel_l2"]
    assert d["latency"]["before_s"] > 0 and d["latency"]["after_s"] > 0
    assert d["compensation"] == "lstsq"  # the default with calibration data
    assert d["refit"] == {"lstsq": 1, "bias": 0, "keep_zeros": 0, "post_relu": 0}  # the one consumer
    assert "calibrate" in d["seconds"]


def test_latency_comes_from_the_fidelity_runs_when_there_are_enough(tmp_path, mlp, monkeypatch):
    """With an evaluation set of several full batches, the latency is the median of the
    fidelity check's own interleaved runs: no extra runs of either model (paired_latency
    would fail here); with too few batches the paired runs on the feed measure it."""
    import onnxprune.stages as stages
    from onnxprune.verify import latency_of_runs

    path, data, _, _ = mlp
    paired = stages.paired_latency
    monkeypatch.setattr(stages, "paired_latency", lambda *a, **k: pytest.fail("ran the models again"))
    eval_data = [{"x": b["x"] + 0.1} for b in data]  # 4 batches of 5: 3 timed after the first
    _, r = onnxprune.prune(path, method="activation", ratio=0.4, calib=data, eval_data=eval_data, batch_size=5)
    assert r.latency["before_s"] > 0 and r.latency["after_s"] > 0
    assert latency_of_runs([(1.0, 2.0), (3.0, 4.0), (5.0, 9.0)]) == (3.0, 4.0)
    assert latency_of_runs([(1.0, 2.0)]) is None  # one run: too few to time
    monkeypatch.setattr(stages, "paired_latency", paired)
    _, r = onnxprune.prune(path, method="activation", ratio=0.4, calib=data, eval_data=eval_data[:2], batch_size=5)
    assert r.latency["before_s"] > 0


def test_cuda_request_without_gpu_falls_back_with_a_warning(capsys, mlp):
    path, data, _, _ = mlp
    from onnxprune._ort import ort

    if "CUDAExecutionProvider" in ort().get_available_providers():
        pytest.skip("this machine has CUDA: the fallback cannot be observed")
    _, r = onnxprune.prune(path, method="wanda", ratio=0.2, calib=data, device="cuda")
    err = capsys.readouterr().err
    assert err.count("warning: CUDA requested") == 1
    assert r.params_after < r.params_before


def _fetched(monkeypatch):
    """Calibrate with every tensor fetched and reduced in numpy (the in-graph path off)."""
    monkeypatch.setattr(calibrate_module, "_reducible", lambda *a: False)


@pytest.mark.parametrize("spatial", [[8, 8], ["H", "W"]])
def test_conv_activations_are_reduced_inside_the_graph(tmp_path, monkeypatch, watched, spatial):
    """Channels-first float32 activations come back as [N, C] means, not whole tensors, and
    give the statistics numpy gives from the fetched tensors (static and run-time spatial
    sizes, two input sizes)."""
    path = _conv_chain(tmp_path, spatial)
    rng = np.random.default_rng(7)
    sizes = [(8, 8)] * 3 if spatial == [8, 8] else [(8, 8), (8, 8), (12, 10)]
    data = [{"x": (2.0 + rng.standard_normal((4, 3, *hw))).astype(np.float32)} for hw in sizes]
    wanted = ("sum", "sumsq", "sumabs")
    _, inside = _stats(path, data, raw=True, statistics=wanted)
    runs = list(watched["runs"])
    _fetched(monkeypatch)
    _, outside = _stats(path, data, raw=True, statistics=wanted)
    assert len(runs) == 3 and inside.runs_per_batch == 1
    # 3 tensors × 3 statistics × 8 channels × 4 samples of float32 (+ model output, + shapes).
    assert all(nbytes <= 3 * 3 * 8 * 4 * 4 + 4 * 4 * 4 + 3 * 4 * 8 for _, nbytes in runs)
    assert set(inside.tensors) == set(outside.tensors) and len(inside.tensors) == 3
    for name, st in outside.tensors.items():
        got = inside.tensors[name]
        assert got.n == st.n == sum(4 * (h - 0) * (w - 0) for h, w in sizes)
        for stat in wanted:
            np.testing.assert_allclose(getattr(got, stat), getattr(st, stat), rtol=5e-6, atol=1e-6, err_msg=stat)
        np.testing.assert_array_equal(got.dead, st.dead)


@pytest.mark.parametrize("whole", [False, True])
def test_in_graph_reduction_holds_up_with_a_large_mean(tmp_path, whole):
    """1e3 + noise over 300×300 planes: onnxruntime's float32 means, scaled back and added
    in float64, stay within a few 1e-6 of the float64 sums; so do its row sums, where an
    accumulator also fetches the tensor whole (``whole``)."""
    from onnxprune.calibrate import StatRequest
    from onnxprune.gram import ChannelGram

    g = G()
    x = g.input("x", ["N", 2, 300, 300])
    r = g.op("Relu", [x])
    y = g.op("GlobalAveragePool", [g.conv(r, 2, 2, name="c", k=1)])
    path = save(g.model([y]), tmp_path / "m.onnx")
    model, _ = load_model(path)
    value = next(n for n in model.graph if n.op_type == "Relu").outputs[0]
    data = (1e3 + np.random.default_rng(8).standard_normal((3, 2, 300, 300))).astype(np.float32)
    stats, _ = calibrate(
        model, {value.name: (value, 1)}, iter([{"x": data[:2]}, {"x": data[2:]}]), batch_size=2,
        providers=["CPUExecutionProvider"], memory_budget=2**30, progress=False, statistics=("sum", "sumsq"),
        requests=[StatRequest("g", value, lambda: ChannelGram(1, shards=1))] if whole else [],
    )
    assert ("g" in stats.extra) == whole
    want = _reference(np.maximum(data, 0), 1)
    st = stats.tensors[value.name]
    assert st.n == 3 * 300 * 300
    np.testing.assert_allclose(st.sum, want["sum"], rtol=5e-6)
    np.testing.assert_allclose(st.sumsq, want["sumsq"], rtol=5e-6)


def test_requests_and_counts_still_fetch_the_tensor(tmp_path, watched):
    """A method accumulator that needs the values, or count(x ≤ 0), keeps the tensor fetched."""
    from onnxprune.calibrate import StatRequest

    path = _conv_chain(tmp_path, [8, 8])
    data = [{"x": np.random.default_rng(9).standard_normal((4, 3, 8, 8)).astype(np.float32)}]
    _stats(path, data, raw=True, statistics=STATISTICS)
    assert watched["runs"][0][1] >= 3 * 8 * 8 * 8 * 4 * 4  # three whole activations of the batch

    class Shapes:
        def __init__(self):
            self.seen = []

        def update(self, x):
            self.seen.append(x.shape)

        def merge(self, other):
            return self

    model, _ = load_model(path)
    tensors = {v.tensor: (v.value, v.axis) for v in consumer_views(analyze_groups(model))}
    name, (value, _) = next(iter(tensors.items()))
    stats, _ = calibrate(
        model, tensors, iter(data), batch_size=4, providers=["CPUExecutionProvider"], memory_budget=2**30,
        progress=False, statistics=("sum", "sumsq"), requests=[StatRequest("k", value, Shapes)],
    )
    assert stats.extra["k"].seen == [(4, 8, 8, 8)]
    assert stats.tensors[name].n == 4 * 64 and all(st.n == 4 * 64 for st in stats.tensors.values())


def test_a_tensor_fetched_for_an_accumulator_is_still_reduced_inside_the_graph(tmp_path, monkeypatch):
    """A Gram (or the refit's record) fetches its tensor whole; the tensor's statistics still
    come from onnxruntime's in-graph means, not from numpy between runs, and equal what
    numpy reduces from the fetched tensor."""
    from onnxprune.calibrate import StatRequest, TensorStats
    from onnxprune.gram import ChannelGram

    path = _conv_chain(tmp_path, [8, 8])
    rng = np.random.default_rng(10)
    data = [{"x": (1.0 + rng.standard_normal((4, 3, 8, 8))).astype(np.float32)} for _ in range(2)]
    model, _ = load_model(path)
    tensors = {v.tensor: (v.value, v.axis) for v in consumer_views(analyze_groups(model))}
    name, (value, _) = next(iter(tensors.items()))

    def run():
        return calibrate(
            model, tensors, iter(data), batch_size=4, providers=["CPUExecutionProvider"], memory_budget=2**30,
            progress=False, statistics=("sum", "sumsq"),
            requests=[StatRequest("g", value, lambda: ChannelGram(1, shards=1))],
        )[0]

    reduced_here = []
    update = TensorStats.update
    monkeypatch.setattr(TensorStats, "update", lambda self, x, axis: (reduced_here.append(x.shape), update(self, x, axis)))
    inside = run()
    assert reduced_here == []  # every tensor of this chain is reduced by onnxruntime (by rows, the Gram's)
    assert inside.extra["g"].n.sum() == 2 * 4 * 64  # and the Gram still saw the whole tensor
    _fetched(monkeypatch)
    outside = run()
    assert len(reduced_here) == 2 * len(tensors)
    for stat in ("sum", "sumsq"):
        np.testing.assert_allclose(getattr(inside.tensors[name], stat), getattr(outside.tensors[name], stat), rtol=5e-6)
    np.testing.assert_array_equal(inside.extra["g"].gram, outside.extra["g"].gram)


def test_the_source_is_read_ahead_in_its_own_thread_and_closed_when_a_run_fails(mlp):
    """The source is read one batch ahead in a thread of its own (not the one that runs
    onnxruntime, where a batch's reading waited for the folds of the one before); a run
    that fails later leaves no reading thread behind and closes the source."""
    import threading

    path, data, _, _ = mlp
    readers, closed = set(), []

    def source():
        try:
            for i, b in enumerate(data):
                readers.add(threading.current_thread().name)
                yield b if i < 2 else {"x": b["x"][:, :3]}  # the third batch has the wrong width
        finally:
            closed.append(True)

    with pytest.raises(onnxprune.InputError, match="onnxruntime failed on the calibration data"):
        _stats(path, source(), raw=True)
    assert readers == {"onnxprune-read"}
    assert closed == [True]
    assert not [t for t in threading.enumerate() if t.name.startswith("onnxprune-")]
