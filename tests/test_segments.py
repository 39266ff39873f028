"""The segment pass: a graph run piece by piece over cached tensors gives what whole-graph
runs give, runs every node once, keeps its cache within the budget, and leaves no spill
file behind; the least-squares refit on it writes the weights a whole-graph reference
computation writes (residual, concat, attention with two inputs, a subgraph)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import onnxprune.reconstruct as rc
from builders import G, save
from onnxprune._ort import ort
from onnxprune.groups import analyze_groups
from onnxprune.load import load_model
from onnxprune.rewrite import apply_removal, refresh_shapes
from onnxprune.segments import BatchStore, SegmentPass, TensorCache, node_reads
from test_attention import attention

CPU = ["CPUExecutionProvider"]


def residual_concat() -> onnx.ModelProto:
    """conv → relu → conv, added to the stem (residual), concatenated with a side conv,
    then two more convs: several refit waves, a stream and a concat."""
    g = G(seed=1)
    x = g.input("x", ["N", 3, 8, 8])
    stem = g.op("Relu", [g.conv(x, 3, 8, name="stem")])
    a = g.op("Relu", [g.conv(stem, 8, 8, name="a")])
    b = g.conv(a, 8, 8, name="b")
    s = g.op("Relu", [g.op("Add", [b, stem], name="res")])
    side = g.op("Relu", [g.conv(stem, 8, 4, k=1, name="side")])
    cat = g.op("Concat", [s, side], axis=1, name="cat")
    c = g.op("Relu", [g.conv(cat, 12, 8, name="c")])
    return g.model([g.conv(c, 8, 4, k=1, name="head")])


def inverted_residual() -> onnx.ModelProto:
    """An inverted-residual block (1×1 expansion to six times the width, depthwise 3×3,
    1×1 projection added to its input), then a head: EfficientNet's and MobileNet's block."""
    g = G(seed=3)
    x = g.input("x", ["N", 3, 8, 8])
    stem = g.op("Relu", [g.conv(x, 3, 4, name="stem")])
    wide = g.op("Relu", [g.conv(stem, 4, 24, k=1, name="expand")])
    dw = g.op("Relu", [g.conv(wide, 24, 24, group=24, name="dw")], name="dw_relu")
    out = g.op("Add", [g.conv(dw, 24, 4, k=1, name="project"), stem], name="res")
    return g.model([g.conv(out, 4, 2, k=1, name="head")])


def with_if() -> onnx.ModelProto:
    """A Conv whose output an ``If`` branch reads from the enclosing graph."""
    g = G(seed=2)
    x = g.input("x", ["N", 2, 6, 6])
    h = g.op("Relu", [g.conv(x, 2, 6, name="p")])
    flag = g.input("flag", [], dtype=TensorProto.BOOL)
    then_out = helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)
    else_out = helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)
    then = helper.make_graph([helper.make_node("Relu", [h], ["t_out"])], "then", [], [then_out])
    other = helper.make_graph([helper.make_node("Neg", [h], ["e_out"])], "else", [], [else_out])
    y = g.op("If", [flag], name="branch", then_branch=then, else_branch=other)
    return g.model([g.conv(y, 6, 3, name="q")])


def _batches(proto: onnx.ModelProto, n: int = 3, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        feed = {}
        for inp in proto.graph.input:
            dims = [d.dim_value or (5 if i == 0 else 4) for i, d in enumerate(inp.type.tensor_type.shape.dim)]
            if inp.type.tensor_type.elem_type == TensorProto.BOOL:
                feed[inp.name] = np.array(k % 2 == 0)
            elif inp.name == "mask":
                feed[inp.name] = (rng.random(dims) < 0.8).astype(np.float32)
            else:
                feed[inp.name] = rng.standard_normal(dims).astype(np.float32)
        out.append(feed)
    return out


def exposed_session(model: ir.Model, names: list[str]):
    """The whole graph with ``names`` as its outputs (the reference: no segments)."""
    graph = model.graph
    values = {v.name: v for v in graph.inputs} | {o.name: o for n in graph for o in n.outputs}
    saved = list(graph.outputs)
    graph.outputs.clear()
    graph.outputs.extend(values[n] for n in dict.fromkeys(names))
    try:
        data = ir.to_proto(model).SerializeToString()
    finally:
        graph.outputs.clear()
        graph.outputs.extend(saved)
    return ort().InferenceSession(data, providers=CPU)


MODELS = {"residual_concat": residual_concat, "attention": lambda: attention("runtime"), "if": with_if,
          "inverted_residual": inverted_residual}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_segments_give_the_whole_graph_values_and_run_each_node_once(tmp_path, name):
    proto = MODELS[name]()
    model, _ = load_model(save(proto, tmp_path / "m.onnx"))
    batches = _batches(proto)
    produced = [o.name for n in model.graph for o in n.outputs if o.name]
    reference = exposed_session(model, produced)
    with SegmentPass(model, batches, providers=CPU, budget=1 << 30) as sp:
        # Stop every few tensors, as the refit's waves do; ask for old ones again too.
        steps = [produced[i : i + 3] for i in range(0, len(produced), 3)]
        for k, names in enumerate(steps):
            later = [n for s in steps[k + 1 :] for n in s]
            got = sp.advance(names, later)
            for b, batch in enumerate(batches):
                want = reference.run(names, batch)
                for n, w in zip(names, want):
                    np.testing.assert_allclose(got[n][b], w, rtol=1e-5, atol=1e-5)
        ran = len(sp.done)
        assert sp.nodes_run == ran <= len(list(model.graph))  # no node ran twice
        assert sp.segments <= len(steps)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_stream_hands_over_the_whole_graph_values_batch_by_batch_without_caching_them(tmp_path, name):
    """``stream`` gives what ``advance`` gives, per batch and in order, and caches only what
    a node still to run or ``later`` reads; with ``rest=False`` nothing but ``later``."""
    proto = MODELS[name]()
    model, _ = load_model(save(proto, tmp_path / "m.onnx"))
    batches = _batches(proto)
    produced = [o.name for n in model.graph for o in n.outputs if o.name]
    reference = exposed_session(model, produced)
    steps = [produced[i : i + 3] for i in range(0, len(produced), 3)]
    with SegmentPass(model, batches, providers=CPU, budget=1 << 30) as sp:
        for k, names in enumerate(steps):
            later = [n for s in steps[k + 1 :] for n in s]
            seen = 0
            for b, got in enumerate(sp.stream(names, later)):
                assert sorted(got) == sorted(set(names))
                for n, w in zip(names, reference.run(names, batches[b])):
                    np.testing.assert_allclose(got[n], w, rtol=1e-5, atol=1e-5)
                seen += 1
            assert seen == len(batches)
            live = sp._live(set(later))
            assert set(sp.cache.arrays) <= live | {v.name for v in model.graph.inputs}
        assert sp.nodes_run == len(sp.done)
    last = produced[len(produced) // 2]
    with SegmentPass(model, batches, providers=CPU, budget=1 << 30) as sp:
        for _ in sp.stream([last], rest=False):
            pass
        assert set(sp.cache.arrays) <= {v.name for v in model.graph.inputs}  # nothing computed is kept


def test_stream_holds_one_batch_of_its_tensors_at_a_time(tmp_path, monkeypatch):
    """A batch's handed-over tensors are gone before the next batch runs (the refit's
    rows pass fetches the widest tensors of the graph: two batches of them at once was the
    peak with 2,048 images)."""
    import weakref

    import onnxprune.segments as seg

    proto = residual_concat()
    model, _ = load_model(save(proto, tmp_path / "m.onnx"))
    batches = _batches(proto, n=4)
    name = next(n for n in model.graph if n.name == "c").outputs[0].name
    refs: list = []
    real = seg.session_from_view

    class Checked:
        def __init__(self, sess):
            self.sess = sess

        def run(self, names, feed):
            assert all(r() is None for r in refs), "the previous batch is still held"
            return self.sess.run(names, feed)

    monkeypatch.setattr(seg, "session_from_view", lambda *a, **k: Checked(real(*a, **k)))
    with SegmentPass(model, batches, providers=CPU, budget=1 << 30) as sp:
        for got in sp.stream([name], rest=False):
            refs.append(weakref.ref(got[name]))
            got = None
    assert len(refs) == len(batches)


def test_large_constants_reach_onnxruntime_as_arrays_not_in_the_message(tmp_path, monkeypatch):
    """A segment's large constants go to onnxruntime beside the message (external-data stubs
    filled from the arrays): the message holds none of their bytes, nothing is written to
    disk, and the values are the whole graph's."""
    import tempfile

    import onnxprune.segments as seg

    proto = residual_concat()
    model, _ = load_model(save(proto, tmp_path / "m.onnx"))
    batches = _batches(proto)
    out = model.graph.outputs[0].name
    want = [exposed_session(model, [out]).run([out], b)[0] for b in batches]
    monkeypatch.setattr(seg, "SHARED_MIN_BYTES", 1)
    g = model.graph
    shared: dict = {}
    message = seg._view_proto(model, list(g.inputs), list(g.outputs), list(g), shared)
    assert shared and not any(t.raw_data for t in message.graph.initializer if t.name in shared)
    assert {t.name for t in message.graph.initializer} >= set(shared)
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    with SegmentPass(model, batches, providers=CPU, budget=1 << 30) as sp:
        got = sp.advance([out])[out]
        assert sp.segments == 1
    for g_, w in zip(got, want):
        np.testing.assert_allclose(g_, w, rtol=1e-6, atol=1e-6)
    assert list(temp.iterdir()) == []


