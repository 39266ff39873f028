"""Shared checks for the topology tests (one test file per graph topology).

Every topology file does two things with the models it builds:

- ``assert_exact``: channels whose outgoing weights are zero in every consumer are
  removed; the outputs must not move and the model must shrink;
- ``assert_random``: ``onnxprune.prune(method="random")`` for a few seeds gives a graph
  that passes prune's own verification, keeps the original output shapes and shrinks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

import onnxprune
from builders import group_by_producer, max_diff, params, remove_exact, run, save
from onnxprune._ort import session
from onnxprune.groups import Analysis, Group, analyze_groups
from onnxprune.load import load_model
from onnxprune.verify import random_feed

TOL = 1e-5


def analysis_of(tmp_path: Path, proto: onnx.ModelProto, name: str = "analysis.onnx") -> Analysis:
    """The dependency analysis of ``proto``, loaded the way ``prune`` loads it."""
    model, _ = load_model(save(proto, tmp_path / name))
    return analyze_groups(model)


def group_of(analysis: Analysis, producer: str) -> Group:
    """The group that ``producer`` (a node name) makes channels for."""
    return group_by_producer(analysis.groups, producer)


def producer_names(group: Group) -> set[str]:
    return {p.name for p in group.producers}


def consumer_names(group: Group) -> set[str]:
    return {c.name for c in group.consumers}


def assert_exact(tmp_path: Path, proto: onnx.ModelProto, producer: str, channels: list[int]) -> Path:
    """Remove ``channels`` of ``producer``'s group (their outgoing weights are zero): the
    outputs are unchanged and the model has fewer parameters.  Returns the pruned path."""
    reference, pruned, out = remove_exact(tmp_path, proto, producer, channels)
    diff = max_diff(reference, pruned)
    # float32 rounding is relative: outputs in the hundreds move by ~1e-5 from reordered sums alone.
    scale = max(1.0, max(float(np.max(np.abs(r))) for r in reference))
    assert diff <= TOL * scale, f"removing zero-weight channels {channels} of {producer} moved the outputs by {diff}"
    assert params(out) < params(tmp_path / "in.onnx")
    return out


def assert_random(
    tmp_path: Path, proto: onnx.ModelProto, seeds: tuple[int, ...] = (0, 1, 2), ratio: float = 0.5
) -> list[Path]:
    """``prune(method="random")`` for each seed: valid, same output shapes, fewer params."""
    src = save(proto, tmp_path / "random_in.onnx")
    feed = random_feed(session(str(src)), seed=3)
    reference = run(src, feed)
    outs = []
    for seed in seeds:
        out = tmp_path / f"random_{seed}.onnx"
        _, result = onnxprune.prune(src, out, method="random", ratio=ratio, seed=seed)
        assert result.params_after < result.params_before
        assert params(out) < params(src)
        pruned = run(out, feed)
        assert [np.shape(a) for a in pruned] == [np.shape(a) for a in reference]
        assert all(np.isfinite(a).all() for a in pruned)
        outs.append(out)
    return outs


def zero_cols(w: np.ndarray, channels: list[int], axis: int = 1) -> np.ndarray:
    """A copy of ``w`` with the given indices of ``axis`` set to zero (a consumer's
    input-channel slices, so those channels contribute nothing)."""
    w = np.array(w, copy=True)
    index = [slice(None)] * w.ndim
    index[axis] = list(channels)
    w[tuple(index)] = 0
    return w


def node_of(path: Path, name: str) -> onnx.NodeProto:
    return next(n for n in onnx.load(str(path)).graph.node if n.name == name)


def const_shape(path: Path, name: str) -> tuple[int, ...]:
    """Shape of the initializer or ``Constant`` output called ``name`` in the file at ``path``."""
    m = onnx.load(str(path))
    for t in m.graph.initializer:
        if t.name == name:
            return tuple(t.dims)
    for n in m.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return tuple(n.attribute[0].t.dims)
    raise KeyError(name)


def input_shape(path: Path, node_name: str, index: int) -> tuple[int, ...]:
    """Shape of constant input ``index`` of node ``node_name`` in the file at ``path``."""
    return const_shape(path, node_of(path, node_name).input[index])
