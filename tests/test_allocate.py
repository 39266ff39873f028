"""Budget allocation by measured sensitivity: the probe graph emulates pruning with each
compensation, the allocation spends the budget where it hurts least, meets the target and
is deterministic; calibrate keeps the probe samples outside the held-out ones."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import onnxprune
from builders import G, save
from onnxprune._ort import session
from onnxprune.allocate import _replacement, _Site, _sites, _Tails, allocate
from onnxprune.calibrate import calibrate
from onnxprune.compensate import lstsq_requests
from onnxprune.consumers import consumer_views
from onnxprune.count import count_macs, estimate_after
from onnxprune.criteria import score_groups
from onnxprune.data import batches, input_specs, source_items
from onnxprune.groups import analyze_groups
from onnxprune.load import load_model

CPU = ["CPUExecutionProvider"]


def _mlp(tmp_path, quiet: float = 1.0):
    """x[N,6] → fc1 (12) → Relu → fc2 (10) → Relu → fc3 (3).  With ``quiet`` < 1, fc2's
    outgoing weights of its channels 0..4 are scaled down: those channels matter little."""
    g = G(seed=1)
    x = g.input("x", ["N", 6])
    h = g.op("Relu", [g.gemm(x, 6, 12, name="fc1")])
    h = g.op("Relu", [g.gemm(h, 12, 10, name="fc2")])
    w3 = g.w(3, 10)
    w3[:, :5] *= quiet
    y = g.op("Gemm", [h, g.const(w3), g.const(g.w(3))], name="fc3", transB=1)
    return save(g.model([y]), tmp_path / "mlp.onnx")


def _data(n=96, seed=0, dim=6):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((16, dim)).astype(np.float32)} for _ in range(n // 16)]


def _calibrated(path, data, lstsq=False, keep=32):
    model, _ = load_model(path)
    analysis = analyze_groups(model)
    views = consumer_views(analysis)
    specs = input_specs(session(str(path)))
    stats, _ = calibrate(
        model, {v.tensor: (v.value, v.axis) for v in views}, batches(source_items(data, specs)(), specs, 16),
        batch_size=16, providers=CPU, memory_budget=2**30, progress=False, keep=keep,
        requests=lstsq_requests(analysis) if lstsq else [], statistics=("sum", "sumsq"),
    )
    return analysis, views, stats


def _probe_outputs(analysis, views, stats, removed, compensate, tmp_path):
    """The probe's output for ``removed`` class roots on the first kept batch: the tail of
    every emulable consumer, run on the original's tensors at the cut."""
    sites = _sites(analysis, views, stats, compensate)
    tails = _Tails(analysis, stats.kept, CPU, 2**30, [sites])
    try:
        ys = tails.outputs(sites, analysis, compensate, removed)
    finally:
        tails.close()
    name = analysis.model.graph.outputs[0].name
    return np.concatenate([y[name] for y in ys])[: len(next(iter(stats.kept[0].values())))]