def test_the_cache_drops_what_nothing_later_reads(tmp_path):
    model, _ = load_model(save(residual_concat(), tmp_path / "m.onnx"))
    with SegmentPass(model, _batches(residual_concat()), providers=CPU, budget=1 << 30) as sp:
        names = {n.name: n for n in model.graph}
        sp.advance([names["c"].outputs[0].name])
        live = set(sp.cache.arrays)
        # After c ran, only c's output (for the Relu and head still pending) is live: the
        # stem, the residual stream and the concat are gone.
        assert live == {names["c"].outputs[0].name}, live


def test_cache_spills_past_the_budget_and_removes_its_files(tmp_path, monkeypatch):
    def reference_stem(batch):
        return exposed_session(model, [stem]).run([stem], batch)[0]

    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    model, _ = load_model(save(residual_concat(), tmp_path / "m.onnx"))
    batches = _batches(residual_concat())
    budget = 4000  # bytes: one [5, 8, 8, 8] float32 tensor is 10,240
    with SegmentPass(model, batches, providers=CPU, budget=budget) as sp:
        stem = next(n for n in model.graph if n.name == "stem").outputs[0].name
        got = sp.advance([stem], ["head_out"])
        assert sp.cache.spilled > 0 and sp.cache.peak <= budget
        assert any(not isinstance(a, np.ndarray) for a in list.__iter__(got[stem]))  # on disk
        np.testing.assert_array_equal(got[stem][0], reference_stem(batches[0]))
        assert list((tmp_path / "tmp").iterdir())  # the spill folder exists while it runs
        sp.advance(["head_out"])
    assert not list((tmp_path / "tmp").iterdir())  # and is gone after the pass

    with pytest.raises(RuntimeError):
        with SegmentPass(model, batches, providers=CPU, budget=0) as sp:
            sp.advance([stem])
            raise RuntimeError("boom")
    assert not list((tmp_path / "tmp").iterdir())  # also after an exception


