"""Control flow (issue 15, item 3): graphs with ``If``/``Loop``/``Scan`` prune everything
outside the subgraphs.  Channels that enter a body (an explicit input or an outer-scope
capture, at any depth) block their group with the reason; the bodies are written as they
were; the pruned model runs the real branch on real calibration samples and is checked
against the original on held-out frames.  A model whose weights all sit inside control flow
is refused in one line."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxprune
from builders import G, run, save
from onnxprune.cli import main
from test_bad_input import expect_refusal
from topology import analysis_of, group_of

FRAME, HOP = 512, 256
REASON = "is read inside the subgraph of {op} '{name}': onnxprune does not rewrite subgraphs"


def _branch(g: G, name: str, x: str, scale: float) -> onnx.GraphProto:
    """One If branch: the fixed-frame Conv (8 → 16, kernel 512, stride 256) on the outer
    ``x``, its weights inside the branch, scaled differently per branch."""
    w = helper.make_tensor(f"{name}_w", TensorProto.FLOAT, [16, 8, FRAME], g.w(16, 8, FRAME, scale=0.05).ravel())
    nodes = [
        helper.make_node("Constant", [], [f"{name}_wc"], value=w, name=f"{name}_const"),
        helper.make_node("Conv", [x, f"{name}_wc"], [f"{name}_c"], name=f"{name}_frame",
                         kernel_shape=[FRAME], strides=[HOP]),
        helper.make_node("Constant", [], [f"{name}_s"], name=f"{name}_scale",
                         value=helper.make_tensor(f"{name}_sv", TensorProto.FLOAT, [], [scale])),
        helper.make_node("Mul", [f"{name}_c", f"{name}_s"], [f"{name}_y"], name=f"{name}_mul"),
    ]
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)])


def vad_model() -> onnx.ModelProto:
    """A Silero-like VAD: x [batch, sequence], a scalar int64 sample rate.
    ``pre`` (1 → 8, k=1) feeds an ``If`` on sr == 16000 whose branches hold the fixed-frame
    Convs (a capture: ``pre`` must block); after the If, ``enc1`` and ``enc2`` (16 → 16, k=3)
    are outside control flow and prune; ``head`` (16 → 1) gives the speech logit."""
    g = G(seed=3)
    x = g.input("x", ["batch", "sequence"])
    sr = g.input("sr", [], TensorProto.INT64)
    u = g.op("Unsqueeze", [x, g.const(np.array([1], np.int64))], name="frame_axis")
    pre = g.op("Relu", [g.op("Conv", [u, g.const(g.w(8, 1, 1)), g.const(g.w(8))], name="pre", kernel_shape=[1])],
               name="pre_act")
    cond = g.op("Equal", [sr, g.const(np.array(16000, np.int64))], name="is16k")
    feats = g.op("If", [cond], name="sr_switch", then_branch=_branch(g, "b16k", pre, 1.0),
                 else_branch=_branch(g, "b8k", pre, 0.5))
    h = g.op("Relu", [feats])
    h = _conv1d(g, h, 16, 16, "enc1")
    h = _conv1d(g, h, 16, 16, "enc2")
    head = g.op("Conv", [h, g.const(g.w(1, 16, 1)), g.const(g.w(1))], name="head", kernel_shape=[1])
    return g.model([g.op("ReduceMean", [head], name="logit", axes=[2], keepdims=0)])  # speech logit [batch, 1]


def _conv1d(g: G, x: str, cin: int, cout: int, name: str) -> str:
    c = g.op("Conv", [x, g.const(g.w(cout, cin, 3, scale=0.3)), g.const(g.w(cout, scale=0.1))], name=name,
             kernel_shape=[3], pads=[1, 1])
    return g.op("Relu", [c])


def frames(n: int, seed: int, sequence: int = 1024) -> list[dict[str, np.ndarray]]:
    """Speech-like (harmonics under a slow envelope), noise and near-silence, one sample a frame."""
    rng = np.random.default_rng(seed)
    t = np.arange(sequence) / 16000
    out = []
    for i in range(n):
        if i % 3 == 0:
            f0 = rng.uniform(90, 250)
            s = sum(rng.uniform(0.2, 1) / k * np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6.3)) for k in range(1, 12))
            s = s * (0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(2, 8) * t))
        elif i % 3 == 1:
            s = rng.uniform(0.05, 0.5) * rng.standard_normal(sequence)
        else:
            s = 1e-3 * rng.standard_normal(sequence)
        out.append({"x": s[None].astype(np.float32), "sr": np.array(16000, np.int64)})
    return out


def npz_folder(folder: Path, samples: list[dict[str, np.ndarray]]) -> Path:
    folder.mkdir()
    for i, s in enumerate(samples):
        np.savez(folder / f"f{i:03d}.npz", **s)
    return folder


def body_bytes(path: Path) -> list[bytes]:
    """Every subgraph's nodes and initializers, serialised (inferred value_info may differ)."""
    out = []
    for node in onnx.load(str(path)).graph.node:
        for a in node.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                out += [x.SerializeToString() for x in list(g.node) + list(g.initializer)]
    return out