@pytest.mark.parametrize("compensate", ["none", "bias"])
def test_probe_graph_is_the_pruned_model(tmp_path, compensate):
    """For Gemm consumers the probe with a removal is exactly the model pruned that way
    with that compensation."""
    path = _mlp(tmp_path)
    data = _data()
    analysis, views, stats = _calibrated(path, data)
    fc2 = next(g for g in analysis.groups if g.producers[0].name == "fc2")
    removed = np.sort(fc2.classes[[1, 4, 7]])
    got = _probe_outputs(analysis, views, stats, removed, compensate, tmp_path)

    # The same removal through prune: an explicit selection by monkeypatching the scores.
    scores = {g.id: np.arange(len(g.classes), dtype=float) + 100 for g in analysis.groups}
    s = np.zeros(len(fc2.classes))
    s[[1, 4, 7]] = -1.0
    scores[fc2.id] = s
    import onnxprune.stages as stages

    real = stages.score_groups
    stages.score_groups = lambda analysis, *a, **k: {g.id: (scores[g.id] if g.producers[0].name == "fc2" else np.full(len(g.classes), 1e9)) for g in analysis.groups if g.prunable}
    try:
        out = tmp_path / "p.onnx"
        onnxprune.prune(path, out, method="wanda", calib=data, compensate=compensate, ratio=0.3, eval_samples=0,
                        latency=False, exclude=["fc1"])
    finally:
        stages.score_groups = real
    want = session(str(out)).run(None, stats.kept[0])[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_probe_lstsq_recovers_linearly_dependent_channels(tmp_path):
    """Channels that are linear combinations of kept ones (no Relu in between) cost
    nothing under the lstsq emulation, and everything under none."""
    g = G(seed=2)
    x = g.input("x", ["N", 4])
    w1 = g.w(8, 4)
    w1[4:] = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], np.float32) @ w1[:4] * 0.5 + w1[:4] * 0.5
    h = g.op("Gemm", [x, g.const(w1), g.const(g.w(8))], name="fc1", transB=1)
    y = g.gemm(h, 8, 3, name="fc2")
    path = save(g.model([y]), tmp_path / "lin.onnx")
    analysis, views, stats = _calibrated(path, _data(n=256, dim=4), lstsq=True)
    fc1 = next(gr for gr in analysis.groups if gr.producers[0].name == "fc1")
    removed = np.sort(fc1.classes[4:])
    ref = _probe_outputs(analysis, views, stats, np.zeros(0, np.int64), "lstsq", tmp_path)
    np.testing.assert_allclose(ref, session(str(path)).run(None, stats.kept[0])[0], rtol=1e-5, atol=1e-5)
    ls = _probe_outputs(analysis, views, stats, removed, "lstsq", tmp_path)
    none = _probe_outputs(analysis, views, stats, removed, "none", tmp_path)
    assert np.abs(ls - ref).max() < 5e-3 * np.abs(ref).max()
    assert np.abs(none - ref).max() > 0.2 * np.abs(ref).max()


def test_probe_model_leaves_the_analysed_model_as_it_was(tmp_path):
    path = _mlp(tmp_path)
    analysis, views, stats = _calibrated(path, _data())
    before = ir.serde.serialize_model(analysis.model).SerializeToString()
    _probe_outputs(analysis, views, stats, np.zeros(0, np.int64), "bias", tmp_path)
    assert ir.serde.serialize_model(analysis.model).SerializeToString() == before


def test_allocation_spends_the_budget_where_it_hurts_least(tmp_path):
    """fc2's channels 0..4 barely reach the output: the allocation takes them rather than
    fc1's, meets the MACs target, and gives the same answer twice."""
    path = _mlp(tmp_path, quiet=1e-3)
    analysis, _, stats = _calibrated(path, _data())
    scores = score_groups(analysis, "l1")
    fc1 = next(g for g in analysis.groups if g.producers[0].name == "fc1")
    fc2 = next(g for g in analysis.groups if g.producers[0].name == "fc2")
    scores[fc2.id] = np.r_[np.zeros(5), np.ones(5)] + np.arange(10) * 1e-3  # the order within: quiet ones first
    model = analysis.model
    base = count_macs(model)

    def kept(sel):
        flat = np.concatenate([*sel.values(), np.zeros(0, np.int64)]).astype(np.int64)
        return estimate_after(analysis, flat)[1] / base

    removed, report = allocate(analysis, scores, stats, kept, 0.85, compensate="bias", providers=CPU, round_to=1)
    again, _ = allocate(analysis, scores, stats, kept, 0.85, compensate="bias", providers=CPU, round_to=1)
    assert kept(removed) <= 0.85 and report["probes"] > 0 and not report["not_probed"]
    assert {k: v.tolist() for k, v in removed.items()} == {k: v.tolist() for k, v in again.items()}
    quiet = set(fc2.classes[:5].tolist())
    assert set(removed[fc2.id].tolist()) <= quiet and len(removed[fc2.id]) >= 3
    assert len(removed[fc1.id]) < len(removed[fc2.id])


def test_target_macs_with_data_allocates_by_sensitivity(tmp_path):
    path = _mlp(tmp_path, quiet=1e-3)
    out = tmp_path / "p.onnx"
    _, r = onnxprune.prune(path, out, method="wanda", calib=_data(), compensate="bias", target_macs=0.85, latency=False)
    assert "allocated by measured sensitivity" in r.selection and r.macs_after <= 0.85 * r.macs_before
    _, free = onnxprune.prune(path, None, target_macs=0.85, latency=False)  # no data: the global threshold
    assert "sensitivity" not in free.selection
    first = out.read_bytes()
    onnxprune.prune(path, out, method="wanda", calib=_data(), compensate="bias", target_macs=0.85, latency=False)
    assert out.read_bytes() == first


