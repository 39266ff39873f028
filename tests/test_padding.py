"""Padded sequences (onnxprune.padding): the mask input is found, batches are sorted by
length within windows and cut to their longest sample, the cut is used only where the
model's outputs at the real positions do not change, and a prune on padded data writes
what the same prune writes on the batches sorted and cut by hand."""

from __future__ import annotations

import numpy as np
import onnx

import onnxprune
from builders import G, save
from onnxprune._ort import session
from onnxprune.data import _join
from onnxprune.padding import Padding, find_padding, lengths, sorted_batches, trim, trims_exactly
from test_attention import C, attention

PAD = Padding("mask", (("x", 1), ("mask", 1)))


def _padded(n: int, seq: int = 8, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``n`` samples of the attention block, real lengths 1..seq, the padding random."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(1, seq + 1))
        mask = (np.arange(seq) < length).astype(np.float32)[None]
        out.append({"x": rng.standard_normal((1, seq, C)).astype(np.float32), "mask": mask})
    return out


def test_the_mask_and_the_inputs_sharing_its_sequence_dim_are_found(tmp_path):
    sess = session(str(save(attention("runtime"), tmp_path / "a.onnx")))
    assert find_padding(sess.get_inputs()) == PAD
    static = session(str(save(attention("static"), tmp_path / "s.onnx")))  # a fixed length cannot be cut
    assert find_padding(static.get_inputs()) is None
    unmasked = session(str(save(attention("runtime", mask=False), tmp_path / "u.onnx")))
    assert find_padding(unmasked.get_inputs()) is None


def test_batches_are_sorted_longest_first_within_a_window_and_cut():
    samples = _padded(12)
    batches = [_join(samples[i : i + 4]) for i in range(0, 12, 4)]
    got = list(sorted_batches(batches, PAD, window=2))
    assert [len(b["x"]) for b in got] == [4, 4, 4]
    window = _join(samples[:8])
    order = np.argsort(-lengths(window, PAD), kind="stable")
    for b, idx in zip(got[:2], (order[:4], order[4:])):
        n = lengths(b, PAD)
        assert b["x"].shape[1] == n.max() and b["mask"].shape[1] == n.max()  # cut after the longest sample
        np.testing.assert_array_equal(b["x"], window["x"][idx, : n.max()])
    assert np.all(np.diff(np.concatenate([lengths(b, PAD) for b in got[:2]])) <= 0)
    last = batches[2]  # a window of its own: only cut
    np.testing.assert_array_equal(got[2]["x"], last["x"][:, : lengths(last, PAD).max()])


def test_a_window_of_different_padded_lengths_is_only_cut():
    a, b = _join(_padded(3, seq=8, seed=1)), _join(_padded(3, seq=6, seed=2))
    got = list(sorted_batches([a, b], PAD, window=2))
    for want, have in zip((a, b), got):
        np.testing.assert_array_equal(have["mask"], trim(want, PAD)["mask"])


def test_the_cut_is_checked_on_the_model(tmp_path):
    """Exact where the mask keeps padded keys out of the attention; refused where an output
    reads every position (a mean over the sequence), or where no sample is padded."""
    sess = session(str(save(attention("runtime"), tmp_path / "a.onnx")))
    batch = _join(_padded(4, seed=3))
    assert lengths(batch, PAD).min() < 8
    assert trims_exactly(sess, batch, PAD)
    full = {"x": batch["x"], "mask": np.ones_like(batch["mask"])}
    assert not trims_exactly(sess, full, PAD)  # nothing to check on
    g = G()
    x, mask = g.input("x", ["batch", "seq", C]), g.input("mask", ["batch", "seq"])
    leaky = session(str(save(g.model([g.op("ReduceMean", [x], axes=[1]), g.op("Identity", [mask])]), tmp_path / "l.onnx")))
    assert find_padding(leaky.get_inputs()) == PAD
    assert not trims_exactly(leaky, batch, PAD)


def test_a_prune_on_padded_data_writes_what_the_batches_cut_by_hand_give(tmp_path):
    """The sorted, cut batches are what calibration, the Gram sums and the lstsq refit see:
    the same prune on those batches given already sorted and cut (so nothing is left to
    sort or cut) writes the same bytes.  No target and an eval set: no probe or held-out
    samples, which come from the reading order."""
    src = save(attention("runtime"), tmp_path / "in.onnx")
    samples = _padded(32, seed=4)
    window = _join(samples)
    order = np.argsort(-lengths(window, PAD), kind="stable")
    by_hand = [trim({k: v[order[i : i + 8]] for k, v in window.items()}, PAD) for i in range(0, 32, 8)]
    evals = _padded(8, seed=5)
    outs = {}
    for name, calib in (("padded", samples), ("by_hand", by_hand)):
        out = tmp_path / f"{name}.onnx"
        _, result = onnxprune.prune(src, out, method="wanda", ratio=0.5, calib=calib, batch_size=8, eval_data=evals,
                                    compensate="lstsq", latency=False)
        outs[name] = out.read_bytes()
        if name == "padded":
            assert result.calibration["padding_cut_by"] == "mask"
    assert outs["padded"] == outs["by_hand"]
    onnx.checker.check_model(onnx.load(str(tmp_path / "padded.onnx")), full_check=True)


def _cls_classifier() -> onnx.ModelProto:
    """Token MLP, the first token's hidden state read by a classifier: the logits do not
    depend on padding, so the cut is exact."""
    g = G(seed=1)
    x, _ = g.input("x", ["batch", "seq", C]), g.input("mask", ["batch", "seq"])
    h = g.op("Relu", [g.op("MatMul", [x, g.const(g.w(C, 16))], name="fc1")])
    cls = g.op("Gather", [h, g.const(np.array(0, dtype=np.int64))], axis=1)
    return g.model([g.op("MatMul", [cls, g.const(g.w(16, 5))], name="fc2")])


def test_labels_stay_with_their_samples_when_verification_batches_are_cut(tmp_path):
    """With --labels the verification's batches are cut, not sorted: labelled with the
    original's own predictions, the original scores 100 % and the pruned model's accuracy
    is its agreement."""
    src = save(_cls_classifier(), tmp_path / "in.onnx")
    evals = _join(_padded(24, seed=6))
    sess = session(str(src))
    labels = tmp_path / "labels.npy"
    np.save(labels, sess.run(None, evals)[0].argmax(1))
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    np.savez(eval_dir / "all.npz", **evals)
    _, result = onnxprune.prune(src, tmp_path / "out.onnx", method="wanda", ratio=0.5, calib=_padded(32, seed=7),
                                batch_size=8, eval_data=str(eval_dir), labels=str(labels), latency=False)
    assert result.calibration["padding_cut_by"] == "mask"
    fid = result.fidelity
    assert fid["accuracy_before"] == 1.0 and fid["accuracy_after"] == fid["agreement"]