def conv_out(path: Path, name: str) -> int:
    m = onnx.load(str(path))
    node = next(n for n in m.graph.node if n.name == name)
    return {t.name: t for t in m.graph.initializer}[node.input[1]].dims[0]


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ----------------------------------------------------------------------------- analysis


def test_vad_groups_and_reasons(tmp_path):
    a = analysis_of(tmp_path, vad_model())
    pre = group_of(a, "pre")
    assert not pre.prunable
    assert pre.blocked == ["'pre_act_out' " + REASON.format(op="If", name="sr_switch")]
    assert group_of(a, "enc1").prunable and group_of(a, "enc2").prunable
    assert {p.name for g in a.groups for p in g.producers} == {"pre", "enc1", "enc2", "head"}  # branch Convs: no producers


def test_analyze_shows_the_reason(tmp_path):
    src = save(vad_model(), tmp_path / "vad.onnx")
    report = onnxprune.analyze(src)
    reasons = [r for g in report.groups for r in g.blocked]
    assert "'pre_act_out' " + REASON.format(op="If", name="sr_switch") in reasons
    # MACs are counted on the main graph only, and the report says what it left out.
    assert report.macs_excluded == "2 Conv nodes are inside the subgraphs of If 'sr_switch'"


def test_capture_in_a_nested_body_names_the_outer_node(tmp_path):
    """A value read two levels down (If inside If) blocks as a read of the main-graph If."""
    g = G()
    x = g.input("x", [1, 3, 6, 6])
    c1, c2 = g.input("flag1", [], TensorProto.BOOL), g.input("flag2", [], TensorProto.BOOL)
    a = g.op("Relu", [g.conv(x, 3, 6, name="conv_a")])
    leaf = lambda n: helper.make_graph([helper.make_node("Neg", [a], [f"{n}_y"], name=n)], n, [],  # noqa: E731
                                       [helper.make_tensor_value_info(f"{n}_y", TensorProto.FLOAT, None)])
    inner = helper.make_node("If", [c2], ["inner_y"], name="inner", then_branch=leaf("t2"), else_branch=leaf("e2"))
    then = helper.make_graph([inner], "t1", [], [helper.make_tensor_value_info("inner_y", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", [x], ["e1_y"], name="e1")], "e1", [],
                              [helper.make_tensor_value_info("e1_y", TensorProto.FLOAT, None)])
    y = g.op("If", [c1], name="outer", then_branch=then, else_branch=other)
    grp = group_of(analysis_of(tmp_path, g.model([y])), "conv_a")
    assert grp.blocked == [f"'{a}' " + REASON.format(op="If", name="outer")]


def loop_model() -> onnx.ModelProto:
    """``feed`` (Conv 3 → 6) is a Loop's carried value and ``side`` (3 → 4) is captured by the
    body; ``free`` (3 → 8) → ``tail`` is outside control flow and prunes."""
    g = G(seed=1)
    x = g.input("x", [1, 3, 8, 8])
    feed = g.op("Relu", [g.conv(x, 3, 6, name="feed")])
    side = g.op("Relu", [g.conv(x, 3, 4, name="side")])
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
         helper.make_node("ReduceMean", [side], ["side_m"], name="side_mean", axes=[1], keepdims=1),
         helper.make_node("Add", ["v_in", "side_m"], ["v_out"], name="acc")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1, 6, 8, 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1, 6, 8, 8])],
    )
    trip = g.const(np.array(3, np.int64))
    cond = g.const(np.array(True))
    looped = g.op("Loop", [trip, cond, feed], name="repeat", body=body)
    free = g.op("Relu", [g.conv(x, 3, 8, name="free")])
    tail = g.conv(free, 8, 6, name="tail")
    return _model(g, g.op("Add", [looped, tail], name="join"), [1, 6, 8, 8])


