"""One source for each piece of shared logic (issue 16, item 2): temporary graph changes are
undone whatever happens, the Split/Slice chunk rule is one guard, statistics are found by
the consumer they belong to (not by a position in a list), a run's method state lives
with the run's statistics, never on the registered method objects, and one function
removes dead nodes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import onnxprune
from builders import G, calibrated, save
from onnxprune.calibrate import GramKey, InputRef, MethodKey
from onnxprune.chunks import ChunkGuard
from onnxprune._ort import session
from onnxprune.compensate import lstsq_requests, write_consumer
from onnxprune.groups import Group
from onnxprune.load import load_model
from onnxprune.methods import REGISTRY, MethodOptions
from onnxprune.temporary import temporary_changes


def _chain(tmp_path):
    """Two 3×3 Convs of different widths and a Gemm: two consumers of prunable groups."""
    g = G(seed=5)
    x = g.input("x", ["N", 3, 6, 6])
    a = g.op("Relu", [g.conv(x, 3, 6, name="c1")])
    b = g.op("Relu", [g.conv(a, 6, 5, name="c2")])
    y = g.gemm(g.op("Flatten", [g.op("GlobalAveragePool", [b])]), 5, 3, name="fc")
    rng = np.random.default_rng(0)
    data = [{"x": rng.standard_normal((4, 3, 6, 6)).astype(np.float32)} for _ in range(8)]
    return save(g.model([y]), tmp_path / "chain.onnx"), data


def _bytes(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString()


def test_temporary_changes_are_undone_in_reverse_also_on_an_error(tmp_path):
    path, _ = _chain(tmp_path)
    model, _ = load_model(path)
    graph = model.graph
    before = _bytes(model)
    conv = next(n for n in graph if n.name == "c2")
    relu = conv.inputs[0].producer()
    fed = ir.Value(name="fed", shape=conv.inputs[0].shape, type=conv.inputs[0].type)
    with pytest.raises(RuntimeError, match="in the block"):
        with temporary_changes(graph) as changes:
            extra = ir.node("Neg", [relu.outputs[0]])
            extra.outputs[0].name = "negated"
            changes.add_nodes([extra])
            changes.add_outputs([extra.outputs[0]])
            changes.swap_input(conv, 0, extra.outputs[0])
            changes.swap_input(conv, 0, fed)  # the same input twice: undone last first
            assert conv.inputs[0] is fed and graph.outputs[-1].name == "negated"
            raise RuntimeError("in the block")
    assert conv.inputs[0] is relu.outputs[0]
    assert [o.name for o in graph.outputs] == [o.name for o in model.graph.outputs] and "negated" not in {
        o.name for o in graph.outputs}
    assert _bytes(model) == before


def test_chunk_guard_keeps_one_class_of_every_chunk_across_groups():
    # Chunk {1, 2} lies in group 0, chunk {3, 4} spans groups 0 and 1 (a Concat then a Slice).
    g0 = Group(0, [], [], np.array([1, 2, 3]), 3, keep_any=[np.array([1, 2]), np.array([3, 4])])
    g1 = Group(1, [], [], np.array([4, 5]), 2, keep_any=[np.array([3, 4])])
    guard = ChunkGuard([g0, g1])
    assert guard.left == [2, 2]  # the shared chunk is counted once
    assert not guard.last_of_chunk(1)
    guard.remove(1)
    assert guard.last_of_chunk(2) and not guard.last_of_chunk(5)
    guard.remove(4)  # group 1 takes one of the shared chunk ...
    assert guard.last_of_chunk(3)  # ... so group 0 must keep the other
    assert guard.left == [1, 1]


@pytest.mark.parametrize("seed", range(20))
def test_choose_skips_the_class_checks_only_where_no_chunk_can_empty(seed, monkeypatch):
    """The shortcut (the lowest scores go, when every chunk a group touches lies within it
    and keeps a class) chooses what the class-by-class rule does: chunks within one group,
    spanning two, covering a whole group (attention heads), and none."""
    from onnxprune.select import choose

    rng = np.random.default_rng(seed)
    c0, c1, c2 = np.arange(0, 8), np.arange(8, 14), np.arange(14, 20)
    g0 = Group(0, [], [], c0, 8, keep_any=[c0[:3], np.concatenate([c0[6:], c1[:2]])])
    g1 = Group(1, [], [], c1, 6, keep_any=[np.concatenate([c0[6:], c1[:2]])])
    g2 = Group(2, [], [], c2, 6, keep_any=[c2] if seed % 2 else [])
    groups = [g0, g1, g2]
    scores = {g.id: rng.standard_normal(len(g.classes)) for g in groups}
    want = {g.id: int(rng.integers(0, len(g.classes))) for g in groups}
    got = choose(groups, scores, want, min_keep=1, round_to=1)
    with monkeypatch.context() as m:
        m.setattr(ChunkGuard, "free", lambda *a: False)  # every class checked against the chunks
        ref = choose(groups, scores, want, min_keep=1, round_to=1)
    assert {k: v.tolist() for k, v in got.items()} == {k: v.tolist() for k, v in ref.items()}
    guard = ChunkGuard(groups)
    assert guard.free(c2, c2[:5]) and not guard.free(c0, c0[:2])  # a chunk g0 shares with g1
    assert not ChunkGuard([g2]).free(c2, c2) if seed % 2 else ChunkGuard([g2]).free(c2, c2)


def test_statistics_are_found_by_their_consumer_whatever_the_view_order(tmp_path):
    path, data = _chain(tmp_path)
    analysis, views, stats = calibrated(path, data, "obs")
    keys = [r.key for r in lstsq_requests(analysis)]
    assert keys == [GramKey(InputRef(v.node.outputs[0].name)) for v in views] == list(stats.extra)
    assert len(set(keys)) == 2  # c2 and fc: c1 reads the graph input
    obs, opts = REGISTRY["obs"], MethodOptions()
    forward = obs.scores(analysis, stats, views, opts)
    assert obs.scores(analysis, stats, views[::-1], opts) == forward  # exact: the same sums
    # Keys of different kinds never meet, even on one consumer.
    assert GramKey(InputRef("a")) != MethodKey("mipp", InputRef("a")) != MethodKey("relative", InputRef("a"))


def test_methods_keep_no_state_between_runs(tmp_path):
    path, data = _chain(tmp_path)
    before = {name: dict(vars(method)) for name, method in REGISTRY.items()}  # configuration (l1's p), no state
    _, r = onnxprune.prune(path, method="mipp", calib=data, batch_size=4, latency=False,
                           method_options=MethodOptions(confidence=99.9))
    assert r.method_report["mipp"]["chosen_by"] == "confidence"
    _, r = onnxprune.prune(path, method="mipp", calib=data, batch_size=4, ratio=0.3, latency=False)
    assert r.method_report is None  # the ratio run made no selection of its own to report
    _, r = onnxprune.prune(path, method="relief", calib=data, batch_size=4, latency=False,
                           method_options=MethodOptions(alpha_conv=0.9))
    assert r.method_report["connections_total"] > 0
    for name, method in REGISTRY.items():
        assert vars(method) == before[name], name
    assert before["mipp"] == before["relief"] == {}


def test_one_writer_puts_a_matmul_bias_in_a_new_or_in_this_rounds_add(tmp_path):
    g = G(seed=2)
    x = g.input("x", ["N", 4])
    y = g.op("MatMul", [x, g.const(g.w(4, 3))], name="mm")
    model, _ = load_model(save(g.model([y]), tmp_path / "mm.onnx"))
    node = next(n for n in model.graph if n.op_type == "MatMul")
    rng = np.random.default_rng(1)
    w1, w2 = rng.standard_normal((2, 4, 3)).astype(np.float32)
    b1, b2, b3 = rng.standard_normal((3, 3))
    write_consumer(node, w1, b1, model.graph, fresh_add=True)  # the first refit: a new Add
    write_consumer(node, w2, b2, model.graph, fresh_add=False)  # the reconstruct pass: the same Add
    assert [n.op_type for n in model.graph] == ["MatMul", "Add"]
    write_consumer(node, w2, b3, model.graph, fresh_add=True)  # a later round: the earlier Add stays
    assert [n.op_type for n in model.graph] == ["MatMul", "Add", "Add"]
    feed = {"x": rng.standard_normal((5, 4)).astype(np.float32)}
    (out,) = session(ir.to_proto(model).SerializeToString()).run(None, feed)
    assert out.dtype == np.float32 and [o.name for o in model.graph.outputs] == [y]
    np.testing.assert_allclose(out, feed["x"] @ w2 + b3.astype(np.float32) + b2.astype(np.float32), rtol=1e-5, atol=1e-6)


def test_steps_on_matmuls_give_each_rounds_bias_add_its_own_names(tmp_path):
    # Round 2 reloads round 1's file, whose MatMuls already carry a compensation Add.
    g = G(seed=7)
    x = g.input("x", ["N", 16])
    h = g.op("Relu", [g.op("MatMul", [x, g.const(g.w(16, 24))], name="mm1")])
    h = g.op("Relu", [g.op("MatMul", [h, g.const(g.w(24, 20))], name="mm2")])
    path = save(g.model([g.op("MatMul", [h, g.const(g.w(20, 5))], name="mm3")]), tmp_path / "mlp.onnx")
    rng = np.random.default_rng(0)
    data = [{"x": rng.standard_normal((32, 16)).astype(np.float32)} for _ in range(8)]
    out = tmp_path / "out.onnx"
    _, r = onnxprune.prune(path, out, calib=data, target_macs=0.5, steps=2, latency=False)
    assert r.steps == 2
    model, _ = load_model(out)
    names = [n.name for n in model.graph]
    assert len(set(names)) == len(names)
    # mm3 loses inputs in both rounds: one Add each (the reconstruct pass rewrote the Add of
    # its round's first refit, not an earlier round's); mm2 only in the first.
    assert [n for n in names if "bias_add" in n] == ["mm2_bias_add", "mm3_bias_add_1", "mm3_bias_add"]


def test_one_dead_node_remover_takes_only_what_the_dropped_values_alone_read():
    """``_graph.remove_dead`` (the folds, the canonicalisations and the rewrite all call it)
    removes the dropped values' producers and what only they read, and nothing else: a
    value still read, graph inputs and outputs, and dead nodes the model had stay."""
    from onnxprune._graph import remove_dead

    f32 = ir.TensorType(ir.DataType.FLOAT)
    x = ir.Value(name="x", shape=ir.Shape([2, 3]), type=f32)

    def init(name):
        return ir.Value(name=name, shape=ir.Shape([3]), type=f32, const_value=ir.tensor(np.ones(3, np.float32), name=name))

    k, b, o = init("k"), init("b"), init("o")
    add = ir.node("Add", [x, k], name="add")
    neg = ir.node("Neg", [add.outputs[0]], name="neg")  # dropped: neg, add and k go
    sub = ir.node("Sub", [x, b], name="sub")  # dropped, but b is read by kept too
    kept = ir.node("Add", [x, b], name="kept")
    mul = ir.node("Mul", [x, o], name="mul")  # dropped; o is a graph output
    had = ir.node("Relu", [x], name="had")  # dead before: not ours to remove
    graph = ir.Graph([x], [kept.outputs[0], o], nodes=[add, neg, sub, kept, mul, had],
                     initializers=[k, b, o], opset_imports={"": 18})

    assert remove_dead(graph, [neg.outputs[0], sub.outputs[0], mul.outputs[0], None]) == 5
    assert [n.name for n in graph] == ["kept", "had"]
    assert sorted(graph.initializers) == ["b", "o"]
    assert remove_dead(graph, [kept.outputs[0], x, o]) == 0  # outputs and inputs stay
