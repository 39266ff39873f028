"""The stages of a prune, in order, and the state they pass along.

Each stage has a ``name`` (its key in ``PruneResult.seconds``), ``wanted(state)`` (whether
it runs for this configuration) and one ``run(state)``.  The algorithms live in their own
modules (load, groups, calibrate, criteria, select, allocate, rewrite, compensate,
reconstruct, verify); a stage only calls them and keeps what they return in the state.
The driver (:func:`onnxprune.api.run_stages`) times each stage.
"""

from __future__ import annotations

import itertools
import os
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from . import _ort, _temps, checks
from ._ahead import imported_ahead
from ._graph import copy_model, node_label
from .canonical import RESTRUCTURED
from . import allocate as _allocate
from .allocate import allocate, probes_text
from .calibrate import SHARD_BLOCK, GramKey, Statistics, calibrate, providers_for
from .compensate import apply_bias, apply_refits, bias_deltas, lstsq_refits, lstsq_requests
from .config import PruneConfig
from .consumers import ConsumerView, consumer_views
from .count import count_macs, count_params, estimate_after, macs_by_node, symbolic_dims
from .criteria import criterion, score_groups, statistics_for
from .data import InputSpec, Sample, batches, input_specs, samples_in, source_items, take_samples
from .shared_data import index_folder, lazy_batches, read
from .errors import GateError, InputError, VerificationError
from .groups import Analysis, analyze_groups, control_flow_summary, refuse_control_flow_only
from .load import check_output_path, input_files, load_model, save_model
from .methods import Criterion, MethodOptions
from .padding import Padding, find_padding, sorted_batches, trim, trims_exactly
from .reconstruct import RowsRecord, refit_on_pruned, refit_targets
from .result import PruneResult, RefitCounts
from .rewrite import apply_removal
from .progress import bar
from .segments import BatchStore
from .select import round_for, select, select_for_target, target_outcome
from .verify import (Fidelity, Sessions, check_pruned, check_restructured, latency_of_runs, measure_fidelity, original_session,
                     paired_latency, random_feed, run_reference)


@dataclass
class PruneState:
    """What the stages know so far; each stage reads earlier fields and fills its own."""

    model_path: str | os.PathLike
    output_path: str | os.PathLike | None
    config: PruneConfig
    reference_path: str | os.PathLike | None = None  # fidelity/latency baseline (--steps: the original)
    # load
    model: ir.Model | None = None
    external: bool = False
    feed: Any = None  # what the original and the pruned graph are checked on: calibration samples, else synthetic
    reference: Any = None  # the original's outputs on ``feed``
    providers: list | None = None
    # groups
    params_before: int = 0
    macs_before: int = 0
    analysis: Analysis | None = None
    count_shapes: dict[str, tuple[int, ...]] | None = None  # input shapes the MACs are counted on (None: the graph's)
    macs_basis: str = ""  # where those shapes come from (see count_shapes)
    # calibrate
    stats: Statistics | None = None
    held: list = field(default_factory=list)
    specs: list[InputSpec] | None = None  # the model's inputs (set by load when there is calibration data)
    calib_batches: Any = None  # the calibration batches, read once: the first was already the reference feed
    padding: Padding | None = None  # padded sequences sorted and cut (onnxprune.padding), where that is exact
    calib_index: Any = None  # with --ray and a folder: its shared_data.FolderIndex (the batches are recipes)
    store: Any = None  # the kept calibration batches: a BatchStore, or a distributed.RayPool whose workers hold them
    # the plot's error curve: the calibrated state is kept for its points (see sweep_state)
    keep_for_sweep: bool = False
    pristine: Any = None  # a copy of the loaded model, before any rewrite (kept_for_sweep)
    # score / select
    scores: dict[int, np.ndarray] = field(default_factory=dict)
    views: list[ConsumerView] = field(default_factory=list)
    removed: dict[int, np.ndarray] = field(default_factory=dict)  # group id -> removed class roots
    all_removed: np.ndarray | None = None  # every removed class root, over all groups
    ratio: float = 0.0  # the ratio reported: the requested one, or what a target came to
    rule: str = ""
    relaxed: dict[int, int] = field(default_factory=dict)  # group id -> the multiple a target relaxed its alignment to
    # rewrite / compensate
    method_report: dict | None = None
    refits: list = field(default_factory=list)  # least-squares weight refits from the statistics
    deltas: list = field(default_factory=list)  # bias corrections from the statistics
    targets: list = field(default_factory=list)  # consumers refitted again on the pruned graph
    original: ir.Model | None = None  # a copy of the loaded model, run beside the pruned one for that refit
    refit: RefitCounts | None = None
    # verify / report
    measured: dict[str, Any] = field(default_factory=dict)  # fidelity, forced (gate), latency
    written: Path | None = None  # the saved model: the output, or its staged copy (load.one_commit)
    times: dict[str, float] = field(default_factory=dict)
    result: PruneResult | None = None

    # set from the config
    plugin: Criterion = field(init=False)  # the method's registered criterion
    opts: MethodOptions = field(init=False)

    def __post_init__(self) -> None:
        c = self.config
        if self.reference_path is None:
            self.reference_path = self.model_path
        self.ratio = c.ratio
        self.plugin = criterion(c.method)
        # A copy with the run's min_keep and seed: the caller's MethodOptions stay as given.
        self.opts = replace(c.method_options or MethodOptions(), min_keep=c.min_keep, seed=c.seed)