def test_calibrate_keeps_the_first_samples_it_calibrates_on(tmp_path):
    path = _mlp(tmp_path)
    model, _ = load_model(path)
    views = consumer_views(analyze_groups(model))
    data = _data(n=64)
    stats, held = calibrate(
        model, {v.tensor: (v.value, v.axis) for v in views}, iter(data), batch_size=16, providers=CPU,
        memory_budget=2**30, progress=False, hold_out=8, keep=20,
    )
    kept = np.concatenate([b["x"] for b in stats.kept])
    allx = np.concatenate([b["x"] for b in data])
    calibrated = allx[np.arange(64) % 5 != 4]  # every fifth sample (up to 8) is held out
    held_x = np.concatenate([b["x"] for b in held])
    assert kept.shape == (20, 6) and held_x.shape == (8, 6)
    np.testing.assert_array_equal(kept, calibrated[:20])
    assert not any((kept == h).all(axis=1).any() for h in held_x)


def test_probes_take_batches_of_different_lengths(tmp_path):
    """Token batches of different lengths (channels last, MatMul consumers) probe fine."""
    g = G(seed=6)
    x = g.input("x", ["N", "T", 4])
    h = g.op("Relu", [g.op("MatMul", [x, g.const(g.w(4, 16))], name="up")])
    y = g.op("MatMul", [h, g.const(g.w(16, 4))], name="down")
    path = save(g.model([y]), tmp_path / "tok.onnx")
    rng = np.random.default_rng(1)
    data = [{"x": rng.standard_normal((2, t, 4)).astype(np.float32)} for t in (5, 7, 3, 9, 5, 7)]
    _, r = onnxprune.prune(path, tmp_path / "p.onnx", method="wanda", calib=data, batch_size=2,
                           compensate="lstsq", target_macs=0.7, latency=False)
    assert "allocated by measured sensitivity" in r.selection and r.macs_after <= 0.7 * r.macs_before


def test_interpolation_follows_a_power_law_of_the_local_error_exactly():
    from onnxprune.allocate import _interpolated, _probed

    counts = list(range(2, 9))
    local = [float(c) ** 2 for c in counts]
    truth = [3.0 * v**1.5 for v in local]
    probed = _probed(len(counts))
    assert probed == [0, 3, 6]
    got = _interpolated(counts, local, {i: truth[i] for i in probed})
    np.testing.assert_allclose(got, truth, rtol=1e-12)


def test_interpolation_falls_back_to_channel_counts_without_a_local_error():
    from onnxprune.allocate import _interpolated

    got = _interpolated([1, 2, 3, 4, 5], [0.0] * 5, {0: 1.0, 2: 3.0, 4: 9.0})
    np.testing.assert_allclose(got, [1.0, 2.0, 3.0, 6.0, 9.0])


def test_interpolation_extrapolates_beyond_the_last_probed_rung_no_steeper_than_linearly():
    """Beyond the highest measured rung the curve goes on with the last piece's power, at
    most 1 (a single measured rung: linearly in the local error)."""
    from onnxprune.allocate import _interpolated

    local = [1.0, 2.0, 4.0, 8.0, 16.0]
    np.testing.assert_allclose(_interpolated([1, 2, 3, 4, 5], local, {0: 2.0}), [2.0, 4.0, 8.0, 16.0, 32.0])
    flat = _interpolated([1, 2, 3, 4, 5], local, {0: 1.0, 1: 1.5})  # power log2(1.5) < 1
    np.testing.assert_allclose(flat[2:], [1.5 * 2.0 ** np.log2(1.5) ** 1, 1.5 * 4.0 ** np.log2(1.5), 1.5 * 8.0 ** np.log2(1.5)])
    steep = _interpolated([1, 2, 3, 4, 5], local, {0: 1.0, 1: 4.0})  # power 2, capped at 1
    np.testing.assert_allclose(steep[2:], [8.0, 16.0, 32.0])
    falling = _interpolated([1, 2, 3, 4, 5], local, {0: 4.0, 1: 1.0})  # the emulation began predicting: linear
    np.testing.assert_allclose(falling[2:], [2.0, 4.0, 8.0])
    # no usable local error: proportional to the channel count
    np.testing.assert_allclose(_interpolated([1, 2, 3, 4], [0.0] * 4, {0: 1.0, 1: 3.0}), [1.0, 3.0, 4.5, 6.0])


