"""The Python API: ``prune`` and ``analyze``.  The CLI is a thin skin over these.

``prune`` builds a :class:`PruneConfig` (checked once) and runs the driver, which passes a
:class:`PruneState` through the stages of :mod:`onnxprune.stages` in order and times each:
load → groups → calibrate → score → select → rewrite → compensate → verify → report.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx_ir as ir

from . import checks
from ._heap import release_freed_memory
from .gram import PatchGram
from .config import PruneConfig
from .count import count_params, macs_by_node, symbolic_dims
from .data import input_specs
from .data import Preprocess
from .errors import InputError
from .groups import Analysis, analyze_groups, control_flow_summary
from .load import load_model
from .methods import MethodOptions
from .plugins import load_plugins
from .progress import bar
from .result import AnalysisReport, PruneResult
from .select import target_outcome
from .stages import PIPELINE, SWEEP_STAGES, PruneState, Stage, count_shapes, sweep_state
from .verify import original_session


SWEEP_POINTS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4)
"""MACs targets of ``--plot``'s error curve."""


def _prunable_share(analysis: Analysis, table: dict[int, int]) -> tuple[int, int]:
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
            # A depthwise Conv is neither producer nor consumer, but its rows are sliced: it shrinks too.
            ok.add(id(e.node))
            v = e.node.inputs[e.index]
            if v is not None and id(v) not in seen:
                seen.add(id(v))
                shape = v.shape if v.shape is not None else ()
                params += int(np.prod([d if isinstance(d, int) else 1 for d in shape]))
    macs = sum(table.get(id(n), 0) for n in analysis.model.graph if id(n) in ok)
    return params, macs


def analyze(model_path: str | os.PathLike, exclude: tuple[str, ...] | list[str] = (),
            input_shape: dict[str, tuple[int, ...] | list[int]] | None = None) -> AnalysisReport:
    """Find every channel group of the model at ``model_path`` and what blocks the others;
    MACs on ``input_shape`` (as ``prune``'s) when given, else on the declared shapes."""
    checks.path_like("model_path", model_path)
    load_plugins()  # a plug-in's op handlers
    exclude = checks.patterns(exclude)
    input_shape = checks.input_shapes(input_shape)
    model, _ = load_model(model_path)
    if input_shape:  # checked against the inputs onnxruntime sees, as prune checks it
        specs = input_specs(original_session(model_path))
        checks.input_shapes_fit(input_shape, specs)
        shapes, basis = count_shapes(specs, input_shape, None)
    else:
        shapes, basis = None, "per unit" if symbolic_dims(model) else "declared shapes"
    table = macs_by_node(model, shapes)  # counted where prune counts them
    params, macs = count_params(model), int(sum(table.values()))
    analysis = analyze_groups(model, exclude)
    pp, pm = _prunable_share(analysis, table)
    return AnalysisReport(analysis.groups, params, macs, pp, pm, macs_basis=basis,
                          macs_input_shapes=None if shapes is None else {k: list(v) for k, v in shapes.items()},
                          macs_symbolic=symbolic_dims(model) if basis == "per unit" else None,
                          macs_excluded=control_flow_summary(model.graph))