def _model(g: G, output: str, shape: list[int]) -> onnx.ModelProto:
    """``G.model`` for a graph whose Loop output onnx's inference leaves without a shape:
    the output's shape is declared (the checker refuses a graph output without one)."""
    graph = helper.make_graph(g.nodes, "test", g.inputs, [helper.make_tensor_value_info(output, TensorProto.FLOAT, shape)],
                              g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", g.opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def scan_model() -> onnx.ModelProto:
    """A Scan runs over the time axis of ``rnn_in`` (Conv 3 → 5, [1, 5, T] transposed to
    [T, 1, 5]); ``free`` (3 → 8) → ``tail`` is outside and prunes."""
    g = G(seed=2)
    x = g.input("x", [1, 3, 8])
    r = g.op("Conv", [x, g.const(g.w(5, 3, 1)), g.const(g.w(5))], name="rnn_in", kernel_shape=[1])
    seq = g.op("Transpose", [r], perm=[2, 0, 1])
    body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "x_t"], ["s_out"], name="step"),
         helper.make_node("Identity", ["s_out"], ["y_t"], name="emit")],
        "scan_body",
        [helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [1, 5]),
         helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [1, 5])],
        [helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [1, 5]),
         helper.make_tensor_value_info("y_t", TensorProto.FLOAT, [1, 5])],
    )
    init = g.const(np.zeros((1, 5), np.float32))
    last, _ = g.op("Scan", [init, seq], n_out=2, name="cumsum", body=body, num_scan_inputs=1)
    free = g.op("Relu", [g.op("Conv", [x, g.const(g.w(8, 3, 1)), g.const(g.w(8))], name="free", kernel_shape=[1])])
    tail = g.op("Conv", [free, g.const(g.w(5, 8, 1)), g.const(g.w(5))], name="tail", kernel_shape=[1])
    pooled = g.op("ReduceMean", [tail], axes=[2], keepdims=0)
    return g.model([g.op("Add", [last, pooled], name="join")])


def test_loop_inputs_and_captures_block(tmp_path):
    a = analysis_of(tmp_path, loop_model())
    feed = group_of(a, "feed")
    assert not feed.prunable and any(REASON.format(op="Loop", name="repeat") in r for r in feed.blocked), feed.blocked
    side = group_of(a, "side")
    assert not side.prunable and any(REASON.format(op="Loop", name="repeat") in r for r in side.blocked), side.blocked
    assert group_of(a, "free").prunable


def test_scan_input_blocks(tmp_path):
    a = analysis_of(tmp_path, scan_model())
    grp = group_of(a, "rnn_in")
    assert not grp.prunable and any(REASON.format(op="Scan", name="cumsum") in r for r in grp.blocked), grp.blocked
    assert group_of(a, "free").prunable


