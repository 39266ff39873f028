"""Budget allocation by measured sensitivity (the select stage, for ``--target-macs`` and
``--target-params`` with calibration data): how many channels each group gives up.

A *probe graph* emulates any selection in one onnxruntime run.  Before every consumer
(a Conv/Gemm/MatMul reading a prunable group's channels) it inserts ``x' = P·x + c``
over the channel axis (a 1×1 Conv, or a MatMul + Add for channels last), with P and c fed
per run: the identity for kept channels, and for removed ones what the compensation will
put in their place at that consumer:

* ``lstsq``: the least-squares prediction from the kept channels,
  ``x_R ≈ μ_R + Σ_RS (Σ_SS + λI)⁻¹ (x_S − μ_S)``, from the same channel Gram statistics the
  refit uses (the centre tap of a k×k Conv's patch statistics), where the refit would
  have enough rows; the mean elsewhere.  For Gemm/MatMul and 1×1 Conv consumers this is
  exactly the refit from the original statistics; for k×k Conv an approximation.
* ``bias``: the channel's mean (``b += W[:, removed]·E[x_removed]`` is the same thing).
* ``none``: zero.

Each group is probed alone at a ladder of removed shares (1/8 … 7/8 of its channels, the
lowest-scored first, through :func:`select.choose`, so rounding, min-keep and Split
chunks apply), and the damage is the relative squared error of the model outputs on a
few calibration samples (``Σ‖y − y₀‖² / Σ‖y₀‖²``, the square of verify's relative L2
error).  Damages of different groups are
taken as additive, and a Lagrangian allocation picks one ladder rung per group: the rung
minimising ``damage − λ·saving`` for each group, λ bisected until the MACs (params)
estimate meets the target, then rungs are given back greedily while the target still
holds.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx_ir as ir

from . import _ort
from .calibrate import Statistics
from .compensate import _taps, enough_rows, ridged
from .consumers import ConsumerView, consumer_views
from .groups import Analysis, Group
from .select import choose, round_for

LADDER = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)  # removed shares probed per group
PROBE_SAMPLES = 32  # calibration samples the probes run on


@dataclass
class _Site:
    """One consumer input rewritten by the probe graph."""

    view: ConsumerView
    weight: str  # graph input names of P (Pᵀ when channels are last) and c
    bias: str
    shapes: tuple[list[int], list[int]]  # as fed: P, c
    last: bool  # channels last: the graph computes x·Pᵀ
    mean: np.ndarray
    cov: np.ndarray | None  # channel covariance (lstsq)
    rows: float  # sampled rows behind cov


def _channel_gram(gram) -> tuple[np.ndarray, np.ndarray]:
    """Channel covariance and mean of a ChannelGram, or of the centre tap of a PatchGram."""
    cov, mu = gram.covariance(), gram.mean()
    kernel = getattr(gram, "kernel", None)
    if kernel is not None:
        taps = int(np.prod(kernel))
        idx = np.arange(len(mu) // taps) * taps + taps // 2
        cov, mu = cov[np.ix_(idx, idx)], mu[idx]
    return cov, mu


def _probe_model(analysis: Analysis, views: list[ConsumerView], folder: Path) -> tuple[Path, dict[int, tuple]]:
    """Write the probe graph (the analysed model is restored afterwards); returns its path
    and, per emulated view index, (P name, c name, (P shape, c shape), channels last).
    Views whose tensor is not float32 with channels on axis 1 or last are not emulated."""
    graph = analysis.model.graph
    f32 = ir.TensorType(ir.DataType.FLOAT)
    added_nodes: list[ir.Node] = []
    added_inputs: list[ir.Value] = []
    swapped: list[tuple[ir.Node, ir.Value]] = []
    sites: dict[int, tuple] = {}
    for i, v in enumerate(views):
        rank = len(v.value.shape) if v.value.shape is not None else 0
        c = len(v.atoms)
        if v.value.dtype != ir.DataType.FLOAT or rank < 2 or v.axis not in (1, rank - 1):
            continue
        last = v.axis == rank - 1
        p_shape = [c, c] if last else [c, c] + [1] * (rank - 2)
        c_shape = [c] + [1] * (rank - 1 - v.axis)
        p = ir.Value(name=f"onnxprune_probe_p{i}", shape=ir.Shape(p_shape), type=f32)
        cb = ir.Value(name=f"onnxprune_probe_c{i}", shape=ir.Shape(c_shape), type=f32)
        mix = ir.node("MatMul" if last else "Conv", [v.value, p])
        nodes = [mix, ir.node("Add", [mix.outputs[0], cb])]
        graph.insert_before(v.node, nodes)
        added_nodes += nodes
        added_inputs += [p, cb]
        swapped.append((v.node, v.value))
        v.node.replace_input_with(0, nodes[-1].outputs[0])
        sites[i] = (p.name, cb.name, (p_shape, c_shape), last)
    graph.inputs.extend(added_inputs)
    try:
        path = folder / "probe.onnx"
        ir.save(analysis.model, path, external_data="probe.onnx.data")
    finally:
        for node, value in swapped:
            node.replace_input_with(0, value)
        for value in added_inputs:
            graph.inputs.remove(value)
        graph.remove(added_nodes, safe=True)
    return path, sites


def allocate(
    analysis: Analysis,
    scores: dict[int, np.ndarray],
    stats: Statistics,
    measure: Callable[[dict[int, np.ndarray]], float],
    target: float,
    *,
    compensate: str,
    providers: list[str],
    min_keep: int = 1,
    round_to: int | None = None,
) -> tuple[dict[int, np.ndarray], dict]:
    """Group id -> class roots to remove so that ``measure(removed)`` (the kept fraction of
    MACs or params) is at most ``target`` with the least summed measured damage; also a
    report (probes, damage predicted, groups that could not be probed)."""
    views = consumer_views(analysis)
    samples = stats.kept
    if not samples:
        raise ValueError("allocate needs calibration samples kept by calibrate(keep=...)")
    groups = [g for g in analysis.groups if g.prunable and g.id in scores]
    with tempfile.TemporaryDirectory(prefix="onnxprune-probe-") as d:
        path, emulated = _probe_model(analysis, views, Path(d))
        sess = _ort.session(str(path), providers)
        sites: list[_Site] = []
        for i, (p, c, shapes, last) in emulated.items():
            v = views[i]
            gram = stats.extra.get(f"lstsq:{i}") if compensate == "lstsq" else None
            mean = stats.tensors[v.tensor].mean if v.tensor in stats.tensors else np.zeros(len(v.atoms))
            cov, rows = None, 0.0
            if gram is not None and gram.gram is not None:
                cov, mean = _channel_gram(gram)
                rows = gram.total()[2]
            sites.append(_Site(v, p, c, shapes, last, mean, cov, rows))
        sites_of = _sites_by_group(analysis, groups, sites)
        reach = {g.id for g in groups if sites_of[g.id]}

        def outputs(removed: np.ndarray) -> list[np.ndarray]:
            gone = np.zeros(len(analysis.roots), dtype=bool)
            gone[removed] = True
            gone[0] = False
            outs = []
            for batch in samples:
                feed = dict(batch)
                for s in sites:
                    p, c = _replacement(s, gone[analysis.roots[s.view.atoms]], compensate)
                    feed[s.weight] = np.ascontiguousarray(p.T if s.last else p).reshape(s.shapes[0])
                    feed[s.bias] = c.reshape(s.shapes[1])
                outs += [o.astype(np.float64) for o in sess.run(None, feed)]  # batches may differ in shape
            return outs

        y0 = outputs(np.zeros(0, dtype=np.int64))
        scale = sum(float((y**2).sum()) for y in y0) or 1.0

        def damage(removed: np.ndarray) -> float:
            """‖y − y₀‖² / ‖y₀‖² over every output and probe sample: the square of the relative
            L2 error verify reports (summed over outputs where it takes the worst)."""
            return sum(float(((y - r) ** 2).sum()) for y, r in zip(y0, outputs(removed))) / scale

        base = measure({})
        rungs: dict[int, list[tuple[np.ndarray, float, float]]] = {}  # removal, damage, saving
        probes = 0
        for g in groups:
            dead = choose([g], scores, {g.id: 0}, min_keep=min_keep, round_to=round_to)[g.id]
            rungs[g.id] = [(dead, 0.0, base - measure({g.id: dead}))]
            if g.id not in reach:
                continue  # no consumer to emulate it at: only its dead channels go
            seen = {len(dead)}
            for share in LADDER:
                sel = choose([g], scores, {g.id: int(math.floor(share * len(g.classes)))}, min_keep=min_keep, round_to=round_to)[g.id]
                if len(sel) in seen:
                    continue
                seen.add(len(sel))
                rungs[g.id].append((sel, damage(sel), base - measure({g.id: sel})))
                probes += 1

    def pick(lam: float) -> dict[int, int]:
        return {gid: int(np.argmin([dmg - lam * save for _, dmg, save in rs])) for gid, rs in rungs.items()}

    def removal(at: dict[int, int]) -> dict[int, np.ndarray]:
        return {gid: rungs[gid][j][0] for gid, j in at.items()}

    lo, hi = 0.0, 1.0
    while measure(removal(pick(hi))) > target and hi < 1e12:
        hi *= 4
    best = pick(hi)
    for _ in range(60):
        if hi - lo <= 1e-9 * hi:
            break
        mid = (lo + hi) / 2
        at = pick(mid)
        if measure(removal(at)) <= target:
            best, hi = at, mid
        else:
            lo = mid
    # Rungs are coarse (1/8 of a group), so the rung solution can remove well beyond the
    # target.  Give channels back, a group's alignment step at a time, where the damage
    # curve (linear between the probed rungs) is steepest, while the target still holds.
    by_id = {g.id: g for g in groups}
    counts = {gid: len(rungs[gid][j][0]) for gid, j in best.items()}
    cache: dict[tuple[int, int], np.ndarray] = {}

    def chosen(gid: int, k: int) -> np.ndarray:
        if (gid, k) not in cache:
            cache[gid, k] = choose([by_id[gid]], scores, {gid: k}, min_keep=min_keep, round_to=round_to)[gid]
        return cache[gid, k]

    def curve(gid: int, k: float) -> float:
        xs = [len(r[0]) for r in rungs[gid]]
        return float(np.interp(k, xs, [r[1] for r in rungs[gid]]))

    final = {gid: rungs[gid][j][0] for gid, j in best.items()}
    while True:
        options = []
        for gid, k in counts.items():
            step = max(round_for(by_id[gid], round_to), 1)
            back = chosen(gid, k - step) if k - step >= len(rungs[gid][0][0]) else None
            if back is not None and len(back) < len(final[gid]):
                options.append((curve(gid, len(final[gid])) - curve(gid, len(back)), gid, k - step, back))
        options.sort(key=lambda o: (-o[0], o[1]))
        for gain, gid, k, back in options:
            trial = {**final, gid: back}
            if measure(trial) <= target:
                final, counts[gid] = trial, k
                break
        else:
            break
    predicted = sum(curve(gid, len(r)) for gid, r in final.items())
    report = {
        "probes": probes, "probe_samples": sum(next(iter(b.values())).shape[0] for b in samples),
        "predicted_error": predicted,
        "not_probed": [g.id for g in groups if g.id not in reach],
        # per group: channels removed, of how many, and the damage its curve predicts there
        "groups": {gid: (len(r), len(by_id[gid].classes), curve(gid, len(r))) for gid, r in final.items()},
    }
    return final, report


def _sites_by_group(analysis: Analysis, groups: list[Group], sites: list[_Site]) -> dict[int, list[_Site]]:
    """The probe sites that see each group's channels."""
    out: dict[int, list[_Site]] = {g.id: [] for g in groups}
    class_group = {int(c): g.id for g in groups for c in g.classes}
    for s in sites:
        for gid in {class_group.get(int(r)) for r in analysis.roots[s.view.atoms]} - {None}:
            out[gid].append(s)
    return out