class Stage:
    """One step of the prune: ``run`` reads and fills the state."""

    name = ""

    def wanted(self, state: PruneState) -> bool:
        """Whether this stage runs for the state's configuration (and is timed)."""
        return True

    def run(self, state: PruneState) -> None:
        raise NotImplementedError


class Load(Stage):
    """Parse the model, run the original once (on the first calibration samples, else on a
    synthetic feed honouring ``--input-shape``), pick the providers."""

    name = "load"

    def run(self, state: PruneState) -> None:
        c = state.config
        if state.output_path is not None:
            check_output_path(state.model_path, state.output_path,
                              {"--calib": c.calib, "--eval": c.eval_data, "--labels": c.labels})
        state.model, state.external = load_model(state.model_path)
        refuse_control_flow_only(state.model.graph)  # all weights in If/Loop/Scan bodies: say so before any run
        # The first onnxruntime session on the input: a crash here is named by the CLI's parent.
        _temps.phase("input")
        sess = original_session(state.model_path)
        specs = input_specs(sess)
        checks.input_shapes_fit(c.input_shape, specs)
        if c.calib is not None:
            state.specs = specs
            first = self._open_calibration(state)
            feed = first if fixed_batch(specs, 0) else take_samples(first, slice(None, REFERENCE_SAMPLES))
            state.feed = {k: np.array(v) for k, v in feed.items()}  # a copy: not a view that keeps the whole batch
        else:
            state.feed = random_feed(sess, c.seed, shapes=c.input_shape)
        state.reference = run_reference(sess, state.feed, synthetic=c.calib is None)
        if c.calib is not None:
            pad = find_padding(sess.get_inputs())
            state.padding = pad if pad is not None and trims_exactly(sess, first, pad) else None
        del sess
        _temps.phase("pruning")
        state.count_shapes, state.macs_basis = count_shapes(specs, c.input_shape, state.feed if c.calib is not None else None)
        if state.model.graph.meta.get(RESTRUCTURED):
            check_restructured(state.model, state.feed, state.reference)
        state.providers = providers_for(c.device)
        if state.keep_for_sweep:
            state.pristine = copy_model(state.model)

    @staticmethod
    def _open_calibration(state: PruneState) -> Sample:
        """Start reading the calibration data: its first batch is returned for the reference
        run and stays at the head of ``state.calib_batches``, which calibrate reads on (the
        source is read once)."""
        c, specs = state.config, state.specs
        if c.ray and isinstance(c.calib, (str, os.PathLike)) and Path(c.calib).is_dir():
            # Ray workers may read their own batches from the folder: recipes here, the
            # arrays only of the first batch (the reference run).
            index = state.calib_index = index_folder(os.path.abspath(c.calib), specs, c.preprocess)
            it = lazy_batches(index, fixed_batch(specs, c.batch_size), c.max_samples)
            first = next(it)
            state.calib_batches = itertools.chain([first], it)
            return read(index, first)
        it = batches(source_items(c.calib, specs, c.preprocess)(), specs, fixed_batch(specs, c.batch_size), c.max_samples)
        first = next(it)
        state.calib_batches = itertools.chain([first], it)
        return first