def test_spill_files_do_not_outlive_a_process_that_exits_without_closing(tmp_path):
    """A cache that spilled and was never closed is removed when the interpreter exits."""
    code = textwrap.dedent(
        """
        import sys, numpy as np
        from onnxprune.segments import TensorCache
        c = TensorCache(0)
        c.put("x", 0, np.ones(1000, np.float32))
        print(c._folder, flush=True)
        sys.exit(0)
        """
    )
    env = dict(os.environ, TMPDIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    folder = Path(out.stdout.strip())
    assert folder.parent == tmp_path and not folder.exists()


def test_batch_store_replays_what_it_was_given_within_its_budget():
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((4, 100)).astype(np.float32)} for _ in range(5)]
    with BatchStore(budget=3 * 1600) as store:
        for b in batches:
            store.append(b)
        assert len(store) == 5 and store.samples == 20
        assert store.cache.peak <= 3 * 1600 and store.cache.spilled == 2 * 1600
        for a, b in zip(store, batches):
            np.testing.assert_array_equal(a["x"], b["x"])


def test_a_pass_over_a_spilled_store_holds_one_input_batch_at_a_time(tmp_path):
    """The pass reads graph inputs from the store when it needs them: holding every batch
    it was given would bring a spilled store back into memory, outside any budget."""
    import tracemalloc

    g = G(seed=3)
    x = g.input("x", ["N", 64, 32, 32])
    model, _ = load_model(save(g.model([g.op("ReduceMean", [g.op("Relu", [x])], keepdims=0, axes=[2, 3])]),
                               tmp_path / "m.onnx"))
    rng = np.random.default_rng(0)
    with BatchStore(budget=0) as store:  # everything on disk
        for _ in range(24):
            store.append({"x": rng.standard_normal((4, 64, 32, 32)).astype(np.float32)})  # 1 MiB each
        expected = [b["x"].clip(0).mean(axis=(2, 3)) for b in store]
        out = model.graph.outputs[0].name
        tracemalloc.start()
        try:
            with SegmentPass(model, store, providers=CPU, budget=1 << 30) as sp:
                got = sp.advance([out])
                _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 6 * 2**20, peak  # a few batches, not the store's 24 MiB
        for a, b in zip(got[out], expected):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_frontier_that_fits_the_budget_never_spills(tmp_path):
    """Each segment frees its spent inputs batch by batch as its outputs arrive: a chain
    whose frontier fills two thirds of the budget runs without writing a file (holding the
    old frontier until the new one was complete would spill every other segment)."""
    g = G(seed=4)
    x = g.input("x", ["N", 8, 16, 16])
    a = g.op("Relu", [x], name="a")
    b = g.op("Neg", [a], name="b")
    c = g.op("Abs", [b], name="c")
    model, _ = load_model(save(g.model([g.op("Sigmoid", [c], name="d")]), tmp_path / "m.onnx"))
    batches = [{"x": np.random.default_rng(k).standard_normal((4, 8, 16, 16)).astype(np.float32)} for k in range(6)]
    frontier = 6 * 4 * 8 * 16 * 16 * 4  # one tensor, every batch
    names = [n.outputs[0].name for n in model.graph]
    with SegmentPass(model, batches, providers=CPU, budget=frontier * 3 // 2) as sp:
        for k, name in enumerate(names):
            got = sp.advance([name], names[k + 1 :])
            assert sp.cache.spilled == 0 and sp.cache.in_memory <= frontier, (name, sp.cache.spilled)
        np.testing.assert_allclose(got[names[-1]][5], 1 / (1 + np.exp(-np.abs(batches[5]["x"].clip(0)))), rtol=1e-6)


def _held(sp: SegmentPass) -> list[np.ndarray]:
    return [a for name in sp.cache.arrays if name not in sp.cache.shared
            for a in list.__iter__(sp.cache.get(name)) if isinstance(a, np.ndarray)]


@pytest.mark.parametrize("shared_arena", [True, False])
def test_the_cache_owns_the_bytes_it_counts(tmp_path, monkeypatch, shared_arena):
    """onnxruntime's outputs are views of its memory.  In the process's shared arena one
    pins its own chunk only, so the cache keeps it as it is (a copy would fault fresh pages
    in every batch); in a session's own arena one would keep that whole arena
    (intermediates included) alive after the segment ran, so the cache copies it."""
    import onnxprune._ort as _ort

    model, _ = load_model(save(residual_concat(), tmp_path / "m.onnx"))
    if not shared_arena:
        monkeypatch.setitem(_ort._arena, "cpu", False)  # as where onnxruntime cannot register one
    elif not _ort._shared_arena(_ort.ort()):
        pytest.skip("this onnxruntime has no shared arena")
    with SegmentPass(model, _batches(residual_concat()), providers=CPU, budget=1 << 30) as sp:
        stem = next(n for n in model.graph if n.name == "stem").outputs[0].name
        sp.advance([stem], ["head_out"])
        held = _held(sp)
        assert held and sp.cache.in_memory == sum(a.nbytes for a in held)
        if shared_arena:
            assert all(a.base is not None and not isinstance(a.base, np.ndarray) for a in held)  # not copied
        else:
            assert all(a.base is None for a in held)


def test_the_cache_copies_a_view_only_where_it_pins_more(tmp_path):
    """A batch that is all of the array it views is kept as it is; a part of a larger one
    is copied, so the bytes counted are the bytes held."""
    whole = np.arange(24, dtype=np.float32).reshape(4, 6)
    cache = TensorCache(1 << 20)
    cache.put("a", 0, whole[:])
    cache.put("b", 0, whole[:2])
    assert np.shares_memory(cache.get("a")[0], whole)
    assert not np.shares_memory(cache.get("b")[0], whole) and cache.get("b")[0].base is None
    assert cache.in_memory == whole.nbytes + whole[:2].nbytes
    cache.close()


def test_subgraph_reads_are_segment_inputs(tmp_path):
    model, _ = load_model(save(with_if(), tmp_path / "m.onnx"))
    branch = next(n for n in model.graph if n.op_type == "If")
    conv = next(n for n in model.graph if n.name == "p")
    relu = next(iter(conv.outputs[0].uses())).node
    assert relu.outputs[0] in node_reads(branch)


# --- the refit on segments against a whole-graph reference ---------------------------------


def _reference_refit(targets, original: ir.Model, pruned: ir.Model, batches) -> None:
    """The refit as computed before segments: every wave runs both whole graphs from the
    inputs, with the wave's tensors exposed."""
    for wave in rc._waves(pruned.graph, targets):
        skips = [t.skip for t in wave if t.skip]
        names_o = [t.source for t in wave] + skips
        names_p = [t.node.inputs[0].name for t in wave] + skips
        so, sp = exposed_session(original, names_o), exposed_session(pruned, names_p)
        extractors = {id(t): t.extractor() for t in wave}
        for b, batch in enumerate(batches):
            xo = dict(zip(names_o, _run(so, names_o, batch)))
            xp = dict(zip(names_p, _run(sp, names_p, batch)))
            for t in wave:
                stream = (xo[t.skip], xp[t.skip]) if t.skip else None
                t.update(extractors[id(t)], xo[t.source], xp[t.node.inputs[0].name], b, stream)
        for t in wave:
            if t.rows_seen:
                rc._write(t, *t.solve(), pruned.graph)
            t.sums = []


def _run(sess, names, batch):
    unique = list(dict.fromkeys(names))
    got = dict(zip(unique, sess.run(unique, batch)))
    return [got[n] for n in names]


def _pruned(path: Path, share: float = 0.5):
    model, _ = load_model(path)
    analysis = analyze_groups(model, ())
    removed = np.concatenate([g.classes[: int(len(g.classes) * share)] for g in analysis.groups if g.prunable]).astype(np.int64)
    targets = rc.refit_targets(analysis, removed)
    apply_removal(analysis, removed)
    refresh_shapes(model)
    return model, targets


def _weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: v.const_value.numpy() for name, v in model.graph.initializers.items() if v.const_value is not None}