def prune(
    model_path: str | os.PathLike,
    output_path: str | os.PathLike | None = None,
    *,
    method: str = "l1",
    ratio: float = 0.5,
    global_: bool = False,
    min_keep: int = 1,
    round_to: int | None = None,
    exclude: tuple[str, ...] | list[str] = (),
    seed: int = 0,
    calib: Any = None,
    preprocess: Preprocess | None = None,
    batch_size: int = 32,
    max_samples: int | None = None,
    memory_budget_mb: float = 1024,
    device: str = "auto",
    compensate: str = "lstsq",
    target_macs: float | None = None,
    target_params: float | None = None,
    eval_data: Any = None,
    labels: str | os.PathLike | np.ndarray | None = None,
    max_error: float | None = None,
    min_agreement: float | None = None,
    force: bool = False,
    eval_samples: int = 256,
    progress: bool = False,
    latency: bool = True,
    method_options: MethodOptions | None = None,
    steps: int = 1,
    ray: str | None = None,
    workers: int = 2,
    input_shape: dict[str, tuple[int, ...] | list[int]] | None = None,
    _reference: str | os.PathLike | None = None,
) -> tuple[ir.Model, PruneResult]:
    """Prune the model at ``model_path``; write it to ``output_path`` when given.

    ``calib`` (a folder of .npy/.npz/images, an onnxruntime ``CalibrationDataReader``, or
    an iterable of ``{input_name: array}``) feeds the data-driven criteria and the
    compensation (``compensate``: ``lstsq`` by default, ``bias``, ``none``).  Returns the pruned model and a :class:`PruneResult`.  The pruned graph
    is always checked (onnx full check, onnxruntime run, output shapes equal to the
    original's) before it is returned or written; a failure raises
    :class:`VerificationError` naming the group whose rewrite broke it, and nothing is
    written.  With ``max_error``/``min_agreement`` a fidelity violation raises
    :class:`GateError` (exit 3) and nothing is written unless ``force``.

    ``ray``: ``"local"`` (a local Ray runtime) or a cluster address: calibration and the
    least-squares refit run on ``workers`` Ray actors, each holding a shard of the
    calibration batches (:mod:`onnxprune.distributed`); the selection and the written
    weights are those of one process.

    ``input_shape``: ``{input name: dims}`` (``--input-shape``): fixes an input's symbolic
    dims for the synthetic reference run (without ``calib``), the MAC count and the report;
    the written model keeps its declared (symbolic) inputs.  With ``calib`` the reference
    run and the checks use the first calibration samples, and the MACs are counted on
    their shapes unless ``input_shape`` is given.

    ``round_to``: kept channel counts are rounded up to a multiple of it; ``None`` (the
    default) rounds groups a Conv produces or reads to 16 (onnxruntime's NCHWc kernels)
    and leaves the rest free (:func:`select.round_for`).
    """
    checks.path_like("model_path", model_path)
    checks.path_like("output_path", output_path, optional=True)
    config = PruneConfig(
        method=method, ratio=ratio, global_=global_, min_keep=min_keep, round_to=round_to, exclude=exclude,
        seed=seed, calib=calib, preprocess=preprocess, batch_size=batch_size, max_samples=max_samples,
        memory_budget_mb=memory_budget_mb, device=device, compensate=compensate, target_macs=target_macs,
        target_params=target_params, eval_data=eval_data, labels=labels, max_error=max_error,
        min_agreement=min_agreement, force=force, eval_samples=eval_samples, progress=progress, latency=latency,
        method_options=method_options, steps=steps, ray=ray, workers=workers, input_shape=input_shape,
    )
    return prune_with(config, model_path, output_path, reference=_reference)


def prune_with(
    config: PruneConfig, model_path: str | os.PathLike, output_path: str | os.PathLike | None = None,
    *, reference: str | os.PathLike | None = None, sweep: tuple[float, ...] = (),
) -> tuple[ir.Model, PruneResult]:
    """Prune with a checked configuration: in ``config.steps`` rounds, else one pass of the
    stages.  ``reference``: the model fidelity and latency compare against (default: the input).
    ``sweep``: MACs targets of the error curve (``--plot``), pruned on this run's calibration
    and stored in ``result.sweep`` (see :func:`error_sweep`)."""
    if config.steps > 1:
        model, result = _prune_in_steps(model_path, output_path, config)
        result.sweep = error_sweep(model_path, config, result, sweep) if sweep else []
        return model, result
    shared = bool(sweep) and not config.ray  # a Ray pool's phases run once: its points prune afresh
    state = PruneState(model_path, output_path, config, reference_path=reference, keep_for_sweep=shared)
    try:
        run_stages(state)
        if shared:
            state.result.sweep = _shared_sweep(state, sweep)
        elif sweep:
            state.result.sweep = error_sweep(model_path, config, state.result, sweep)
    finally:
        if state.store is not None:  # also on error: a Ray pool's workers, a store's spill folder
            state.store.close()
    return state.model, state.result


def run_stages(state: PruneState, stages: Iterable[Stage] = PIPELINE) -> PruneState:
    """Run each wanted stage on ``state`` in order; ``state.times[stage.name]`` is its wall time."""
    for stage in stages:
        if stage.wanted(state):
            t = time.perf_counter()
            stage.run(state)
            PatchGram.forget()
            release_freed_memory()
            state.times[stage.name] = time.perf_counter() - t
    return state