# ----------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("build, shape", [(loop_model, (1, 3, 8, 8)), (scan_model, (1, 3, 8))])
def test_loop_and_scan_models_prune_outside(tmp_path, build, shape):
    src = save(build(), tmp_path / "m.onnx")
    feed = {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    out0, out = tmp_path / "r0.onnx", tmp_path / "r5.onnx"
    assert main([str(src), str(out0), "--ratio", "0", "-q"]) == 0
    assert np.array_equal(run(out0, feed)[0], run(src, feed)[0])
    assert main([str(src), str(out), "--ratio", "0.5", "--round-to", "1", "-q"]) == 0
    assert conv_out(out, "free") == 4 and body_bytes(out) == body_bytes(src)
    assert run(out, feed)[0].shape == run(src, feed)[0].shape


def test_vad_at_ratio_zero_is_exact(tmp_path):
    src = save(vad_model(), tmp_path / "vad.onnx")
    out = tmp_path / "o.onnx"
    calib = npz_folder(tmp_path / "calib", frames(12, seed=0))
    assert main([str(src), str(out), "--calib", str(calib), "--ratio", "0", "-q"]) == 0
    for s in frames(6, seed=9) + [{**frames(1, seed=8)[0], "sr": np.array(8000, np.int64)}]:
        assert np.array_equal(run(out, s)[0], run(src, s)[0])


def test_vad_prunes_outside_the_if_with_its_data(tmp_path):
    """With real frames the reference run, the checks and the statistics take the real
    (16 kHz) branch; the pruned encoder stays close to the original on held-out frames, the
    branch bodies are byte-identical, and the 8 kHz branch still runs."""
    src = save(vad_model(), tmp_path / "vad.onnx")
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    calib = npz_folder(tmp_path / "calib", frames(96, seed=0))
    code = main([str(src), str(out), "--calib", str(calib), "--ratio", "0.25", "--round-to", "1",
                 "--report", str(report), "-q"])
    assert code == 0
    assert conv_out(out, "enc1") == 12 and conv_out(out, "enc2") == 12 and conv_out(out, "pre") == 8
    assert body_bytes(out) == body_bytes(src)
    r = json.loads(report.read_text())
    assert any(REASON.format(op="If", name="sr_switch") in b for g in r["groups"] for b in g["blocked"])
    assert r["macs"]["not_counted"] == "2 Conv nodes are inside the subgraphs of If 'sr_switch'"
    t = (1024 - FRAME) // HOP + 1  # time steps after the branch's Conv, on the calibration frames
    assert r["macs"]["before"] == 8 * 1024 + t * (2 * 16 * 16 * 3 + 16)  # pre, enc1, enc2, head; not the branch
    held = frames(30, seed=7)
    pruned = np.concatenate([run(out, s)[0] for s in held])
    original = np.concatenate([run(src, s)[0] for s in held])
    assert not np.array_equal(pruned, original)
    assert rel_error(pruned, original) < 0.06  # a quarter of the encoder gone, unseen frames: about twice the error measured
    other = {**held[0], "sr": np.array(8000, np.int64)}
    assert run(out, other)[0].shape == run(src, other)[0].shape


def test_vad_without_data_is_refused_with_a_suggestion(capsys, tmp_path):
    """The branch's 512-sample Conv cannot run on a guessed feed: refused, never verified on
    a feed that would not reach the real branch."""
    src = save(vad_model(), tmp_path / "vad.onnx")
    line = expect_refusal(capsys, tmp_path, [str(src), str(tmp_path / "o.onnx"), "-q"], [src], "cannot run the input model")
    assert "--calib" in line


def test_weights_only_inside_control_flow_is_one_line(capsys, tmp_path):
    """Silero VAD's layout: every Conv inside the If's branches.  Refused before any run
    (no data needed to learn that), exit 2, nothing written."""
    g = G(seed=4)
    x = g.input("x", ["batch", "sequence"])
    sr = g.input("sr", [], TensorProto.INT64)
    u = g.op("Unsqueeze", [x, g.const(np.array([1], np.int64))])
    cond = g.op("Equal", [sr, g.const(np.array(16000, np.int64))])
    y = g.op("If", [cond], name="If_0", then_branch=_branch1(g, "t", u), else_branch=_branch1(g, "e", u))
    src = save(g.model([y]), tmp_path / "vad_all_inside.onnx")
    expect_refusal(capsys, tmp_path, [str(src), str(tmp_path / "o.onnx")], [src],
                   "nothing outside control flow is prunable: 2 Conv nodes are inside the subgraphs of If 'If_0'")


def _branch1(g: G, name: str, u: str) -> onnx.GraphProto:
    w = helper.make_tensor(f"{name}_w", TensorProto.FLOAT, [4, 1, FRAME], g.w(4, 1, FRAME).ravel())
    nodes = [helper.make_node("Constant", [], [f"{name}_wc"], value=w),
             helper.make_node("Conv", [u, f"{name}_wc"], [f"{name}_y"], name=f"{name}_conv", kernel_shape=[FRAME], strides=[HOP])]
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)])