@pytest.mark.parametrize("name", ["residual_concat", "attention", "inverted_residual"])
def test_refit_on_segments_writes_the_reference_weights(tmp_path, name):
    proto = MODELS[name]()
    path = save(proto, tmp_path / "m.onnx")
    batches = _batches(proto, n=4)
    model_a, targets_a = _pruned(path)
    assert targets_a, "the test needs consumers to refit"
    original, _ = load_model(path)
    rc.refit_on_pruned(targets_a, original, model_a, batches, providers=CPU, memory_budget=1 << 30)
    model_b, targets_b = _pruned(path)
    _reference_refit(targets_b, original, model_b, batches)
    assert [t.mode for t in targets_a] == [t.mode for t in targets_b]
    wa, wb = _weights(model_a), _weights(model_b)
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(wa[k], wb[k], rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(wb[k]).max())), err_msg=k)


def test_refit_on_segments_is_the_same_when_everything_spills(tmp_path):
    proto = residual_concat()
    path = save(proto, tmp_path / "m.onnx")
    batches = _batches(proto, n=4)
    original, _ = load_model(path)
    model_a, targets_a = _pruned(path)
    rc.refit_on_pruned(targets_a, original, model_a, batches, providers=CPU, memory_budget=1 << 30)
    model_b, targets_b = _pruned(path)
    rc.refit_on_pruned(targets_b, original, model_b, batches, providers=CPU, memory_budget=0)
    for k, w in _weights(model_a).items():
        np.testing.assert_array_equal(w, _weights(model_b)[k])