def _replacement(site: _Site, drop: np.ndarray, compensate: str) -> tuple[np.ndarray, np.ndarray]:
    """P [C, C] (float32) and c [C] for one site given the dropped channels (see the module
    docstring)."""
    c = len(drop)
    p = np.eye(c)
    shift = np.zeros(c)
    if drop.any():
        r, s = np.flatnonzero(drop), np.flatnonzero(~drop)
        p[r, r] = 0.0
        if compensate == "lstsq" and site.cov is not None and enough_rows(site.rows, len(s) * _taps(site.view)):
            b = np.linalg.solve(ridged(site.cov[np.ix_(s, s)]), site.cov[np.ix_(s, r)]).T  # [R, S]
            p[np.ix_(r, s)] = b
            shift[r] = site.mean[r] - b @ site.mean[s]
        elif compensate != "none":
            shift[r] = site.mean[r]
    return p.astype(np.float32), shift.astype(np.float32)


def probes_text(report: dict) -> str:
    """One line for the report: what the allocation measured."""
    text = (f"{report['probes']} probes on {report['probe_samples']} samples, "
            f"predicted relative L2 error {math.sqrt(report['predicted_error']):.3g}")
    if report["not_probed"]:
        text += f"; groups {', '.join(map(str, report['not_probed']))} have no consumer to probe and lose only dead channels"
    return text