def _probes(tmp_path, compensate: str = "lstsq", samples: int = 96, budget: int = 2**30):
    """The MLP calibrated on ``samples``, scored by l1, and its groups' probes (a kept-MACs
    share of the removed channels' count)."""
    from onnxprune.allocate import _Probes, _sites_by_group

    path = _mlp(tmp_path)
    analysis, views, stats = _calibrated(path, _data(n=samples), lstsq=compensate == "lstsq")
    scores = score_groups(analysis, "l1")
    groups = [g for g in analysis.groups if g.prunable]
    sites_of = _sites_by_group(analysis, groups, _sites(analysis, views, stats, compensate))
    measure = lambda sel: 1.0 - sum(len(v) for v in sel.values()) / 100  # noqa: E731
    probes = _Probes(analysis, groups, sites_of, scores, stats.kept, measure, compensate=compensate, providers=CPU,
                     min_keep=1, round_to=1, memory_budget=budget)
    return probes, analysis, sites_of, stats


def test_three_planned_rungs_interpolate_the_rest(tmp_path):
    """With the first, middle and last rung of every ladder run, the others' interpolated
    damages stay within a factor 2 of what a probe measures there (a 12-unit toy: one
    channel can double the damage; on real models see RESULTS, "Cost")."""
    from onnxprune.allocate import _probed

    probes, analysis, sites_of, stats = _probes(tmp_path)
    try:
        probes.run({gid: _probed(len(ladder)) for gid, ladder in probes.ladders.items() if ladder})
        rungs = probes.rungs()
    finally:
        probes.close()
    assert probes.runs == sum(min(3, len(ladder)) for ladder in probes.ladders.values())
    tails = _Tails(analysis, stats.kept, CPU, 2**30, [s for s in sites_of.values() if s])
    try:
        for gid, ladder in probes.ladders.items():
            damages = tails.damages_fn(sites_of[gid], analysis, "lstsq")
            for (sel, dmg, _), full in zip(rungs[gid][1:], ladder):
                truth = damages([full])[0]
                assert truth / 2 <= dmg <= truth * 2, (gid, len(sel), dmg, truth)
    finally:
        tails.close()


@pytest.mark.parametrize("target", [0.9, 0.8, 0.65])
def test_lazy_rounds_choose_as_every_planned_rung_does(tmp_path, monkeypatch, target):
    """Running only the first rung at first, and more where the allocation reaches past its
    measured rungs, gives the removal that running every planned rung gives, with no more
    rungs run, and every group's removal within its measured rungs."""
    from onnxprune import allocate as alloc

    path = _mlp(tmp_path)
    analysis, _, stats = _calibrated(path, _data(), lstsq=True)
    scores = score_groups(analysis, "l1")
    base = count_macs(analysis.model)

    def kept(sel):
        flat = np.concatenate([*sel.values(), np.zeros(0, np.int64)]).astype(np.int64)
        return estimate_after(analysis, flat)[1] / base

    seen = {}
    shipped = alloc._Probes.rungs

    def spy(self):
        seen["measured"] = {gid: dict(m) for gid, m in self.measured.items()}
        seen["ladders"] = self.ladders
        return shipped(self)

    monkeypatch.setattr(alloc._Probes, "rungs", spy)
    lazy, lazy_report = allocate(analysis, scores, stats, kept, target, compensate="lstsq", providers=CPU, round_to=1)
    for gid, removal in lazy.items():
        measured, ladder = seen["measured"][gid], seen["ladders"][gid]
        if ladder and len(measured) < len(alloc._probed(len(ladder))):  # more planned rungs left
            assert len(removal) <= len(ladder[max(measured)]), gid
    monkeypatch.setattr(alloc, "EAGER", 3)
    eager, eager_report = allocate(analysis, scores, stats, kept, target, compensate="lstsq", providers=CPU, round_to=1)
    assert {k: v.tolist() for k, v in lazy.items()} == {k: v.tolist() for k, v in eager.items()}
    assert lazy_report["probes"] <= eager_report["probes"]


