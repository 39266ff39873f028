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
from typing import Any

import numpy as np
import onnx_ir as ir

from . import _ort, checks
from ._graph import RESTRUCTURED, node_label
from .allocate import PROBE_SAMPLES, allocate, probes_text
from .calibrate import calibrate, providers_for, split_held_out
from .compensate import COMPENSATIONS, apply_bias, apply_refits, bias_deltas, lstsq_refits, lstsq_requests
from .consumers import consumer_views
from .count import count_macs, count_params, estimate_after, node_macs
from .criteria import DATA_DRIVEN, METHODS, score_groups, statistics_for
from .data import InputSpec, Preprocess, batches, input_specs, source_items
from .errors import GateError, InputError, VerificationError
from .groups import Analysis, Group, analyze_groups
from .load import check_output_path, load_model, save_model
from .methods import REGISTRY, MethodOptions
from .reconstruct import refit_on_pruned, refit_targets
from .rewrite import apply_removal, refresh_shapes
from .segments import BatchStore
from .select import select, select_for_target
from .verify import Fidelity, check_pruned, check_restructured, measure_fidelity, paired_latency, run_original


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
    compensation: str = "none"
    compensation_note: str | None = None
    calibration: dict | None = None
    fidelity: dict | None = None
    latency: dict | None = None
    gate_forced: bool = False
    method_report: dict | None = None
    steps: int = 1
    selection: str = ""

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
            "compensation": self.compensation,
            "compensation_note": self.compensation_note,
            "calibration": self.calibration,
            "fidelity": self.fidelity,
            "latency": self.latency,
            "method_report": self.method_report,
            "steps": self.steps,
            "selection": self.selection,
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
            # A depthwise Conv is neither producer nor consumer, but its rows are sliced: it shrinks too.
            ok.add(id(e.node))
            v = e.node.inputs[e.index]
            if v is not None and id(v) not in seen:
                seen.add(id(v))
                shape = v.shape if v.shape is not None else ()
                params += int(np.prod([d if isinstance(d, int) else 1 for d in shape]))
    macs = sum(node_macs(n) for n in analysis.model.graph if id(n) in ok)
    return params, macs


def analyze(model_path: str | os.PathLike, exclude: tuple[str, ...] | list[str] = ()) -> AnalysisReport:
    """Find every channel group of the model at ``model_path`` and what blocks the others."""
    checks.path_like("model_path", model_path)
    exclude = checks.patterns(exclude)
    model, _ = load_model(model_path)
    params, macs = count_params(model), count_macs(model)  # counted where prune counts them
    analysis = analyze_groups(model, exclude)
    pp, pm = _prunable_share(analysis)
    return AnalysisReport(analysis.groups, params, macs, pp, pm)


def _check_options(
    model_path, output_path, method: str, ratio: float, min_keep: int, round_to: int | None, seed: int,
    steps: int, preprocess: Any, method_options: Any,
) -> None:
    """The options that need no data, checked before any work (types included: the API's callers)."""
    checks.path_like("model_path", model_path)
    checks.path_like("output_path", output_path, optional=True)
    checks.choice("--method", method, METHODS)
    checks.real("--ratio", ratio, 0.0, 1.0, hi_open=True)
    checks.integer("--min-keep", min_keep, 1)
    checks.integer("--round-to", round_to, 1, optional=True)
    checks.integer("--seed", seed)
    checks.integer("--steps", steps, 1)
    checks.preprocess(preprocess)
    checks.method_options(method_options)