def _prune_in_steps(model_path, output_path, config: PruneConfig) -> tuple[ir.Model, PruneResult]:
    """Prune in ``steps`` rounds, recalibrating on the pruned graph between rounds.

    Each round removes the same share of what is left, so the rounds compound to the
    requested ratio or target; a method's own rule (relief's α, MIPP's confidence,
    relative's τ) is applied in every round, as the papers iterate.  Fidelity, the gate
    and latency of the last round are measured against the original model.
    """
    if config.calib is None:
        raise InputError("--steps recalibrates between rounds: give --calib")
    if not _rereadable(config.calib):
        raise InputError(
            "--steps reads the calibration data once per round, and this source can only be read once: "
            "pass a folder, a list, or a CalibrationDataReader with rewind()"
        )
    steps, root = config.steps, (lambda t: None if t is None else t ** (1 / config.steps))
    step = replace(config, steps=1, target_macs=root(config.target_macs), target_params=root(config.target_params),
                   ratio=1 - (1 - config.ratio) ** (1 / steps))
    # The rounds before the last: no evaluation, no gate, no latency; the last one has them.
    inter = replace(step, eval_data=None, labels=None, max_error=None, min_agreement=None, eval_samples=0, latency=False)
    first: PruneResult | None = None
    current = Path(model_path)
    with tempfile.TemporaryDirectory(prefix="onnxprune-steps-") as d:
        for k in range(steps - 1):
            out = Path(d) / f"step{k + 1}.onnx"
            _, r = prune_with(inter, current, out)
            first = first or r
            current = out
        model, result = prune_with(step, current, output_path, reference=model_path)
    result.params_before, result.macs_before = first.params_before, first.macs_before
    result.file_size_before = first.file_size_before
    result.ratio = config.ratio if config.target is None else result.ratio
    if result.target is not None:  # the rounds compound: requested and achieved against the original
        t = result.target
        before, after = ((result.macs_before, result.macs_after) if t["kind"] == "MACs"
                         else (result.params_before, result.params_after))
        relaxed = {int(k): tuple(v) for k, v in t["relaxed_alignment"].items()}
        result.target = target_outcome(t["kind"], config.target, after / max(before, 1), relaxed)
    result.steps = steps
    return model, result


def _point(result: PruneResult) -> tuple[float, float, float | None] | None:
    """(MACs removed, rel. L2 error, agreement) of one prune, if its fidelity was measured."""
    if not result.fidelity:
        return None
    return 1 - result.macs_after / result.macs_before, result.fidelity["rel_l2"], result.fidelity["agreement"]


def _sweep_config(config: PruneConfig, target: float) -> PruneConfig:
    # The sweep's own budget replaces the run's, and no point may fail a gate or print.
    return replace(config, ratio=PruneConfig.ratio, target_macs=target, target_params=None, max_error=None,
                   min_agreement=None, progress=False, latency=False)


def _shared_sweep(base: PruneState, points: tuple[float, ...]) -> list:
    """The error curve on ``base``'s calibration: each point runs the stages from the
    analysis on, on a fresh copy of the loaded model."""
    out = [p for p in [_point(base.result)] if p]
    with bar("error curve (--plot)", base.config.progress) as tick:
        for k, target in enumerate(points):
            tick(k, len(points))
            state = run_stages(sweep_state(base, _sweep_config(base.config, target)), SWEEP_STAGES)
            out += [p for p in [_point(state.result)] if p]
    return out


def error_sweep(model_path, config: PruneConfig, result: PruneResult, points=SWEEP_POINTS) -> list:
    """(MACs removed, rel. L2 error, agreement) at several MACs targets with the same
    options, plus the result itself, each point a prune of its own (``--steps`` and
    ``--ray`` runs; :func:`prune_with` ``sweep=`` shares one calibration otherwise)."""
    out = [p for p in [_point(result)] if p]
    with bar("error curve (--plot)", config.progress) as tick:
        for k, target in enumerate(points):
            tick(k, len(points))
            _, r = prune_with(_sweep_config(config, target), model_path, None)
            out += [p for p in [_point(r)] if p]
    return out


def _rereadable(calib: Any) -> bool:
    """Whether the calibration source can be read again (a folder, a list, a rewindable reader)."""
    return isinstance(calib, (str, os.PathLike, list, tuple)) or hasattr(calib, "rewind")