class Analyze(Stage):
    """Count the original and find the channel groups; refuse a model with none prunable."""

    name = "groups"

    def run(self, state: PruneState) -> None:
        # load_model already folded constant index arithmetic and static shape reads and
        # inferred shapes (the MACs need them); the analysis changes nothing these count.
        table = macs_by_node(state.model, state.count_shapes)  # on real input shapes when the run knows them
        state.params_before, state.macs_before = count_params(state.model), int(sum(table.values()))
        analysis = state.analysis = analyze_groups(state.model, state.config.exclude)
        analysis.node_macs = table  # the selection's estimates count what the report counts
        if not any(g.prunable for g in analysis.groups):
            refuse_control_flow_only(state.model.graph, any_prunable=False)
            reasons = [r for g in analysis.groups for r in g.blocked][:1]
            why = f" (first reason: {reasons[0]})" if reasons else ""
            raise InputError(f"nothing to prune: none of the {len(analysis.groups)} channel groups is prunable{why}")


class Calibrate(Stage):
    """Run the calibration data through the instrumented original: statistics, held-out
    samples, the probe samples and (for the refit) the batches themselves."""

    name = "calibrate"

    def wanted(self, state: PruneState) -> bool:
        return state.config.calib is not None

    def run(self, state: PruneState) -> None:
        c = state.config
        specs, bs = state.specs, fixed_batch(state.specs, c.batch_size)
        views = consumer_views(state.analysis)
        # The calibrated batches, kept for the refit's passes: the source is read once.  On
        # Ray the workers keep them, each its shard (distributed.RayPool).
        pool = None
        last: dict = {}  # the last calibration file the driver read itself (shared_data.read)
        if c.ray:
            from .distributed import RayPool  # Ray is an extra: imported only when asked for

            pool = state.store = RayPool(c.ray, c.workers)
            index = state.calib_index
            if index is not None and state.padding is not None:  # sorting by length takes the arrays
                pool.data_note = "read by the driver: its padded sequences are sorted by length"
                state.calib_batches = (read(index, b, last) for b in state.calib_batches)
            elif index is not None and not pool.use_folder(index):  # the workers cannot read it: the driver does
                state.calib_batches = (read(index, b, last) for b in state.calib_batches)
        elif c.compensate != "none":
            # The kept batches: three sixteenths of the budget in memory, the rest spilled.
            # (A quarter kept a large calibration set's prune above 1.2 times a small one's
            # peak once the refit's segment cache held onnxruntime's outputs in its arena
            # instead of copies: RESULTS "Cost".)
            state.store = BatchStore(3 * c.memory_budget // 16)
            # The refit's original side, recorded as calibration runs the original: a quarter
            # of the budget in memory, and the rest spilled.  (Three eighths kept a large
            # calibration set's prune above 1.2 times a small one's peak once the small one's
            # record had halved: RESULTS "Cost".)
            state.store.rows = RowsRecord(c.memory_budget // 4)
        with imported_ahead("scipy.linalg", "scipy.special"):  # the solves' and the bias fit's, later
            state.stats, state.held = calibrate(
                state.model, {v.tensor: (v.value, v.axis) for v in views}, state.calib_batches,
                batch_size=bs, providers=state.providers, memory_budget=c.memory_budget,
                progress=c.progress, total=c.max_samples, hold_out=0 if c.eval_data is not None else c.eval_samples,
                fixed_batch=any(sp.dims and sp.dims[0] is not None for sp in specs), requests=self._requests(state, views),
                statistics=statistics_for(c.method),
                keep=_allocate.PROBE_SAMPLES if c.target is not None and not c.global_ else 0,  # the allocation's probes
                record=None if pool is not None else state.store, pool=pool, padding=state.padding,
            )
        if state.calib_index is not None:  # the driver's own samples: verification's and the probes'
            state.held = [read(state.calib_index, b, last) for b in state.held]
            state.stats.kept = [read(state.calib_index, b, last) for b in state.stats.kept]

    @staticmethod
    def _requests(state: PruneState, views: list[ConsumerView]) -> list:
        """The method's extra statistics, and the lstsq refit's Gram sums."""
        requests = state.plugin.requests(state.analysis, views, state.opts)
        if state.config.compensate == "lstsq":  # the same Gram statistics once, when the method asks for them too
            asked = {r.key for r in requests}
            requests = requests + [r for r in lstsq_requests(state.analysis) if r.key not in asked]
        record = getattr(state.store, "rows", None)
        if record is not None:
            requests = requests + record.requests(state.analysis, relu_only=state.config.compensate == "bias")
        return requests


class Score(Stage):
    """Score every prunable group's channel classes with the method."""

    name = "score"

    def run(self, state: PruneState) -> None:
        c = state.config
        state.scores = score_groups(state.analysis, c.method, c.seed, state.stats, state.opts)


class Select(Stage):
    """Choose the removed classes: by ratio, by a method's own rule, or to meet a target."""

    name = "select"

    def run(self, state: PruneState) -> None:
        c, plugin = state.config, state.plugin
        state.views = consumer_views(state.analysis)
        state.rule = f"global ratio {c.ratio:.3g}" if c.global_ else f"ratio {c.ratio:.3g}"
        if c.target is not None:
            state.rule = f"target {'MACs' if c.target_macs is not None else 'params'} {c.target:.3g}"
            self._for_target(state)
        elif plugin.own_rule(state.opts):
            state.removed = plugin.select(state.analysis, state.stats, state.views, state.opts, state.analysis.groups)
            state.rule = f"{c.method}'s own rule"
        else:
            state.removed = select(state.analysis.groups, state.scores, c.ratio, global_=c.global_,
                                   min_keep=c.min_keep, round_to=c.round_to)
        state.all_removed = flat(state.removed)

    @staticmethod
    def _for_target(state: PruneState) -> None:
        """The method's own budget knob, else the measured allocation (with calibration
        data), else the global-threshold bisection."""
        c, analysis, stats, plugin = state.config, state.analysis, state.stats, state.plugin
        pick = 1 if c.target_macs is not None else 0
        base = state.macs_before if c.target_macs is not None else state.params_before

        def kept_fraction(sel: dict[int, np.ndarray]) -> float:
            return estimate_after(analysis, flat(sel))[pick] / max(base, 1)

        own = plugin.select_budget(analysis, stats, state.views, state.opts, analysis.groups, kept_fraction, c.target)
        if own is not None:
            state.removed, state.ratio = own
        elif stats is not None and stats.kept:
            with bar("probing groups", c.progress) as tick:
                state.removed, probe = allocate(analysis, state.scores, stats, kept_fraction, c.target,
                                                compensate=c.compensate, providers=state.providers, min_keep=c.min_keep,
                                                round_to=c.round_to, memory_budget=c.memory_budget, progress=tick,
                                                pool=state.store if hasattr(state.store, "probe") else None,
                                                padding=state.padding)
            prunable = sum(len(g.classes) for g in analysis.groups if g.prunable)
            state.ratio = len(flat(state.removed)) / max(prunable, 1)
            state.relaxed = probe["relaxed"]
            state.rule += f", allocated by measured sensitivity ({probes_text(probe)})"
        else:
            state.removed, state.ratio, state.relaxed = select_for_target(
                analysis.groups, state.scores, kept_fraction, c.target, min_keep=c.min_keep, round_to=c.round_to)


class Rewrite(Stage):
    """Fit the compensation on the original's statistics, then remove the channels."""

    name = "rewrite"

    def run(self, state: PruneState) -> None:
        c, analysis, stats, removed = state.config, state.analysis, state.stats, state.all_removed
        state.method_report = state.plugin.pre_rewrite(analysis, stats, state.views, state.opts, removed)
        if stats is not None and c.compensate == "bias":
            state.deltas = bias_deltas(analysis, stats, removed)
            # consumers feeding a Relu: keep the post-ReLU mean
            state.targets = refit_targets(analysis, removed, relu_only=True)
        elif stats is not None and c.compensate == "lstsq":
            state.targets = refit_targets(analysis, removed)
            # The refit on the pruned graph (Compensate, with the kept batches) fits its
            # targets again before anything reads their outputs: their first fit is skipped.
            later = [t.node for t in state.targets] if state.store is not None else []
            state.refits, state.deltas = lstsq_refits(analysis, stats, removed, refit_later=later)
            if not state.keep_for_sweep:
                # The Gram sums served the selection and this first refit; nothing reads them
                # after, and on a wide model they are the largest statistics (a 3072-wide
                # input's is 75 MB) held through the refit.
                for key in [k for k in stats.extra if isinstance(k, GramKey)]:
                    del stats.extra[key]
        # The refit runs the original graph beside the pruned one: a copy, not a second parse
        # and normalisation of the file.
        if state.targets and state.store is not None:
            state.original = copy_model(state.model)
        apply_removal(analysis, removed)


class Compensate(Stage):
    """Apply the fitted compensation, then refit consumers on the pruned graph's inputs."""

    name = "compensate"

    def run(self, state: PruneState) -> None:
        if state.deltas or state.refits:
            apply_bias(state.analysis, state.deltas, state.all_removed)
            apply_refits(state.analysis, state.refits, state.all_removed)  # every shape stays as the rewrite left it
        if state.original is not None:
            self._refit(state)
        if state.store is not None and not state.keep_for_sweep:  # else the sweep's points replay it
            state.store.close()

    @staticmethod
    def _refit(state: PruneState) -> None:
        bias_only = state.config.compensate == "bias"
        with bar("refitting, wave by wave", state.config.progress) as tick:
            # The kept batches hold a quarter of the budget: the two graphs' caches share the rest.
            n_ls, n_bias = refit_on_pruned(
                state.targets, state.original, state.model, state.store, providers=state.providers,
                memory_budget=state.config.memory_budget * 3 // 4, modes=("bias",) if bias_only else ("lstsq", "bias"),
                progress=tick,
            )
        if bias_only:
            state.refit = RefitCounts(post_relu=n_bias, bias_only=True)
            return
        n_zeros = sum(t.keep_zeros and t.mode == "bias" for t in state.targets)
        state.refit = RefitCounts(lstsq=n_ls, bias=n_bias - n_zeros, keep_zeros=n_zeros)


class Verify(Stage):
    """Write the pruned model (to a temp folder without an output path) only after it
    passes the checks, the fidelity gate; measure the latency on the written file."""

    name = "verify"

    def run(self, state: PruneState) -> None:
        labels = None if state.config.labels is None else load_labels(state.config.labels)
        validate = lambda path: self._validate(state, path, labels)  # noqa: E731
        try:
            if state.output_path is not None:
                state.written = save_model(state.model, state.output_path, external=state.external, validate=validate)
            else:
                with tempfile.TemporaryDirectory(prefix="onnxprune-") as d:
                    save_model(state.model, Path(d) / "pruned.onnx", external=state.external, validate=validate)
        except VerificationError as exc:
            raise VerificationError(blame(state.model_path, state.config.exclude, state.removed, str(exc),
                                          state.feed, state.reference)) from exc

    @staticmethod
    def _validate(state: PruneState, path: Path, labels: np.ndarray | None) -> None:
        c, held = state.config, state.held
        sessions = Sessions()  # one per graph variant: the check, the fidelity and the latency share them
        check_pruned(path, state.feed, state.reference, sessions)
        fid = None
        if c.eval_data is not None or held:
            if c.eval_data is not None:
                specs = state.specs or input_specs(sessions(state.model_path))
                # Read by several threads: nothing else runs while a batch is read here (in
                # calibration the reading overlaps the runs and folds instead).
                eval_iter = batches(source_items(c.eval_data, specs, c.preprocess, workers=min(4, os.cpu_count() or 1))(),
                                    specs, fixed_batch(state.specs or [], c.batch_size))
                source = "eval data"
            else:
                eval_iter, source = iter(held), "held-out calibration samples"
            if state.padding is not None and labels is None:
                eval_iter = sorted_batches(eval_iter, state.padding, SHARD_BLOCK)
            elif state.padding is not None:  # the labels follow the samples' order: cut, not sorted
                eval_iter = (trim(b, state.padding) for b in eval_iter)
            fid = measure_fidelity(state.reference_path, path, eval_iter, labels, state.providers, sessions)
            fid.source = source
            state.measured["fidelity"] = fid
            state.measured["forced"] = gate(fid, c.max_error, c.min_agreement, c.force)
        if c.latency:
            # The fidelity runs timed both models already, on onnxruntime's CPU as the report says.
            cpu = list(state.providers or ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
            state.measured["latency"] = (fid is not None and cpu and latency_of_runs(fid.run_times)) or paired_latency(
                state.reference_path, path, held[0] if held else state.feed, sessions=sessions)


class Report(Stage):
    """Build the :class:`PruneResult` (counts, kept channels per group, timings so far)."""

    name = "report"

    def run(self, state: PruneState) -> None:
        c, model, stats = state.config, state.model, state.stats
        fid, lat = state.measured.get("fidelity"), state.measured.get("latency")
        state.result = PruneResult(
            method=c.method,
            ratio=state.ratio,
            params_before=state.params_before,
            params_after=count_params(model),
            macs_before=state.macs_before,
            macs_after=count_macs(model, state.count_shapes),
            macs_input_shapes=None if state.count_shapes is None else {k: list(v) for k, v in state.count_shapes.items()},
            macs_basis=state.macs_basis,
            macs_symbolic=symbolic_dims(model) if state.macs_basis == "per unit" else None,
            macs_excluded=control_flow_summary(model.graph),
            groups=self._groups(state),
            output=str(state.output_path) if state.output_path is not None else None,
            file_size_before=file_size(state.model_path, state.external),
            file_size_after=file_size(state.written, state.external) if state.written is not None else None,
            # The stages before this one: the report's own time is not part of the result.
            seconds={k: round(v, 4) for k, v in state.times.items()},
            compensation=c.compensate if stats is not None else "none",
            compensation_note=state.refit.note() if state.refit else None,
            refit=state.refit.to_dict() if state.refit else None,
            calibration=None if stats is None else self._calibration(stats, state.held, state.padding),
            fidelity=None if fid is None else fid.to_dict(),
            latency=None if lat is None else {"before_s": lat[0], "after_s": lat[1],
                                               "speedup": lat[0] / lat[1] if lat[1] else None},
            gate_forced=bool(state.measured.get("forced")),
            method_report=state.method_report,
            selection=state.rule,
            distributed=state.store.summary() if hasattr(state.store, "summary") else None,
        )
        state.result.target = self._target(state)

    @staticmethod
    def _groups(state: PruneState) -> list[dict]:
        """Each group's report entry, with its kept channels and dead (never active) ones."""
        groups = []
        for g in state.analysis.groups:
            d = g.to_dict()
            d["kept"] = int(len(g.classes) - len(state.removed.get(g.id, ())) + (g.n_channels - len(g.classes)))
            if g.id in state.scores:
                d["dead"] = int(np.isneginf(state.scores[g.id]).sum())
            groups.append(d)
        return groups

    @staticmethod
    def _target(state: PruneState) -> dict | None:
        """Requested vs achieved, by the counts of the pruned model, for a target."""
        c, r = state.config, state.result
        if c.target is None:
            return None
        kind = "MACs" if c.target_macs is not None else "params"
        achieved = r.macs_after / max(r.macs_before, 1) if kind == "MACs" else r.params_after / max(r.params_before, 1)
        by_id = {g.id: g for g in state.analysis.groups}
        relaxed = {gid: (round_for(by_id[gid], c.round_to), a) for gid, a in state.relaxed.items()}
        return target_outcome(kind, c.target, achieved, relaxed)

    @staticmethod
    def _calibration(stats: Statistics, held: list, padding: Padding | None) -> dict:
        return {
            "samples": stats.samples, "seconds": round(stats.seconds, 4), "runs_per_batch": stats.runs_per_batch,
            "tensors": len(stats.tensors), "held_out": sum(samples_in(b) for b in held),
            "padding_cut_by": None if padding is None else padding.mask,
        }


PIPELINE: tuple[Stage, ...] = (Load(), Analyze(), Calibrate(), Score(), Select(), Rewrite(), Compensate(), Verify(), Report())
"""Every stage of a prune, in the order they run."""
SWEEP_STAGES: tuple[Stage, ...] = PIPELINE[1:2] + PIPELINE[3:]
"""The stages of one point of the plot's error curve: loading and calibration are shared."""

# What one point of the error curve shares with the prune it belongs to (read only).
_SHARED = ("external", "feed", "reference", "providers", "count_shapes", "macs_basis", "stats", "held", "specs",
           "store", "keep_for_sweep", "padding")


def sweep_state(base: PruneState, config: PruneConfig) -> PruneState:
    """A state for one point of the error curve: ``base``'s loading and calibration (it
    ran with ``keep_for_sweep``), a fresh copy of the loaded model, no output."""
    state = PruneState(base.model_path, None, config, reference_path=base.reference_path)
    for name in _SHARED:
        setattr(state, name, getattr(base, name))
    state.model = copy_model(base.pristine)
    return state


def flat(removed: dict[int, np.ndarray]) -> np.ndarray:
    """Every group's removed class roots in one int64 array."""
    return np.concatenate([r for r in removed.values()] or [np.zeros(0, np.int64)]).astype(np.int64)


# Samples of the first calibration batch the original and the pruned graphs are checked on.
REFERENCE_SAMPLES = 2


def count_shapes(specs: list[InputSpec], input_shape: dict[str, tuple[int, ...]] | None,
                 sample: Sample | None) -> tuple[dict[str, tuple[int, ...]] | None, str]:
    """The input shapes MACs are counted on, and their source: a calibration sample's
    shapes, overridden by ``--input-shape``; a symbolic leading dim of an input of rank 2 or
    more (the batch) counts as 1, so MACs stay per sample.  Without either: None, and
    ``"declared shapes"``, or ``"per unit"`` when a non-batch dim is symbolic."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        dims = input_shape.get(spec.name) if input_shape else None
        if dims is None and sample is not None:
            dims = tuple(np.shape(sample[spec.name]))
        if dims is None:
            continue
        ax = spec.batch_axis
        if len(dims) >= 2 and spec.dims[ax] is None:
            dims = (*dims[:ax], 1, *dims[ax + 1:])
        shapes[spec.name] = tuple(int(d) for d in dims)
    if shapes:
        basis = "--input-shape" if sample is None else ("calibration data" if not input_shape else "calibration data, --input-shape")
        return shapes, basis
    symbolic = any(d is None and not (i == 0 and len(s.dims) >= 2) for s in specs for i, d in enumerate(s.dims))
    return None, "per unit" if symbolic else "declared shapes"


def fixed_batch(specs: list[InputSpec], batch_size: int) -> int:
    """A model with a fixed batch dim gets batches of exactly that size."""
    fixed = {s.dims[s.batch_axis] for s in specs if s.dims and s.dims[s.batch_axis] is not None}
    return fixed.pop() if len(fixed) == 1 else batch_size


def load_labels(labels: str | os.PathLike | np.ndarray) -> np.ndarray:
    """The integer labels of the evaluation samples, flat."""
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


def gate(fid: Fidelity, max_error: float | None, min_agreement: float | None, force: bool) -> bool:
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
        print(f"warning: fidelity gate failed ({'; '.join(problems)}); written anyway because of --force", file=sys.stderr)
    return bool(problems)


def file_size(path: str | os.PathLike, external: bool) -> int:
    """Bytes of the model file and, when ``external``, the data files it names."""
    files = input_files(path) if external else [Path(path)]
    return sum(f.stat().st_size for f in files if f.is_file())


def blame(model_path: str | os.PathLike, exclude: tuple[str, ...], removed: dict[int, np.ndarray], message: str,
          feed: dict[str, np.ndarray], reference: list[np.ndarray]) -> str:
    """Find the first group whose removal alone breaks the graph, to name it: each group
    pruned alone is checked on the run's own reference ``feed`` and outputs."""
    for gid, classes in sorted(removed.items()):
        if not len(classes):
            continue
        model, _ = load_model(model_path)
        analysis = analyze_groups(model, exclude)
        apply_removal(analysis, classes)
        group = next(g for g in analysis.groups if g.id == gid)
        try:
            with tempfile.TemporaryDirectory(prefix="onnxprune-") as d:
                save_model(model, Path(d) / "p.onnx", external=False, validate=lambda p: check_pruned(p, feed, reference))
        except VerificationError as exc:
            names = ", ".join(node_label(n) for n in group.producers)
            return f"pruning group {gid} ({names}) broke the graph: {exc}; exclude it with --exclude"
    return f"pruned graph failed verification: {message}"