def test_the_refit_rows_spill_and_leave_nothing_behind(tmp_path, monkeypatch):
    """With no budget the original's rows spill too (``onnxprune-rows-``), and every spill
    folder is gone once the refit returns, also when it fails half-way."""
    import tempfile

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    proto = residual_concat()
    path = save(proto, tmp_path / "m.onnx")
    batches = _batches(proto, n=4)
    original, _ = load_model(path)
    model, targets = _pruned(path)
    made = []
    real = TensorCache._spill

    def spy(self, array):
        made.append(self.prefix)
        return real(self, array)

    monkeypatch.setattr(TensorCache, "_spill", spy)
    rc.refit_on_pruned(targets, original, model, batches, providers=CPU, memory_budget=0)
    assert "onnxprune-rows-" in made and "onnxprune-cache-" in made
    assert list(temp.iterdir()) == []

    def boom(done, total):
        assert list(temp.iterdir())  # the spill folders exist while the refit runs
        raise RuntimeError("stop")

    model, targets = _pruned(path)
    with pytest.raises(RuntimeError):
        rc.refit_on_pruned(targets, original, model, batches, providers=CPU, memory_budget=0, progress=boom)
    assert list(temp.iterdir()) == []



def _recorded_store(path: Path, batches, budget: int) -> BatchStore:
    """The batches as calibration keeps them, with the original's refit rows it recorded."""
    from onnxprune.calibrate import calibrate
    from onnxprune.consumers import consumer_views

    model, _ = load_model(path)
    analysis = analyze_groups(model, ())
    store = BatchStore(1 << 30)
    store.rows = rc.RowsRecord(budget)
    views = consumer_views(analysis)
    calibrate(model, {v.tensor: (v.value, v.axis) for v in views}, iter(batches), batch_size=5, providers=CPU,
              memory_budget=1 << 30, progress=False, requests=store.rows.requests(analysis), record=store)
    return store