# ----------------------------------------------------------------------------- the real Silero VAD


@pytest.fixture(scope="module")
def silero(tmp_path_factory) -> Path:
    """The silero-vad wheel's data folder (pip download); skip when it cannot be had."""
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("silero")
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "silero-vad", "--no-deps", "-q", "-d", str(folder)],
                              capture_output=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.skip("the silero-vad wheel cannot be downloaded here (timeout)")
    wheels = list(folder.glob("silero_vad-*.whl"))
    if proc.returncode or not wheels:
        pytest.skip("the silero-vad wheel cannot be downloaded here")
    with zipfile.ZipFile(wheels[0]) as z:
        for name in ("silero_vad.onnx", "silero_vad_16k_op15.onnx"):
            z.extract(f"silero_vad/data/{name}", folder)
    return folder / "silero_vad" / "data"


def streamed_frames(model: Path, seed: int, n: int) -> list[dict[str, np.ndarray]]:
    """Samples as Silero's wrapper feeds it (64 samples of context + 512 new, the state the
    original carried to that frame, sr), over the speech-like/noise/silence audio of frames()."""
    from onnxprune._ort import session

    audio = np.concatenate([np.zeros(64, np.float32)] + [f["x"][0] for f in frames((n * 512) // 1024 + 1, seed)])
    sess, state, out = session(str(model)), np.zeros((2, 1, 128), np.float32), []
    for i in range(n):
        s = {"input": audio[None, i * 512:(i + 1) * 512 + 64], "state": state, "sr": np.array(16000, np.int64)}
        out.append(s)
        state = sess.run(None, s)[1]
    return out


def test_real_silero_vad_16k_prunes_outside_its_ifs(tmp_path, silero):
    """The wheel's 16 kHz export keeps the encoder in the main graph and the LSTM decoder in
    Ifs: the STFT and the first three encoder Convs prune with streamed frames (the state on
    axis 1), the last encoder Conv (read inside If '/model/decoder/If') is blocked, and the
    output is checked against the original on held-out frames."""
    src = silero / "silero_vad_16k_op15.onnx"
    calib = npz_folder(tmp_path / "calib", streamed_frames(src, 0, 96))
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    assert main([str(src), str(out), "--calib", str(calib), "--ratio", "0.1", "--report", str(report), "-q"]) == 0
    r = json.loads(report.read_text())
    blocked = [b for g in r["groups"] for b in g["blocked"]]
    assert "'/model/encoder/3/activation/Relu_output_0' " + REASON.format(op="If", name="/model/decoder/If") in blocked
    assert sum(g["kept"] < g["channels"] for g in r["groups"] if g.get("kept") is not None) >= 1
    assert r["params"]["after"] < r["params"]["before"]
    held = streamed_frames(src, 1, 48)
    pruned = np.concatenate([run(out, s)[0] for s in held])
    original = np.concatenate([run(src, s)[0] for s in held])
    diff = np.abs(pruned - original)
    agree = np.mean((pruned > 0.5) == (original > 0.5))
    assert diff.mean() < 0.1 and agree >= 0.9, (diff.mean(), diff.max(), agree)  # 96 frames of synthetic audio: a loose fit


def test_real_silero_vad_says_nothing_outside_control_flow(capsys, tmp_path, silero):
    src = silero / "silero_vad.onnx"
    expect_refusal(capsys, tmp_path, [str(src), str(tmp_path / "o.onnx")], [src],
                   "nothing outside control flow is prunable: 12 Conv nodes are inside the subgraphs of If 'If_0'")


# ----------------------------------------------------------------------------- a recurrent state [2, batch, H]


def test_batch_axes_rule():
    from onnxprune.data import batch_axes

    assert batch_axes([[None, None], [2, None, 128], []]) == [0, 1, 0]  # silero_vad.onnx as onnxruntime reports it
    assert batch_axes([["batch", "sequence"], [2, "batch", 128], []]) == [0, 1, 0]
    assert batch_axes([[1, 3, None, None]]) == [0]  # a fixed batch of 1 with free H, W: no batch elsewhere
    assert batch_axes([[None, 16], [2, None, None]]) == [0, 0]  # ambiguous: two free dims, axis 0 kept


def stateful_model() -> onnx.ModelProto:
    """x [batch, 512] → Conv encoder (8 → 8 → 4 channels) → mean over time, plus the mean of a
    recurrent state [2, batch, 4] (batch on axis 1, as Silero's), and the state passed on."""
    g = G(seed=5)
    x = g.input("x", ["batch", FRAME])
    state = g.input("state", [2, "batch", 4])
    u = g.op("Unsqueeze", [x, g.const(np.array([1], np.int64))])
    h = g.op("Relu", [g.op("Conv", [u, g.const(g.w(8, 1, 64, scale=0.2)), g.const(g.w(8))], name="frame",
                           kernel_shape=[64], strides=[32])])
    h = _conv1d(g, h, 8, 8, "enc")
    head = g.op("Conv", [h, g.const(g.w(4, 8, 1)), g.const(g.w(4))], name="head", kernel_shape=[1])
    y = g.op("ReduceMean", [head], axes=[2], keepdims=0)
    s = g.op("ReduceMean", [state], axes=[0], keepdims=0)
    out = g.op("Add", [y, s], name="out")
    state_n = g.op("Mul", [state, g.const(np.array(0.5, np.float32))], name="state_n")
    return g.model([out, state_n])


def test_state_with_the_batch_on_axis_one_calibrates(tmp_path):
    """Per-sample files hold the state as [2, 1, 4]; batches join it on axis 1, and the
    held-out split, the reference run and the checks cut it there too."""
    src = save(stateful_model(), tmp_path / "s.onnx")
    rng = np.random.default_rng(0)
    samples = [{"x": f["x"][:, :FRAME], "state": rng.standard_normal((2, 1, 4)).astype(np.float32)}
               for f in frames(40, seed=1)]
    calib = npz_folder(tmp_path / "calib", samples)
    out0, out = tmp_path / "o0.onnx", tmp_path / "o.onnx"
    assert main([str(src), str(out0), "--calib", str(calib), "--ratio", "0", "--batch-size", "8", "-q"]) == 0
    batch = {"x": np.concatenate([s["x"] for s in samples[:5]]), "state": np.concatenate([s["state"] for s in samples[:5]], 1)}
    assert all(np.array_equal(a, b) for a, b in zip(run(out0, batch), run(src, batch)))
    assert main([str(src), str(out), "--calib", str(calib), "--ratio", "0.5", "--round-to", "1",
                 "--batch-size", "8", "-q"]) == 0
    assert conv_out(out, "frame") == 4 and conv_out(out, "enc") == 4
    assert [a.shape for a in run(out, batch)] == [(5, 4), (2, 5, 4)]