def test_probe_feeds_hold_every_cut_and_the_outputs_from_one_run(tmp_path):
    """Every cut tensor and the original's outputs, per probe batch, from one run of the
    original: the values are the original's, in memory or spilled (budget 0) alike, and
    the spill folder is gone at close."""
    import onnxruntime as rt

    from onnxprune.allocate import ProbeFeeds

    path = _mlp(tmp_path)
    model, _ = load_model(path)
    data = _data(n=32)
    names = {n.name: n for n in model.graph}
    h1, h2 = names["fc1"].outputs[0].name, names["fc2"].outputs[0].name
    sess = rt.InferenceSession(str(path), providers=CPU)
    out = sess.get_outputs()[0].name
    for budget in (2**30, 0):
        feeds = ProbeFeeds(model, data, CPU, budget, [h2, h1])
        try:
            got = feeds.get([h1, h2])
            w1, b1 = (ir.tensor(names["fc1"].inputs[k].const_value).numpy() for k in (1, 2))
            for b, batch in enumerate(data):
                np.testing.assert_allclose(got[h1][b], batch["x"] @ np.asarray(w1).T + b1, rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(feeds.y0[b][out], sess.run(None, batch)[0], rtol=1e-6)
                assert feeds.y0[b][out].dtype == np.float64
            assert len(got[h2]) == len(data)
            assert feeds.scale == pytest.approx(sum(float((sess.run(None, b)[0].astype(np.float64) ** 2).sum()) for b in data))
            folder = feeds.passes.cache._folder
            assert (folder is not None) == (budget == 0)
        finally:
            feeds.close()
        assert folder is None or not folder.exists()


def _explicit_mix(path, tmp_path, consumer: str, p: np.ndarray, c: np.ndarray, channels_last: bool):
    """The model with ``x' = P·x + c`` inserted as constants before ``consumer``'s input 0:
    what the lstsq probe emulates, computed the obvious way."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(path))
    node = next(n for n in m.graph.node if n.name == consumer)
    x = node.input[0]
    if channels_last:
        mix = helper.make_node("MatMul", [x, "mix_p"], ["mix_px"])
        pt = p.T.astype(np.float32)
        cc = c.astype(np.float32)
    else:
        mix = helper.make_node("Conv", [x, "mix_p"], ["mix_px"])
        pt = p.astype(np.float32)[:, :, None, None]
        cc = c.astype(np.float32)[:, None, None]
    add = helper.make_node("Add", ["mix_px", "mix_c"], ["mix_out"])
    m.graph.initializer.extend([numpy_helper.from_array(pt, "mix_p"), numpy_helper.from_array(cc, "mix_c")])
    node.input[0] = "mix_out"
    at = list(m.graph.node).index(node)
    m.graph.node.insert(at, add)
    m.graph.node.insert(at, mix)
    out = tmp_path / f"mix_{consumer}.onnx"
    onnx.save(m, str(out))
    return out


@pytest.mark.parametrize("kind", ["conv3x3", "gemm", "matmul"])
def test_lstsq_probe_equals_the_explicit_channel_mix(tmp_path, kind):
    """The probe feeds the consumer ``W·P̃`` and ``m ⊙ x + c`` instead of mixing channels
    before it: the outputs equal ``W·(P·x + c)`` computed with the mix in the graph."""
    g = G(seed=3)
    if kind == "conv3x3":
        x = g.input("x", ["N", 3, 6, 6])
        h = g.op("Relu", [g.conv(x, 3, 8, name="c1")])
        y = g.conv(h, 8, 4, name="c2")
        data = [{"x": np.random.default_rng(i).standard_normal((16, 3, 6, 6)).astype(np.float32)} for i in range(8)]
    else:
        x = g.input("x", ["N", 5])
        h = g.op("Relu", [g.gemm(x, 5, 8, name="c1")])
        if kind == "gemm":
            y = g.gemm(h, 8, 4, trans_b=0, name="c2")
        else:
            y = g.op("Add", [g.op("MatMul", [h, g.const(g.w(8, 4))], name="c2"), g.const(g.w(4))])
        data = [{"x": np.random.default_rng(i).standard_normal((16, 5)).astype(np.float32)} for i in range(8)]
    path = save(g.model([y]), tmp_path / f"{kind}.onnx")
    analysis, views, stats = _calibrated(path, data, lstsq=True)
    group = next(gr for gr in analysis.groups if gr.producers[0].name == "c1")
    removed = np.sort(group.classes[[1, 2, 6]])
    got = _probe_outputs(analysis, views, stats, removed, "lstsq", tmp_path)

    site = next(s for s in _sites(analysis, views, stats, "lstsq") if s.view.node.name == "c2")
    assert site.mixes
    gone = np.zeros(len(analysis.roots), dtype=bool)
    gone[removed] = True
    drop = gone[analysis.roots[site.view.atoms]]
    p, c = _replacement(site, drop, "lstsq")
    assert np.abs(p[np.ix_(drop, ~drop)]).max() > 0  # removed channels are predicted from kept ones
    want = session(str(_explicit_mix(path, tmp_path, "c2", p, c, kind != "conv3x3"))).run(None, stats.kept[0])[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_without_compensation_every_planned_rung_runs_at_once(tmp_path):
    """``none``'s damages saturate (RESULTS "The allocation's probes, A against B"): its
    first round is every planned rung; with compensation, each ladder's first."""
    from onnxprune.allocate import _probed

    for compensate, eager in (("none", 3), ("bias", 1)):
        probes, *_ = _probes(tmp_path, compensate)
        try:
            first = probes.first()
            assert first and all(idx == _probed(len(probes.ladders[gid]))[:eager] for gid, idx in first.items())
        finally:
            probes.close()


def test_a_ladder_whose_emulation_starts_predicting_runs_its_planned_rungs_at_once(tmp_path):
    """On 32 rows, fc3's lstsq emulation of fc2's group gives the mean while 9 of its 10
    inputs stay (4 rows a feature are needed) and predicts from 5: the first rung's damage
    says nothing of the middle's, so the first round runs both (the last, predicting too,
    waits as usual).  On 96 rows every rung predicts, and the first round is the first rung."""
    from onnxprune.allocate import _probed

    for samples, switching in ((32, True), (96, False)):
        probes, analysis, *_ = _probes(tmp_path, "lstsq", samples=samples)
        try:
            fc2 = next(g.id for g in analysis.groups if g.prunable and g.producers[0].name == "fc2")
            planned = _probed(len(probes.ladders[fc2]))
            assert (len({probes.modes[fc2][i] for i in planned}) == 2) is switching
            assert probes.first()[fc2] == (planned[:2] if switching else planned[:1])
        finally:
            probes.close()


@pytest.mark.parametrize("ahead", [True, False])
def test_each_tail_session_is_built_in_a_thread_while_the_group_before_runs(tmp_path, monkeypatch, ahead):
    """The probes build a group's tail session in a thread of their own while the group
    before runs its rungs, where it and the tail running fit an eighth of the budget, and
    in place otherwise: the damages are those of tails built in place, and no building
    thread is left once the rounds are done."""
    import threading

    from onnxprune import _ort, segments
    from onnxprune.allocate import _probed

    monkeypatch.setattr(segments, "SHARED_MIN_BYTES", 0)  # the toy's weights count as the budget sees them

    built_in = []
    real = _ort.session

    def record(model, providers=None, initializers=None):
        if isinstance(model, bytes):
            built_in.append(threading.current_thread().name)
        return real(model, providers, initializers)

    monkeypatch.setattr(_ort, "session", record)
    probes, analysis, sites_of, stats = _probes(tmp_path, budget=2**30 if ahead else 64)
    wanted = {gid: _probed(len(ladder)) for gid, ladder in probes.ladders.items() if ladder}
    try:
        probes.run(wanted)
        assert not [t for t in threading.enumerate() if t.name.startswith("onnxprune-tail")]
        measured = {gid: dict(m) for gid, m in probes.measured.items()}
    finally:
        probes.close()
    tails_built = [n for n in built_in if n.startswith("onnxprune-tail")]
    assert len(tails_built) == (len(wanted) if ahead else 0) and len(wanted) >= 2
    tails = _Tails(analysis, stats.kept, CPU, 2**30, [s for s in sites_of.values() if s])
    try:
        for gid, idx in wanted.items():
            in_place = tails.damages_fn(sites_of[gid], analysis, "lstsq")([probes.ladders[gid][i] for i in idx])
            assert in_place == [measured[gid][i] for i in idx]
    finally:
        tails.close()