@pytest.mark.parametrize("name", ["residual_concat", "attention"])
@pytest.mark.parametrize("budget", [1 << 30, 0])
def test_rows_recorded_by_calibration_refit_as_a_pass_of_the_original_does(tmp_path, monkeypatch, name, budget):
    """The refit on the rows calibration recorded (``W x`` where narrower than the inputs,
    the stream's rows apart) writes the weights and chooses the fits of the refit that runs
    the original itself, and runs no original pass; the spilled rows go with the store."""
    import tempfile

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    proto = MODELS[name]()
    path = save(proto, tmp_path / "m.onnx")
    batches = _batches(proto, n=4)
    original, _ = load_model(path)
    model_a, targets_a = _pruned(path)
    rc.refit_on_pruned(targets_a, original, model_a, batches, providers=CPU, memory_budget=1 << 30)
    store = _recorded_store(path, batches, budget)
    record = store.rows
    entries = record.consumers.values()
    if name == "residual_concat":  # 3×3 Convs: W x is narrower than the patches; one output joins a stream
        assert any(not e.inputs for e in entries) and any(e.stream for e in entries)
    else:  # the projections read fewer features than they give out
        assert any(e.inputs for e in entries)

    def no_pass(*a, **k):
        raise AssertionError("the refit ran the original although calibration recorded its rows")

    monkeypatch.setattr(rc.OriginalRows, "__init__", no_pass)
    model_b, targets_b = _pruned(path)
    rc.refit_on_pruned(targets_b, original, model_b, store, providers=CPU, memory_budget=1 << 30)
    assert [t.mode for t in targets_a] == [t.mode for t in targets_b]
    assert [t.skip for t in targets_a] == [t.skip for t in targets_b]
    wa, wb = _weights(model_a), _weights(model_b)
    for k in wa:
        np.testing.assert_allclose(wb[k], wa[k], rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(wa[k]).max())), err_msg=k)
    assert (record.cache.spilled > 0) == (budget == 0)
    store.close()
    assert list(temp.iterdir()) == []