def _check_data_options(
    method: str, calib, compensate: str, batch_size: int, max_samples, memory_budget_mb: float,
    target_macs, target_params, eval_data, labels, max_error, min_agreement, eval_samples: int = 0,
) -> None:
    checks.choice("--compensate", compensate, tuple(COMPENSATIONS))
    if method in DATA_DRIVEN and calib is None:
        raise InputError(f"--method {method} scores channels from activations: give calibration data with --calib")
    checks.integer("--batch-size", batch_size, 1)
    checks.integer("--max-samples", max_samples, 1, optional=True)
    checks.integer("eval_samples", eval_samples, 0)
    checks.real("--memory-budget", memory_budget_mb, 0.0, lo_open=True)
    if target_macs is not None and target_params is not None:
        raise InputError("give --target-macs or --target-params, not both")
    for name, t in (("--target-macs", target_macs), ("--target-params", target_params)):
        checks.real(name, t, 0.0, 1.0, lo_open=True, optional=True)  # the fraction to keep
    checks.real("--max-error", max_error, 0.0, optional=True)
    checks.real("--min-agreement", min_agreement, 0.0, 1.0, optional=True)
    checks.labels(labels)
    if labels is not None and eval_data is None:
        raise InputError("--labels needs --eval: labels must line up with the evaluation samples")
    if (max_error is not None or min_agreement is not None) and calib is None and eval_data is None:
        raise InputError("--max-error/--min-agreement need samples to check on: give --eval or --calib")


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

    ``round_to``: kept channel counts are rounded up to a multiple of it; ``None`` (the
    default) rounds groups a Conv produces or reads to 16 (onnxruntime's NCHWc kernels)
    and leaves the rest free (:func:`select.round_for`).
    """
    exclude = checks.patterns(exclude)
    _check_options(model_path, output_path, method, ratio, min_keep, round_to, seed, steps, preprocess, method_options)
    _check_data_options(
        method, calib, compensate, batch_size, max_samples, memory_budget_mb,
        target_macs, target_params, eval_data, labels, max_error, min_agreement, eval_samples,
    )
    if steps > 1:
        args = {k: v for k, v in locals().items() if k not in ("model_path", "output_path", "steps", "_reference")}
        return _prune_in_steps(model_path, output_path, steps, args)
    opts = method_options or MethodOptions()
    opts.min_keep, opts.seed = min_keep, seed
    plugin = REGISTRY.get(method)
    times: dict[str, float] = {}
    t = time.perf_counter()
    if output_path is not None:
        check_output_path(model_path, output_path)
    model, external = load_model(model_path)
    feed, reference = run_original(model_path, seed)
    if model.graph.meta.get(RESTRUCTURED):
        check_restructured(model, feed, reference)
    providers = providers_for(device)
    times["load"] = time.perf_counter() - t

    t = time.perf_counter()
    # load_model already folded constant index arithmetic and static shape reads and
    # inferred shapes (the MACs need them); the analysis changes nothing these count.
    params_before, macs_before = count_params(model), count_macs(model)
    analysis = analyze_groups(model, exclude)
    times["groups"] = time.perf_counter() - t
    if not any(g.prunable for g in analysis.groups):
        reasons = [r for g in analysis.groups for r in g.blocked][:1]
        why = f" (first reason: {reasons[0]})" if reasons else ""
        raise InputError(f"nothing to prune: none of the {len(analysis.groups)} channel groups is prunable{why}")

    stats, held, specs, store = None, [], None, None
    if calib is not None:
        t = time.perf_counter()
        specs = input_specs(_ort.session(str(model_path), providers))
        bs = _fixed_batch(specs, batch_size)
        items = source_items(calib, specs, preprocess)()
        views = consumer_views(analysis)
        tensors = {v.tensor: (v.value, v.axis) for v in views}
        requests = plugin.requests(analysis, views, opts) if plugin is not None else []
        if compensate == "lstsq":  # the same Gram statistics once, when the method asks for them too
            asked = {r.key for r in requests}
            requests = requests + [r for r in lstsq_requests(analysis) if r.key not in asked]
        # The calibrated batches, kept for the refit's passes: the source is read once.
        store = BatchStore(int(memory_budget_mb * 2**20) // 4) if compensate != "none" else None
        stats, held = calibrate(
            model, tensors, batches(items, specs, bs, max_samples),
            batch_size=bs, providers=providers, memory_budget=int(memory_budget_mb * 2**20),
            progress=progress, total=max_samples, hold_out=0 if eval_data is not None else eval_samples,
            fixed_batch=any(sp.dims and sp.dims[0] is not None for sp in specs), requests=requests,
            statistics=statistics_for(method),
            keep=PROBE_SAMPLES if (target_macs is not None or target_params is not None) and not global_ else 0,
            record=store,
        )
        times["calibrate"] = time.perf_counter() - t

    t = time.perf_counter()
    scores = score_groups(analysis, method, seed, stats, opts)
    times["score"] = time.perf_counter() - t
    t = time.perf_counter()
    target = target_macs if target_macs is not None else target_params
    views = consumer_views(analysis) if plugin is not None else []
    rule = f"global ratio {ratio:.3g}" if global_ else f"ratio {ratio:.3g}"
    if target is not None:
        rule = f"target {'MACs' if target_macs is not None else 'params'} {target:.3g}"
    if target is not None:
        pick = 1 if target_macs is not None else 0
        base = macs_before if target_macs is not None else params_before

        def kept_fraction(sel: dict[int, np.ndarray]) -> float:
            return estimate_after(analysis, _flat(sel))[pick] / max(base, 1)

        own = plugin.select_budget(analysis, stats, views, opts, analysis.groups, kept_fraction, target) if plugin else None
        if own is not None:
            removed, ratio = own
        elif stats is not None and stats.kept:
            removed, probe = allocate(analysis, scores, stats, kept_fraction, target, compensate=compensate,
                                      providers=providers, min_keep=min_keep, round_to=round_to,
                                      memory_budget=int(memory_budget_mb * 2**20))
            ratio = len(_flat(removed)) / max(sum(len(g.classes) for g in analysis.groups if g.prunable), 1)
            rule += (f", allocated by measured sensitivity ({probes_text(probe)})")
        else:
            removed, ratio = select_for_target(analysis.groups, scores, kept_fraction, target, min_keep=min_keep, round_to=round_to)
    elif plugin is not None and plugin.own_rule(opts):
        removed = plugin.select(analysis, stats, views, opts, analysis.groups)
        rule = f"{method}'s own rule"
    else:
        removed = select(analysis.groups, scores, ratio, global_=global_, min_keep=min_keep, round_to=round_to)
    all_removed = _flat(removed)
    times["select"] = time.perf_counter() - t

    t = time.perf_counter()
    method_report = plugin.pre_rewrite(analysis, stats, views, opts, all_removed) if plugin is not None else None
    refits: list = []
    deltas: list = []
    if stats is not None and compensate == "bias":
        deltas = bias_deltas(analysis, stats, all_removed)
    elif stats is not None and compensate == "lstsq":
        refits, deltas = lstsq_refits(analysis, stats, all_removed)
    targets = []
    if stats is not None and compensate == "lstsq":
        targets = refit_targets(analysis, all_removed)
    elif stats is not None and compensate == "bias":  # consumers feeding a Relu: keep the post-ReLU mean
        targets = refit_targets(analysis, all_removed, relu_only=True)
    # The refit runs the original graph beside the pruned one: a copy, not a second parse
    # and normalisation of the file.
    original = ir.from_proto(ir.to_proto(model)) if targets and store is not None else None
    apply_removal(analysis, all_removed)
    times["rewrite"] = time.perf_counter() - t
    t = time.perf_counter()
    if deltas or refits:
        apply_bias(analysis, deltas, all_removed)
        apply_refits(analysis, refits, all_removed)
        refresh_shapes(model)
    refit_note = None
    if original is not None:
        n_ls, n_bias = refit_on_pruned(
            # The kept batches hold a quarter of the budget: the two graphs' caches share the rest.
            targets, original, model, store, providers=providers, memory_budget=int(memory_budget_mb * 2**20) * 3 // 4,
            modes=("bias",) if compensate == "bias" else ("lstsq", "bias"),
        )
        if compensate == "bias":
            refit_note = f"{n_bias} consumers feeding a Relu: bias refitted in the pruned graph to keep the post-ReLU mean"
        else:
            refit_note = f"{n_ls} consumers refitted by least squares from their inputs in the pruned graph"
            n_zeros = sum(t.keep_zeros and t.mode == "bias" for t in targets)
            if n_bias - n_zeros:
                refit_note += f", {n_bias - n_zeros} by bias only (it predicted held-out samples better)"
            if n_zeros:
                refit_note += f", {n_zeros} by bias only to keep their zero weights (sparse)"
    if store is not None:
        store.close()
    times["compensate"] = time.perf_counter() - t

    t = time.perf_counter()
    label_array = None if labels is None else _load_labels(labels)
    measured: dict[str, Any] = {}

    def validate(path: Path) -> None:
        check_pruned(path, feed, reference)
        if eval_data is not None or held:
            if eval_data is not None:
                eval_iter = batches(source_items(eval_data, specs or input_specs(_ort.session(str(model_path))), preprocess)(),
                                    specs or input_specs(_ort.session(str(model_path))), _fixed_batch(specs or [], batch_size))
                source = "eval data"
            else:
                eval_iter, source = iter(held), "held-out calibration samples"
            fid = measure_fidelity(_reference or model_path, path, eval_iter, label_array, providers)
            fid.source = source
            measured["fidelity"] = fid
            measured["forced"] = _gate(fid, max_error, min_agreement, force)
        if latency:
            lat_feed = held[0] if held else feed
            measured["latency"] = paired_latency(_reference or model_path, path, lat_feed)

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
        if g.id in scores:
            d["dead"] = int(np.isneginf(scores[g.id]).sum())
        groups.append(d)
    fid = measured.get("fidelity")
    lat = measured.get("latency")
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
        compensation=(compensate if stats is not None else "none") if compensate != "none" else "none",
        compensation_note=refit_note,
        calibration=None if stats is None else {
            "samples": stats.samples, "seconds": round(stats.seconds, 4), "runs_per_batch": stats.runs_per_batch,
            "tensors": len(stats.tensors), "held_out": sum(next(iter(b.values())).shape[0] for b in held),
        },
        fidelity=None if fid is None else fid.to_dict(),
        latency=None if lat is None else {"before_s": lat[0], "after_s": lat[1], "speedup": lat[0] / lat[1] if lat[1] else None},
        gate_forced=bool(measured.get("forced")),
        method_report=method_report,
        selection=rule,
    )
    return model, result


def _prune_in_steps(model_path, output_path, steps: int, args: dict) -> tuple[ir.Model, PruneResult]:
    """Prune in ``steps`` rounds, recalibrating on the pruned graph between rounds.

    Each round removes the same share of what is left, so the rounds compound to the
    requested ratio or target; a method's own rule (relief's α, MIPP's confidence,
    relative's τ) is applied in every round, as the papers iterate.  Fidelity, the gate
    and latency of the last round are measured against the original model.
    """
    calib = args.get("calib")
    if calib is None:
        raise InputError("--steps recalibrates between rounds: give --calib")
    if not _rereadable(calib):
        raise InputError(
            "--steps reads the calibration data once per round, and this source can only be read once: "
            "pass a folder, a list, or a CalibrationDataReader with rewind()"
        )
    first: PruneResult | None = None
    step_args = dict(args)
    if args["target_macs"] is not None:
        step_args["target_macs"] = args["target_macs"] ** (1 / steps)
    if args["target_params"] is not None:
        step_args["target_params"] = args["target_params"] ** (1 / steps)
    step_args["ratio"] = 1 - (1 - args["ratio"]) ** (1 / steps)
    current = Path(model_path)
    with tempfile.TemporaryDirectory(prefix="onnxprune-steps-") as d:
        for k in range(steps - 1):
            out = Path(d) / f"step{k + 1}.onnx"
            inter = dict(step_args, eval_data=None, labels=None, max_error=None, min_agreement=None,
                         eval_samples=0, latency=False)
            _, r = prune(current, out, **inter)
            first = first or r
            current = out
        model, result = prune(current, output_path, **step_args, _reference=model_path)
    result.params_before, result.macs_before = first.params_before, first.macs_before
    result.file_size_before = first.file_size_before
    result.ratio = args["ratio"] if args["target_macs"] is None and args["target_params"] is None else result.ratio
    result.steps = steps
    return model, result


def error_sweep(model_path, kwargs: dict, result: PruneResult, points=(0.9, 0.8, 0.7, 0.6, 0.5, 0.4)) -> list:
    """(MACs removed, rel. L2 error, agreement) at several MACs targets with the same options,
    plus the result itself: the error-vs-compression curve of ``--plot``."""
    out = []
    if result.fidelity:
        out.append((1 - result.macs_after / result.macs_before, result.fidelity["rel_l2"], result.fidelity["agreement"]))
    skip = ("ratio", "target_macs", "target_params", "max_error", "min_agreement", "progress")
    args = {k: v for k, v in kwargs.items() if k not in skip}
    for target in points:
        _, r = prune(model_path, None, **args, target_macs=target, latency=False, progress=False)
        if r.fidelity:
            out.append((1 - r.macs_after / r.macs_before, r.fidelity["rel_l2"], r.fidelity["agreement"]))
    return out


def _rereadable(calib: Any) -> bool:
    """Whether the calibration source can be read again (a folder, a list, a rewindable reader)."""
    return isinstance(calib, (str, os.PathLike, list, tuple)) or hasattr(calib, "rewind")


def _flat(removed: dict[int, np.ndarray]) -> np.ndarray:
    return np.concatenate([r for r in removed.values()] or [np.zeros(0, np.int64)]).astype(np.int64)


def _fixed_batch(specs: list[InputSpec], batch_size: int) -> int:
    """A model with a fixed batch dim gets batches of exactly that size."""
    fixed = {s.dims[0] for s in specs if s.dims and s.dims[0] is not None}
    return fixed.pop() if len(fixed) == 1 else batch_size


def _load_labels(labels) -> np.ndarray:
    if isinstance(labels, np.ndarray):
        return labels.reshape(-1)
    p = Path(labels)
    if not p.is_file():
        raise InputError(f"labels file not found: {p}")
    try:
        arr = np.load(p, allow_pickle=False)
    except Exception as exc:
        raise InputError(f"{p}: not a .npy array of labels") from exc
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{p}: labels must be integers, found {arr.dtype}")
    return arr.reshape(-1)


def _gate(fid: Fidelity, max_error: float | None, min_agreement: float | None, force: bool) -> bool:
    """Raise GateError on a violation unless ``force``; True when a violation was forced through."""
    problems = []
    if max_error is not None and fid.rel_l2 > max_error:
        problems.append(f"relative L2 error {fid.rel_l2:.4g} > --max-error {max_error}")
    if min_agreement is not None:
        if fid.agreement is None:
            problems.append("--min-agreement needs a classifier-shaped output [N, K]")
        elif fid.agreement < min_agreement:
            problems.append(f"top-1 agreement {fid.agreement:.4f} < --min-agreement {min_agreement}")
    if problems and not force:
        raise GateError(f"fidelity gate failed on {fid.samples} {fid.source}: {'; '.join(problems)}; nothing written (--force writes anyway)")
    if problems:
        import sys

        print(f"warning: fidelity gate failed ({'; '.join(problems)}); written anyway because of --force", file=sys.stderr)
    return bool(problems)


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
