"""The Python API: ``prune`` and ``analyze``.  The CLI is a thin skin over these.

Stages, one module each: load → groups → score (criteria) → select → rewrite →
verify → report.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from ._graph import node_label
from .count import count_macs, count_params, node_macs
from .criteria import METHODS, score_groups
from .errors import InputError, VerificationError
from .groups import Analysis, Group, analyze_groups
from .load import check_output_path, load_model, save_model
from .rewrite import apply_removal
from .select import select
from .verify import check_pruned, run_original


@dataclass
class AnalysisReport:
    """What ``onnxprune analyze`` prints: groups, blocked groups, prunable shares."""

    groups: list[Group]
    params: int
    macs: int
    prunable_params: int
    prunable_macs: int

    def to_dict(self) -> dict:
        return {
            "params": self.params,
            "macs": self.macs,
            "prunable_params": self.prunable_params,
            "prunable_macs": self.prunable_macs,
            "prunable_params_share": self.prunable_params / self.params if self.params else 0.0,
            "prunable_macs_share": self.prunable_macs / self.macs if self.macs else 0.0,
            "groups": [g.to_dict() for g in self.groups],
        }


@dataclass
class PruneResult:
    """What a prune did: counts before/after, per-group kept channels, blocked groups, timings."""

    method: str
    ratio: float
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    groups: list[dict]
    output: str | None = None
    file_size_before: int | None = None
    file_size_after: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def blocked(self) -> list[dict]:
        return [g for g in self.groups if g["blocked"]]

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "ratio": self.ratio,
            "params": {"before": self.params_before, "after": self.params_after},
            "macs": {"before": self.macs_before, "after": self.macs_after},
            "file_size": {"before": self.file_size_before, "after": self.file_size_after},
            "output": self.output,
            "groups": self.groups,
            "seconds": self.seconds,
        }


def _prunable_share(analysis: Analysis) -> tuple[int, int]:
    """Params and MACs of the constants and nodes that a prunable group would shrink."""
    from .layout import SliceParam

    ok = {id(n) for g in analysis.groups if g.prunable for n in g.producers + g.consumers}
    roots_ok = set()
    for g in analysis.groups:
        if g.prunable:
            roots_ok.update(g.classes.tolist())
    params, seen = 0, set()
    for e in analysis.edits:
        if isinstance(e, SliceParam) and roots_ok.intersection(analysis.roots[e.atoms].tolist()):
            v = e.node.inputs[e.index]
            if v is not None and id(v) not in seen:
                seen.add(id(v))
                shape = v.shape if v.shape is not None else ()
                params += int(np.prod([d if isinstance(d, int) else 1 for d in shape]))
    macs = sum(node_macs(n) for n in analysis.model.graph if id(n) in ok)
    return params, macs


def analyze(model_path: str | os.PathLike, exclude: tuple[str, ...] | list[str] = ()) -> AnalysisReport:
    """Find every channel group of the model at ``model_path`` and what blocks the others."""
    model, _ = load_model(model_path)
    analysis = analyze_groups(model, exclude)
    pp, pm = _prunable_share(analysis)
    return AnalysisReport(analysis.groups, count_params(model), count_macs(model), pp, pm)


def _check_options(method: str, ratio: float, min_keep: int, round_to: int) -> None:
    if method not in METHODS:
        raise InputError(f"unknown method '{method}': choose one of {', '.join(METHODS)}")
    if not (0.0 <= ratio < 1.0):
        raise InputError(f"--ratio must be in [0, 1), got {ratio}")
    if min_keep < 1:
        raise InputError(f"--min-keep must be at least 1, got {min_keep}")
    if round_to < 1:
        raise InputError(f"--round-to must be at least 1, got {round_to}")


def prune(
    model_path: str | os.PathLike,
    output_path: str | os.PathLike | None = None,
    *,
    method: str = "l1",
    ratio: float = 0.5,
    global_: bool = False,
    min_keep: int = 1,
    round_to: int = 1,
    exclude: tuple[str, ...] | list[str] = (),
    seed: int = 0,
) -> tuple[ir.Model, PruneResult]:
    """Prune the model at ``model_path``; write it to ``output_path`` when given.

    Returns the pruned model and a :class:`PruneResult`.  The pruned graph is always
    checked (onnx full check, onnxruntime run, output shapes equal to the original's)
    before it is returned or written; a failure raises :class:`VerificationError`
    naming the group whose rewrite broke it, and nothing is written.
    """
    _check_options(method, ratio, min_keep, round_to)
    times: dict[str, float] = {}
    t = time.perf_counter()
    if output_path is not None:
        check_output_path(model_path, output_path)
    model, external = load_model(model_path)
    feed, reference = run_original(model_path, seed)
    times["load"] = time.perf_counter() - t

    t = time.perf_counter()
    analysis = analyze_groups(model, exclude)
    times["groups"] = time.perf_counter() - t
    if not any(g.prunable for g in analysis.groups):
        reasons = [r for g in analysis.groups for r in g.blocked][:1]
        why = f" (first reason: {reasons[0]})" if reasons else ""
        raise InputError(f"nothing to prune: none of the {len(analysis.groups)} channel groups is prunable{why}")
    params_before, macs_before = count_params(model), count_macs(model)

    t = time.perf_counter()
    scores = score_groups(analysis, method, seed)
    times["score"] = time.perf_counter() - t
    t = time.perf_counter()
    removed = select(analysis.groups, scores, ratio, global_=global_, min_keep=min_keep, round_to=round_to)
    times["select"] = time.perf_counter() - t

    t = time.perf_counter()
    all_removed = np.concatenate([r for r in removed.values()] or [np.zeros(0, np.int64)])
    apply_removal(analysis, all_removed)
    times["rewrite"] = time.perf_counter() - t

    t = time.perf_counter()
    validate = lambda p: check_pruned(p, feed, reference)  # noqa: E731
    try:
        if output_path is not None:
            save_model(model, output_path, external=external, validate=validate)
        else:
            with tempfile.TemporaryDirectory(prefix="onnxprune-") as d:
                save_model(model, Path(d) / "pruned.onnx", external=external, validate=validate)
    except VerificationError as exc:
        raise VerificationError(_blame(model_path, exclude, removed, str(exc))) from exc
    times["verify"] = time.perf_counter() - t

    groups = []
    for g in analysis.groups:
        d = g.to_dict()
        d["kept"] = int(len(g.classes) - len(removed.get(g.id, ())) + (g.n_channels - len(g.classes)))
        groups.append(d)
    result = PruneResult(
        method=method,
        ratio=ratio,
        params_before=params_before,
        params_after=count_params(model),
        macs_before=macs_before,
        macs_after=count_macs(model),
        groups=groups,
        output=str(output_path) if output_path is not None else None,
        file_size_before=_size(model_path, external),
        file_size_after=_size(output_path, external) if output_path is not None else None,
        seconds={k: round(v, 4) for k, v in times.items()},
    )
    return model, result


def _size(path: str | os.PathLike, external: bool) -> int:
    p = Path(path)
    total = p.stat().st_size
    data = p.with_name(p.name + ".data")
    if data.exists():
        total += data.stat().st_size
    return total


def _blame(model_path, exclude, removed: dict[int, np.ndarray], message: str) -> str:
    """Find the first group whose removal alone breaks the graph, to name it."""
    for gid, classes in sorted(removed.items()):
        if not len(classes):
            continue
        model, _ = load_model(model_path)
        analysis = analyze_groups(model, exclude)
        feed, reference = run_original(model_path)
        apply_removal(analysis, classes)
        group = next(g for g in analysis.groups if g.id == gid)
        try:
            with tempfile.TemporaryDirectory(prefix="onnxprune-") as d:
                save_model(model, Path(d) / "p.onnx", external=False, validate=lambda p: check_pruned(p, feed, reference))
        except VerificationError as exc:
            names = ", ".join(node_label(n) for n in group.producers)
            return f"pruning group {gid} ({names}) broke the graph: {exc}; exclude it with --exclude"
    return f"pruned graph failed verification: {message}"