def test_the_recorded_rows_hold_no_onnxruntime_output(tmp_path, monkeypatch):
    """Rows that are all of a tensor (a few tokens, a Gemm's samples) would be views of
    onnxruntime's output, and one output alive holds its session's whole arena: none that
    views onnxruntime's memory outlives calibration (a graph input fetched back is a copy
    numpy owns, and may)."""
    import gc
    import weakref

    from onnxprune import calibrate as cal

    refs = []
    real = cal._run

    def spy(sess, names, feed):
        outs = real(sess, names, feed)
        refs.extend(weakref.ref(o) for o in outs)
        return outs

    monkeypatch.setattr(cal, "_run", spy)
    proto = MODELS["attention"]()
    store = _recorded_store(save(proto, tmp_path / "m.onnx"), _batches(proto, n=3), 1 << 30)
    gc.collect()
    assert refs and [r for r in refs if r() is not None and r().base is not None] == []
    assert store.rows.cache.in_memory > 0
    store.close()


def clip_bounds_from_nodes() -> onnx.ModelProto:
    """conv → Clip → conv → Clip → conv, both Clips' bounds from a ``Constant`` node and a
    ``Cast`` of one."""
    g = G(seed=4)
    x = g.input("x", ["N", 3, 6, 6])
    h = g.conv(x, 3, 6, name="c1")
    g.nodes.append(helper.make_node("Constant", [], ["lo"], value=onnx.numpy_helper.from_array(np.array(0.0, np.float32)), name="lo_node"))
    g.nodes.append(helper.make_node("Constant", [], ["hi64"], value=onnx.numpy_helper.from_array(np.array(0.5)), name="hi_node"))
    g.nodes.append(helper.make_node("Cast", ["hi64"], ["hi"], to=TensorProto.FLOAT, name="hi_cast"))
    h = g.conv(g.op("Clip", [h, "lo", "hi"], name="clip1"), 6, 6, name="c2")
    return g.model([g.conv(g.op("Clip", [h, "lo", "hi"], name="clip2"), 6, 2, name="c3")])


def test_values_that_follow_from_constants_are_computed_inside_each_segment(tmp_path):
    """A Clip's bounds made by Constant/Cast nodes are not segment inputs (fed at run time
    they stop onnxruntime's fusions): every segment that reads them computes them, and
    the cache never holds them."""
    from onnxprune.segments import const_cone

    proto = clip_bounds_from_nodes()
    model, _ = load_model(save(proto, tmp_path / "m.onnx"))
    cone = {n.name for n in model.graph if id(n) in const_cone(model.graph)}
    assert cone and {n.op_type for n in model.graph if n.name in cone} <= {"Constant", "Cast"}  # the load folds the Cast
    batches = _batches(proto)
    c2 = next(n for n in model.graph if n.name == "c2").outputs[0].name
    y = model.graph.outputs[0].name
    reference = exposed_session(model, [c2, y])
    constants = {o.name for n in model.graph if n.name in cone for o in n.outputs}
    with SegmentPass(model, batches, providers=CPU, budget=1 << 30) as sp:
        sp.advance([c2], [y])  # the first segment runs the Clip that reads the bounds too
        assert not constants & set(sp.cache.arrays)
        got = sp.advance([y])
    for b, batch in enumerate(batches):
        np.testing.assert_allclose(got[y][b], reference.run([y], batch)[0], rtol=1e-6, atol=1e-6)
