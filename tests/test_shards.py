"""The refit from shards of the calibration batches (the base of a distributed run): 1, 2 or
4 shards of the same batches write the same weights (1e-6 relative) as one, in any shard
order, because rows are buffered within whole blocks of batches and every shard sums around
the same shift; the split covers every batch once, in whole blocks."""

from __future__ import annotations

import numpy as np
import pytest

import onnxprune.reconstruct as rc
from builders import save
from onnxprune.load import load_model
from test_segments import MODELS, _batches, _pruned, _weights

CPU = ["CPUExecutionProvider"]


def test_shard_ranges_cover_every_batch_once_in_whole_blocks():
    for n, shards, block in [(6, 4, 1), (17, 2, 8), (3, 4, 1), (40, 3, 8), (0, 2, 8)]:
        ranges = rc.shard_ranges(n, shards, block)
        assert len(ranges) == shards
        assert [b for r in ranges for b in r] == list(range(n))
        for r in ranges:
            if len(r):
                assert r.start % block == 0 and (r.stop % block == 0 or r.stop == n)


def _refit(path, batches, shards, block, order=None, monkeypatch=None):
    original, _ = load_model(path)
    model, targets = _pruned(path)
    if order is not None:
        real = rc.shard_ranges
        monkeypatch.setattr(rc, "shard_ranges", lambda *a: order(real(*a)))
    rc.refit_on_pruned(targets, original, model, batches, providers=CPU, memory_budget=1 << 30, shards=shards,
                       block=block)
    if order is not None:
        monkeypatch.setattr(rc, "shard_ranges", real)
    return _weights(model), [(t.mode, t.shrink) for t in targets]


@pytest.mark.parametrize("name", ["residual_concat", "attention"])
def test_shards_write_the_weights_of_one(tmp_path, name, monkeypatch):
    proto = MODELS[name]()
    path = save(proto, tmp_path / "m.onnx")
    batches = _batches(proto, n=9, seed=5)  # enough held-out samples that the attention picks lstsq
    one, modes = _refit(path, batches, 1, 1)
    assert modes and any(m == "lstsq" for m, _ in modes), "the test needs least-squares refits"
    runs = {"2 shards": _refit(path, batches, 2, 1), "4 shards": _refit(path, batches, 4, 1),
            "4 shards, reversed": _refit(path, batches, 4, 1, order=lambda r: r[::-1], monkeypatch=monkeypatch)}
    for label, (weights, got_modes) in runs.items():
        assert got_modes == modes, label
        assert weights.keys() == one.keys()
        for k, w in weights.items():
            np.testing.assert_allclose(w, one[k], rtol=1e-6, atol=1e-6 * float(np.abs(one[k]).max()), err_msg=f"{label}: {k}")


def _two_refits(tmp_path, n: int, seed: int, first: tuple[int, int], second: tuple[int, int]):
    """The residual CNN refitted twice on the same batches, with (shards, block) ``first``
    and ``second``: both weights, the modes checked equal."""
    proto = MODELS["residual_concat"]()
    path = save(proto, tmp_path / "m.onnx")
    batches = _batches(proto, n=n, seed=seed)
    (a, modes_a), (b, modes_b) = _refit(path, batches, *first), _refit(path, batches, *second)
    assert modes_a == modes_b
    return a, b


def test_blocks_change_only_float32_rounding(tmp_path):
    """Larger blocks buffer more rows per product: the same fit up to float32 rounding."""
    small, large = _two_refits(tmp_path, 5, 6, (1, 1), (1, 8))
    for k, w in large.items():
        np.testing.assert_allclose(w, small[k], rtol=1e-4, atol=1e-5 * float(np.abs(small[k]).max()), err_msg=k)


def test_more_shards_than_blocks_leave_the_empty_ones_out(tmp_path):
    """7 batches make one block of 8: four shards are one shard with three empty ones."""
    one, four = _two_refits(tmp_path, 7, 9, (1, 8), (4, 8))
    for k, w in four.items():
        np.testing.assert_array_equal(w, one[k], err_msg=k)
