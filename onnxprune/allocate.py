"""Budget allocation by measured sensitivity (the select stage, for ``--target-macs`` and
``--target-params`` with calibration data): how many channels each group gives up.

A *probe graph* emulates any selection in one onnxruntime run.  Every consumer (a
Conv/Gemm/MatMul reading a prunable group's channels) sees ``x' = P·x + c`` over the
channel axis, with P and c chosen per run: the identity for kept channels, and for removed
ones what the compensation will put in their place at that consumer.  It is fed as a mask
and a constant before the consumer (``m ⊙ x + c``), and, where P mixes channels, as the
consumer's weight ``W·(P + diag(removed))`` (see :class:`_Site`), never as a channel mix in
the graph:

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
error); three rungs of a ladder are planned, the others interpolated, and the planned ones
run in rounds, only as far as the allocation reaches (:class:`_Probes`).  Damages of
different groups are taken as additive, and a Lagrangian allocation picks one ladder rung
per group: the rung minimising ``damage − λ·saving`` for each group, λ bisected until the MACs (params)
estimate meets the target, then rungs are given back greedily while the target still
holds, each group a step of its alignment at a time; where that leaves the target out of
the band (``select.TOLERANCE``), single groups' alignment is relaxed (``select.fit_band``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import onnx_ir as ir

from .calibrate import GramKey, InputRef, Statistics
from ._graph import const_array, model_proto
from .compensate import _taps, enough_rows, ridged, rows_to_weight, weight_rows
from .data import samples_in, take_samples
from .gram import solve_spd_fast
from .consumers import ConsumerView, consumer_views
from .groups import Analysis, Group
from . import _ort
from ._signals import deferred
from .segments import SegmentPass, const_cone, node_reads, view_bytes, view_message, with_cone
from .temporary import temporary_changes
from .select import choose, fit_band, round_for
from .padding import Padding, sorted_batches
from .rewrite import removed_mask

LADDER = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)  # removed shares probed per group
# Calibration samples the probes run on (their cost does not grow with the calibration set).
# 16 chose as well on EfficientNet-Lite0 and MiniLM, but their noisier damages moved channels
# between two Convs of the Keras CIFAR-10 CNN (RESULTS "The Keras CIFAR-10 CNN"); 24 chose
# as well as 32 on the small models' grids and on EfficientNet-Lite0's held-out crops, for a
# quarter less of the probes' runs (RESULTS "The allocation's probes, A against B").
PROBE_SAMPLES = 24
PROBE_CHUNK = 8  # samples per probe run: the same batches whatever the number of workers sharing them
TAIL_SHARE = 8  # tails built ahead while two of them hold at most 1/TAIL_SHARE of the budget
# Planned rungs (_probed) each ladder runs in the probes' first round; the others run only
# where the allocation reaches them (_Probes).  Running all three chose the very same
# channels on EfficientNet-Lite0 and MiniLM for 1.7 times the rungs (RESULTS "Cost").
# Without compensation every planned rung runs at once: a removal's mean shift silences
# activations downstream, the damage saturates, and the linear extrapolation overstated
# it (RESULTS "The allocation's probes, A against B"); a ladder whose lstsq emulation
# starts predicting only at a later rung runs every planned rung up to it (_Probes.first).
EAGER = 1
Rungs = dict[int, list[tuple[np.ndarray, float, float]]]  # group id -> (removal, damage, saving) per rung


@dataclass
class _Site:
    """One consumer input rewritten by the probe graph.

    The probe feeds ``x̃ = m ⊙ x + c`` (m: the kept-channel mask, c: the removed channels'
    constant) and, where the removed channels are predicted from the kept ones (lstsq),
    the consumer's weight ``W·P̃`` in place of ``W`` (``P̃ = P + diag(removed)``): then
    ``W P̃ x̃ = W (P x + c)`` exactly, since ``P`` ignores removed inputs and ``P̃`` passes
    ``c`` through.  A channel-mixing ``P·x`` before the consumer would cost C/O times the
    consumer itself (6× for an inverted residual's projection)."""

    view: ConsumerView
    name: str  # prefix of the graph inputs fed per run: {name}_m (mask), {name}_c, {name}_w (weight)
    shape: list[int]  # as fed: m and c (C along the channel axis, 1 elsewhere)
    mean: np.ndarray
    gram: Any  # the lstsq Gram statistics of the input (a ChannelGram), or None
    rows: float  # sampled rows behind the Gram statistics
    second: np.ndarray | None = None  # per channel: what a removal loses there (variance, or E[x²] without compensation)
    mixes: bool = False  # removed channels are predicted from the kept ones: the weight is fed too
    _weight: np.ndarray | None = None  # the consumer's weight, read once a group
    _energy: np.ndarray | None = None  # per channel: Σ of the consumer's squared weights
    _cov: np.ndarray | None = None

    @property
    def cov(self) -> np.ndarray | None:
        """The channel covariance (lstsq), formed when first read and kept until
        :meth:`forget`: a wide input's C×C would otherwise live through every group's probes."""
        if self._cov is None and self.gram is not None:
            self._cov = _channel_gram(self.gram)[0]
        return self._cov

    def forget(self) -> None:
        """Drop what the site formed for one group's probes (formed again if read)."""
        self._cov = self._weight = None

    def local_error(self, drop: np.ndarray) -> float:
        """Σ over dropped channels of ‖W[:, c]‖² · ``second[c]``: the error the removal puts
        on the consumer's output, cross terms and the compensation's prediction left out."""
        if self._energy is None:
            w = weight_rows(self.view)
            w = w.reshape(w.shape[0], len(drop), -1)
            self._energy = np.einsum("oct,oct->c", w, w)
        return float(np.sum(self._energy[drop] * self.second[drop]))


def _channel_gram(gram) -> tuple[np.ndarray, np.ndarray]:
    """Channel covariance and mean of a ChannelGram, or of the centre tap of a PatchGram."""
    cov, mu = gram.covariance(), gram.mean()
    kernel = getattr(gram, "kernel", None)
    if kernel is not None:
        idx = _centre(gram, np.arange(len(mu)))
        cov, mu = cov[np.ix_(idx, idx)], mu[idx]
    return cov, mu


def _centre(gram, per_column: np.ndarray) -> np.ndarray:
    """``per_column`` (one value per Gram column) at each channel's centre tap (a
    PatchGram's columns are channel-major: c·taps + tap); as is for a ChannelGram."""
    kernel = getattr(gram, "kernel", None)
    if kernel is None:
        return per_column
    taps = int(np.prod(kernel))
    return per_column[np.arange(len(per_column) // taps) * taps + taps // 2]


class _Tails:
    """The probe runs of the allocation: for each group, the part of the graph from its
    first consumer on (its *tail*), with ``x' = P·x + c`` inserted before that group's
    consumers only, run on the original's tensors at the cut.  Those come from one run of
    the original graph over the probe samples (:class:`ProbeFeeds`), so nothing before a
    group's consumers runs again for its rungs.  ``sites``: per group probed, its sites
    (what the tails cut at)."""

    def __init__(self, analysis: Analysis, samples: list, providers: list[str], budget: int,
                 sites: list[list[_Site]], pool=None, padding: Padding | None = None) -> None:
        self.model = analysis.model
        self.graph = analysis.model.graph
        # A model with a fixed batch dim takes its batches whole.
        fixed = any(v.shape is not None and len(v.shape) and isinstance(v.shape[0], int) for v in self.graph.inputs)
        self.samples = samples if fixed else chunks(samples, PROBE_CHUNK)
        if padding is not None and not fixed:  # sorted by length and cut, as the calibrated batches
            self.samples = list(sorted_batches(self.samples, padding, len(self.samples)))
        self.providers = providers
        self.budget = budget
        self.order = {id(n): i for i, n in enumerate(self.graph)}
        self.cone = const_cone(self.graph)
        self.runs = 0
        self.pool = pool
        self._plans: dict[tuple[int, ...], tuple[list[ir.Node], list[ir.Value]]] = {}
        cuts = list(dict.fromkeys(v.name for group in sites for v in self.plan(group)[1]))
        if pool is not None:  # the workers share the chunks, each with its feeds and outputs
            self.passes = None
            self.scale = pool.probe_start(model_proto(self.model).SerializeToString(), self.samples, providers, budget,
                                          cuts) or 1.0
            return
        self.passes = ProbeFeeds(self.model, self.samples, providers, budget, cuts)
        self.y0 = self.passes.y0
        self.scale = self.passes.scale or 1.0  # all-zero outputs: damages stay absolute

    def close(self) -> None:
        if self.pool is not None:
            self.pool.probe_end()
        else:
            self.passes.close()

    def plan(self, sites: list[_Site]) -> tuple[list[ir.Node], list[ir.Value]]:
        """The tail of ``sites`` (nodes that read, directly or not, a site consumer's
        output, and the consumers) and the tensors it reads from before the cut; planned
        once per group (the feeds' cuts, then every round's runs, read it)."""
        key = tuple(id(s) for s in sites)
        if key not in self._plans:
            self._plans[key] = self._plan(sites)
        return self._plans[key]

    def _plan(self, sites: list[_Site]) -> tuple[list[ir.Node], list[ir.Value]]:
        starts = {id(s.view.node) for s in sites}
        inside: set[int] = set()
        nodes = []
        for node in self.graph:
            reads = node_reads(node)
            if id(node) in starts or any(id(v) in inside for v in reads):
                nodes.append(node)
                inside.update(id(o) for o in node.outputs)
        nodes = with_cone(self.graph, nodes, self.cone)
        inside.update(id(o) for n in nodes for o in n.outputs)
        frontier = {v.name: v for n in nodes for v in node_reads(n)
                    if id(v) not in inside and not (v.producer() is None and v.const_value is not None and not v.is_graph_input())}
        return nodes, list(frontier.values())

    def tail(self, sites: list[_Site], nodes: list[ir.Node], frontier: list[ir.Value]):
        """The tail, with m, c (and the mixing sites' weights) fed per run at each site
        (graph restored): an onnxruntime session, or for the pool's workers a serialised
        model."""
        got = self._tail_message(sites, nodes, frontier)
        return got if self.pool is not None else _ort.session(got[0], self.providers, initializers=got[1])

    def building(self) -> _Builder:
        """``with tails.building() as build``: ``build(sites)`` serialises the group's
        tail now (the graph changes while it does) and has onnxruntime create its session
        in a thread, one at a time, so it is built while the group before runs its rungs
        (see :meth:`_Builder.build` for when it waits instead); hand the result to
        :meth:`damages_fn`.  Leaving waits for a build under way."""
        return _Builder(self)

    def _tail_message(self, sites: list[_Site], nodes: list[ir.Node], frontier: list[ir.Value]):
        """:meth:`tail` before onnxruntime: the pool's serialised model, or
        ``segments.view_message``'s pair; sets ``self.outputs``."""
        f32 = ir.TensorType(ir.DataType.FLOAT)
        added: dict[int, list[ir.Node]] = {}
        params: list[ir.Value] = []
        with temporary_changes(self.graph) as changes:
            for s in sites:
                node = s.view.node
                m = ir.Value(name=f"{s.name}_m", shape=ir.Shape(s.shape), type=f32)
                cb = ir.Value(name=f"{s.name}_c", shape=ir.Shape(s.shape), type=f32)
                mul = ir.node("Mul", [s.view.value, m])
                add = ir.node("Add", [mul.outputs[0], cb])
                mul.outputs[0].name, add.outputs[0].name = f"{s.name}_mul", f"{s.name}_out"  # detached: unnamed
                added.setdefault(id(node), []).extend([mul, add])
                params += [m, cb]
                changes.swap_input(node, 0, add.outputs[0])
                if s.mixes:
                    w = node.inputs[1]
                    fed = ir.Value(name=f"{s.name}_w", shape=ir.Shape(list(w.shape)), type=w.type)
                    params.append(fed)
                    changes.swap_input(node, 1, fed)
            ordered = [m for n in nodes for m in added.get(id(n), []) + [n]]
            produced = {id(o) for n in nodes for o in n.outputs}
            self.outputs = [o for o in self.graph.outputs if id(o) in produced]
            if self.pool is not None:
                return view_bytes(self.model, frontier + params, self.outputs, ordered)
            return view_message(self.model, frontier + params, self.outputs, ordered)

    def damages_fn(self, sites: list[_Site], analysis: Analysis, compensate: str, built: Any = None):
        """``removals -> damages`` for a group whose consumers are ``sites``: per removal,
        ‖y − y₀‖² / ‖y₀‖² over every output and probe sample (the square of verify's
        relative L2 error), with the removal emulated at the sites.  ``built``: the
        group's tail from :meth:`building`'s ``build`` (else it is built when called)."""
        nodes, frontier = self.plan(sites)
        names = [v.name for v in frontier]

        def damages(removals: list[np.ndarray]) -> list[float]:
            params = [self._params(sites, analysis, compensate, r) for r in removals]
            self.runs += len(removals) * len(self.samples)
            if built is None:
                tail, outs = self.tail(sites, nodes, frontier), [o.name for o in self.outputs]
            else:
                tail, outs = built[0](), built[1]
            if self.pool is not None:
                return [d / self.scale for d in self.pool.probe(names, tail, outs, params)]
            cached = self.passes.get(names)
            return [d / self.scale for d in squared_errors(tail, self.providers, outs, self.y0,
                                                             [{n: cached[n][b] for n in names} for b in range(len(self.samples))], params)]

        return damages

    def outputs(self, sites: list[_Site], analysis: Analysis, compensate: str, removed: np.ndarray) -> list[dict]:
        """The model's outputs per probe batch with ``removed`` emulated at ``sites`` (in
        this process): what the damages are computed from."""
        nodes, frontier = self.plan(sites)
        names = [v.name for v in frontier]
        sess = self.tail(sites, nodes, frontier)
        outs = [o.name for o in self.outputs]
        cached = self.passes.get(names)
        params = self._params(sites, analysis, compensate, removed)
        return [dict(zip(outs, sess.run(outs, {n: cached[n][b] for n in names} | params))) for b in range(len(self.samples))]

    @staticmethod
    def _params(sites: list[_Site], analysis: Analysis, compensate: str, removed: np.ndarray) -> dict[str, np.ndarray]:
        """The fed m, c (and mixed weights) that emulate ``removed`` at the sites."""
        gone = removed_mask(analysis, removed)
        params = {}
        for s in sites:
            drop = gone[analysis.roots[s.view.atoms]]
            pred, c = _prediction(s, drop, compensate)
            params[f"{s.name}_m"] = (~drop).astype(np.float32).reshape(s.shape)
            params[f"{s.name}_c"] = c.reshape(s.shape)
            if s.mixes:
                params[f"{s.name}_w"] = _mixed_weight(s, drop, pred)
        return params


class _Builder:
    """See :meth:`_Tails.building`."""

    def __init__(self, tails: _Tails) -> None:
        self.tails = tails
        self.threads = None  # the session builder (none where the Ray pool's workers build)
        self.running = 0  # bytes of the tail built before the next one

    def __enter__(self) -> Callable[[list[_Site]], Any]:
        if self.tails.pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self.threads = ThreadPoolExecutor(1, thread_name_prefix="onnxprune-tail")
        return self.build

    def build(self, sites: list[_Site]) -> tuple[Callable[[], Any], list[str]]:
        """(a call that returns the tail, waiting for its session; its output names).  A
        tail is built ahead only while it and the one running hold at most an eighth of
        the budget in weights (twice: onnxruntime's prepacked copy): a transformer's early
        tails hold most of the model; those are built when their group runs."""
        tails = self.tails
        got = tails._tail_message(sites, *tails.plan(sites))
        outs = [o.name for o in tails.outputs]
        if self.threads is None:
            return (lambda: got), outs
        size, running = 2 * sum(a.nbytes for a in got[1].values()), self.running
        self.running = size
        if size + running > tails.budget // TAIL_SHARE:
            return (lambda: _ort.session(got[0], tails.providers, initializers=got[1])), outs
        return self.threads.submit(_ort.session, got[0], tails.providers, got[1]).result, outs

    def __exit__(self, *exc) -> bool:
        if self.threads is not None:
            with deferred():  # a stop signal waits for the build under way, then unwinds
                self.threads.shutdown(wait=True, cancel_futures=True)
        return False


class ProbeFeeds:
    """The original's tensors at the probe tails' cuts and its outputs (float64), per probe
    batch, from one run of the original over the probe batches: every cut is an output of
    that run, so every round of :class:`_Probes` reads them again without running anything.
    They stay in memory up to an eighth of ``budget`` and spill beyond
    (:class:`segments.TensorCache`): the calibrated batches and the refit's record are
    held through the select stage, whose peak this would otherwise raise."""

    def __init__(self, model: ir.Model, batches: list, providers: list[str], budget: int, cuts: list[str]) -> None:
        outputs = [v.name for v in model.graph.outputs]
        self.passes = SegmentPass(model, batches, providers=providers, budget=budget // 8, label="probe samples")
        got = self.passes.advance(list(dict.fromkeys([*cuts, *outputs])))
        self.y0 = [{n: np.asarray(got[n][b], np.float64) for n in outputs} for b in range(len(batches))]
        self.scale = sum(float((y**2).sum()) for ys in self.y0 for y in ys.values())
        for n in set(outputs) - set(cuts):
            self.passes.cache.drop(n)

    def get(self, names: list[str]) -> dict[str, Any]:
        """Per name (a cut), its tensor per batch."""
        return {n: self.passes.cache.get(n) for n in names}

    def close(self) -> None:
        self.passes.close()


def chunks(batches: list, size: int) -> list:
    """``batches`` cut into batches of at most ``size`` samples (never joined: their
    per-sample shapes may differ)."""
    out = []
    for b in batches:
        out += [take_samples(b, slice(i, i + size)) for i in range(0, samples_in(b), size)]
    return out


def squared_errors(tail: bytes | Any, providers: list[str], outputs: list[str], y0: list[dict], feeds: list[dict],
                   params: list[dict]) -> list[float]:
    """Per parameter set, Σ‖y − y₀‖² of the tail's outputs over the batches ``feeds``
    (``tail``: the serialised tail, or a session on it)."""
    sess = _ort.session(tail, providers) if isinstance(tail, bytes) else tail
    out = []
    for p in params:
        total = 0.0
        for b, feed in enumerate(feeds):
            ys = sess.run(outputs, feed | p)
            total += sum(float(((y.astype(np.float64) - y0[b][n]) ** 2).sum()) for n, y in zip(outputs, ys))
        out.append(total)
    return out


def _sites(analysis: Analysis, views: list[ConsumerView], stats: Statistics, compensate: str) -> list[_Site]:
    """The consumers the probes can emulate: float32 tensors with channels on axis 1 or
    last, with the mean (and, for lstsq, channel covariance) of their input."""
    sites = []
    for i, v in enumerate(views):
        rank = len(v.value.shape) if v.value.shape is not None else 0
        c = len(v.atoms)
        if v.value.dtype != ir.DataType.FLOAT or rank < 2 or v.axis not in (1, rank - 1):
            continue
        shape = [c] + [1] * (rank - 1 - v.axis)
        gram = stats.extra.get(GramKey(InputRef.of(v))) if compensate == "lstsq" else None
        mean = stats.tensors[v.tensor].mean if v.tensor in stats.tensors else np.zeros(c)
        rows = 0.0
        if gram is not None and not gram.empty:
            mean, rows = _centre(gram, gram.mean()), gram.total()[2]
        else:
            gram = None
        t = stats.tensors.get(v.tensor)
        second = t.var if t is not None else np.ones(c)
        if compensate == "none":
            second = second + mean**2
        sites.append(_Site(v, f"onnxprune_probe{i}", shape, mean, gram, rows, second, mixes=gram is not None))
    return sites


class _Probes:
    """The groups' ladders and the damages measured on them, probed in rounds.

    A round runs some rungs of some groups, in the order of their first consumer, each
    group's tail on the original's tensors at its cut (:class:`ProbeFeeds`, computed once
    for every round).  The first round runs every ladder's first rung (:data:`EAGER`);
    after each round the allocation is chosen on the curves so far, and a group whose
    removal lies beyond its highest measured rung gets its planned rungs (:func:`_probed`)
    up to the first at or beyond that removal in the next one.  Beyond the highest measured
    rung a curve is extrapolated no steeper than linearly in the local error, below what
    the probes measured there on the benchmark models with compensation: an unmeasured rung
    looks cheap, so a group the allocation leaves short of it would stay short measured,
    and a group it takes that far gets measured there."""

    def __init__(self, analysis: Analysis, groups: list[Group], sites_of: dict[int, list[_Site]], scores, samples,
                 measure, *, compensate: str, providers: list[str], min_keep: int, round_to: int | None,
                 memory_budget: int, pool=None, padding: Padding | None = None) -> None:
        self.analysis, self.sites_of, self.compensate = analysis, sites_of, compensate
        self.runs = 0  # rungs run through the graph
        base = measure({})
        position = {id(n): i for i, n in enumerate(analysis.model.graph)}
        first = {g.id: min((position[id(s.view.node)] for s in sites_of[g.id]), default=0) for g in groups}
        self.order = sorted(groups, key=lambda g: (first[g.id], g.id))
        self.dead: dict[int, tuple[np.ndarray, float]] = {}
        self.ladders: dict[int, list[np.ndarray]] = {}
        self.savings: dict[int, list[float]] = {}
        self.local: dict[int, list[float]] = {}
        self.measured: dict[int, dict[int, float]] = {}
        self.modes: dict[int, list[tuple[bool, ...]]] = {}  # per rung: which sites the lstsq emulation predicts at
        for g in self.order:
            dead = choose([g], scores, {g.id: 0}, min_keep=min_keep, round_to=round_to)[g.id]
            self.dead[g.id] = (dead, base - measure({g.id: dead}))
            # no consumer to emulate it at: only its dead channels go
            ladder = _ladder(g, scores, dead, min_keep, round_to) if sites_of[g.id] else []
            self.ladders[g.id] = ladder
            self.savings[g.id] = [base - measure({g.id: sel}) for sel in ladder]
            self.local[g.id] = [_local_error(sites_of[g.id], analysis, sel) for sel in ladder]
            self.measured[g.id] = {}
            self.modes[g.id] = [_modes(sites_of[g.id], analysis, compensate, sel) for sel in ladder]
        self.tails = _Tails(analysis, samples, providers, memory_budget,  # last: close() owns it from here
                            [sites_of[g.id] for g in self.order if sites_of[g.id]], pool, padding)

    def close(self) -> None:
        self.tails.close()

    def first(self) -> dict[int, list[int]]:
        """The first round: every ladder's first ``EAGER`` planned rungs; all of them
        without compensation; and where the lstsq emulation gives the mean at the first
        (too few rows for the wide fit) but predicts at later ones, every planned rung up
        to the first that predicts wherever the last does: a prediction can take most of
        the damage away, so a curve measured on the mean says nothing of the rungs beyond
        (BERT-base's MLPs: the first rung's damage three times the middle's).  Fewer kept
        channels need fewer rows, so past that rung nothing switches, as the extrapolation
        assumes."""
        out = {}
        for gid, ladder in self.ladders.items():
            planned = _probed(len(ladder))
            modes = [self.modes[gid][i] for i in planned]
            settled = modes.index(modes[-1]) if planned else 0  # predicting wherever the last does
            out[gid] = planned if self.compensate == "none" else planned[: max(EAGER, settled + 1)]
        return {gid: idx for gid, idx in out.items() if idx}

    def run(self, wanted: dict[int, list[int]], progress: Callable[[int, int], None] | None = None) -> None:
        """Run the rungs ``wanted`` (group id -> ladder indices), each group's tail built
        while the group before runs."""
        todo = [g for g in self.order if g.id in wanted]
        with self.tails.building() as build:
            ahead = build(self.sites_of[todo[0].id]) if todo else None
            for k, g in enumerate(todo):
                built, ahead = ahead, build(self.sites_of[todo[k + 1].id]) if k + 1 < len(todo) else None
                self._run_group(g, wanted[g.id], built, progress)
                built = None

    def _run_group(self, g: Group, idx: list[int], built: Any, progress: Callable[[int, int], None] | None) -> None:
        damages = self.tails.damages_fn(self.sites_of[g.id], self.analysis, self.compensate, built)
        self.measured[g.id].update(zip(idx, damages([self.ladders[g.id][i] for i in idx])))
        self.runs += len(idx)
        for s in self.sites_of[g.id]:
            s.forget()
        if progress is not None:
            progress(self.runs, self.planned())

    def planned(self) -> int:
        """Rungs the allocation may run in all (the bar's length)."""
        return sum(len(_probed(len(ladder))) for ladder in self.ladders.values())

    def rungs(self) -> Rungs:
        """Per group, its rungs: (removal, damage, saving), the first one only its dead
        channels, the others measured or interpolated (:func:`_interpolated`)."""
        out: Rungs = {}
        for gid, ladder in self.ladders.items():
            dead, saving = self.dead[gid]
            out[gid] = [(dead, 0.0, saving)]
            if self.measured[gid]:
                damages = _interpolated([len(s) for s in ladder], self.local[gid], self.measured[gid])
                out[gid] += list(zip(ladder, damages, self.savings[gid]))
        return out

    def wanted(self, final: dict[int, np.ndarray]) -> dict[int, list[int]]:
        """The next round's rungs: for each group removing more than its highest measured
        rung, its planned rungs up to the first that removes at least as much."""
        out = {}
        for gid, ladder in self.ladders.items():
            measured = self.measured[gid]
            if not measured or len(final[gid]) <= len(ladder[max(measured)]):
                continue
            todo = []
            for i in _probed(len(ladder)):
                if i not in measured:
                    todo.append(i)
                    if len(ladder[i]) >= len(final[gid]):
                        break
            if todo:
                out[gid] = todo
        return out


def _ladder(g: Group, scores, dead: np.ndarray, min_keep: int, round_to: int | None) -> list[np.ndarray]:
    """The group's removals at the LADDER shares (lowest scored first), each a different
    count, none equal to the dead channels alone."""
    seen, out = {len(dead)}, []
    for share in LADDER:
        sel = choose([g], scores, {g.id: int(math.floor(share * len(g.classes)))}, min_keep=min_keep, round_to=round_to)[g.id]
        if len(sel) not in seen:
            seen.add(len(sel))
            out.append(sel)
    return out


def _probed(n: int) -> list[int]:
    """Which of ``n`` rungs run through the graph: the first, the middle and the last."""
    return sorted({0, n // 2, n - 1}) if n else []


def _local_error(sites: list[_Site], analysis: Analysis, removed: np.ndarray) -> float:
    gone = removed_mask(analysis, removed)
    return sum(s.local_error(gone[analysis.roots[s.view.atoms]]) for s in sites)


def _modes(sites: list[_Site], analysis: Analysis, compensate: str, removed: np.ndarray) -> tuple[bool, ...]:
    """Per site, whether the emulation of ``removed`` predicts its removed channels."""
    if compensate != "lstsq":
        return ()
    gone = removed_mask(analysis, removed)
    return tuple(_predicts(s, int((~gone[analysis.roots[s.view.atoms]]).sum())) for s in sites)


def _interpolated(counts: list[int], local: list[float], measured: dict[int, float]) -> list[float]:
    """The damage of every rung: measured where probed; between two probed rungs,
    interpolated along the local error in log-log (damage ∝ local^p piecewise), which
    follows the measured curves far closer than a line in channel count (benchmarks/RESULTS.md,
    "Cost"); beyond the last probed rung, extrapolated with the last piece's power, at most
    1 (1 where the piece falls; see :class:`_Probes`); by channel count where the local
    errors cannot carry it (zero, or not increasing), proportionally beyond the last probed
    rung."""
    idx = sorted(measured)
    lx = [local[i] for i in idx]
    ly = [measured[i] for i in idx]
    loglog = all(v > 0 for v in lx + ly) and all(b > a for a, b in zip(lx, lx[1:]))
    power = 1.0
    if loglog and len(idx) > 1:
        last = math.log(ly[-1] / ly[-2]) / math.log(lx[-1] / lx[-2])
        # A falling piece (the lstsq emulation starting to predict between the two rungs)
        # says nothing of the rungs beyond: linear then.
        power = min(power, last) if last > 0 else power
    out = []
    for i, (n, loc) in enumerate(zip(counts, local)):
        if i in measured:
            out.append(measured[i])
        elif loglog and loc > 0 and i > idx[-1]:
            out.append(ly[-1] * (loc / lx[-1]) ** power if loc > lx[-1] else ly[-1])
        elif loglog and loc > 0:
            out.append(float(np.exp(np.interp(np.log(loc), np.log(lx), np.log(ly)))))
        elif i > idx[-1]:
            out.append(ly[-1] * n / max(counts[idx[-1]], 1))
        else:
            out.append(float(np.interp(n, [counts[j] for j in idx], ly)))
    return out


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
    memory_budget: int = 1 << 30,
    progress: Callable[[int, int], None] | None = None,
    pool=None,
    padding: Padding | None = None,
) -> tuple[dict[int, np.ndarray], dict]:
    """Group id -> class roots to remove so that ``measure(removed)`` (the kept fraction of
    MACs or params) is at most ``target`` with the least summed measured damage; also a
    report (probes, damage predicted, groups that could not be probed).
    ``progress(done, total)`` is told after each group's rungs of a round (rungs run, of
    the most that may run).  ``pool``: a
    :class:`distributed.RayPool` whose workers share the probe samples (the damages are sums
    over samples: the same measurements).  ``padding``: the probe batches are sorted by
    length and cut (:mod:`onnxprune.padding`), as calibration's."""
    views = consumer_views(analysis)
    samples = stats.kept
    if not samples:
        raise ValueError("allocate needs calibration samples kept by calibrate(keep=...)")
    groups = [g for g in analysis.groups if g.prunable and g.id in scores]
    sites_of = _sites_by_group(analysis, groups, _sites(analysis, views, stats, compensate))
    reach = {g.id for g in groups if sites_of[g.id]}
    by_id = {g.id: g for g in groups}
    probes = _Probes(analysis, groups, sites_of, scores, samples, measure, compensate=compensate, providers=providers,
                     min_keep=min_keep, round_to=round_to, memory_budget=memory_budget, pool=pool, padding=padding)
    try:
        wanted = probes.first()
        while True:
            probes.run(wanted, progress)
            rungs = probes.rungs()
            final, relaxed = _chosen(by_id, rungs, scores, measure, target, min_keep, round_to)
            wanted = probes.wanted(final)
            if not wanted:
                break
    finally:
        probes.close()
    if progress is not None:
        progress(probes.planned(), probes.planned())
    curve = lambda gid, k: _curve(rungs[gid], k)  # noqa: E731
    predicted = sum(curve(gid, len(r)) for gid, r in final.items())
    report = {
        "probes": probes.runs, "probe_samples": sum(samples_in(b) for b in samples),
        "predicted_error": predicted,
        "not_probed": [g.id for g in groups if g.id not in reach],
        # per group: channels removed, of how many, and the damage its curve predicts there
        "groups": {gid: (len(r), len(by_id[gid].classes), curve(gid, len(r))) for gid, r in final.items()},
        "relaxed": relaxed,  # group id -> the multiple it keeps, where its alignment was relaxed
    }
    return final, report


def _chosen(by_id: dict[int, Group], rungs: Rungs, scores: dict[int, np.ndarray],
            measure: Callable[[dict[int, np.ndarray]], float], target: float, min_keep: int,
            round_to: int | None) -> tuple[dict[int, np.ndarray], dict]:
    """The removal per group on the curves ``rungs``: a rung each by the Lagrangian, channels
    given back where the target allows, single groups' alignment relaxed where the band
    needs it (:func:`select.fit_band`); also the relaxed groups."""
    best = _lagrangian(rungs, measure, target)
    curve = lambda gid, k: _curve(rungs[gid], k)  # noqa: E731
    final = _give_back(by_id, rungs, best, scores, measure, target, min_keep, round_to)
    # Aligned rungs and steps can leave the target out of reach or far under it: relax the
    # alignment of single groups, as few as the band needs (select.fit_band).
    most = {gid: max(len(rungs[gid][-1][0]), int(math.floor(LADDER[-1] * len(by_id[gid].classes)))) for gid in rungs}
    return fit_band(list(by_id.values()), scores, final, measure, target, min_keep=min_keep, round_to=round_to,
                    most=most, gain=lambda gid, a, b: curve(gid, len(a)) - curve(gid, len(b)))


def _curve(rungs: list[tuple[np.ndarray, float, float]], k: float) -> float:
    """A group's damage at ``k`` channels removed: linear between its rungs."""
    return float(np.interp(k, [len(r[0]) for r in rungs], [r[1] for r in rungs]))


def _lagrangian(rungs: Rungs, measure: Callable[[dict[int, np.ndarray]], float], target: float) -> dict[int, int]:
    """Per group, the rung minimising ``damage − λ·saving``, λ bisected to the smallest
    value whose removal meets ``target``."""
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
    return best


def _give_back(by_id: dict[int, Group], rungs: Rungs, best: dict[int, int], scores: dict[int, np.ndarray],
               measure: Callable[[dict[int, np.ndarray]], float], target: float,
               min_keep: int, round_to: int | None) -> dict[int, np.ndarray]:
    """Rungs are coarse (1/8 of a group), so the rung solution ``best`` can remove well
    beyond the target.  Give channels back, a group's alignment step at a time, where the
    damage curve is steepest, while the target still holds."""
    counts = {gid: len(rungs[gid][j][0]) for gid, j in best.items()}
    cache: dict[tuple[int, int], np.ndarray] = {}

    def chosen(gid: int, k: int) -> np.ndarray:
        if (gid, k) not in cache:
            cache[gid, k] = choose([by_id[gid]], scores, {gid: k}, min_keep=min_keep, round_to=round_to)[gid]
        return cache[gid, k]

    final = {gid: rungs[gid][j][0] for gid, j in best.items()}
    while True:
        options = []
        for gid, k in counts.items():
            step = max(round_for(by_id[gid], round_to), 1)
            back = chosen(gid, k - step) if k - step >= len(rungs[gid][0][0]) else None
            if back is not None and len(back) < len(final[gid]):
                options.append((_curve(rungs[gid], len(final[gid])) - _curve(rungs[gid], len(back)), gid, k - step, back))
        options.sort(key=lambda o: (-o[0], o[1]))
        for gain, gid, k, back in options:
            trial = {**final, gid: back}
            if measure(trial) <= target:
                final, counts[gid] = trial, k
                break
        else:
            return final


def _sites_by_group(analysis: Analysis, groups: list[Group], sites: list[_Site]) -> dict[int, list[_Site]]:
    """The probe sites that see each group's channels."""
    out: dict[int, list[_Site]] = {g.id: [] for g in groups}
    class_group = {int(c): g.id for g in groups for c in g.classes}
    for s in sites:
        for gid in {class_group.get(int(r)) for r in analysis.roots[s.view.atoms]} - {None}:
            out[gid].append(s)
    return out


def _mixed_weight(site: _Site, drop: np.ndarray, pred: np.ndarray | None) -> np.ndarray:
    """The consumer's weight ``W·P̃`` in its own layout and dtype: ``W[:, S] + W[:, R]·B``
    on the kept columns, ``W[:, R]`` on the removed ones (``pred`` = B [R, S]; None: W)."""
    if site._weight is None:
        site._weight = const_array(site.view.node.inputs[1])
    w = site._weight
    if pred is None:
        return w
    rows = weight_rows(site.view, w.astype(np.float32))
    taps = np.array(rows.reshape(rows.shape[0], len(drop), -1))  # [O, C, T], a copy
    r, s = np.flatnonzero(drop), np.flatnonzero(~drop)
    taps[:, s, :] += np.einsum("ort,rs->ost", taps[:, r, :], pred.astype(np.float32), optimize=True)
    return np.ascontiguousarray(rows_to_weight(site.view.node, taps.reshape(rows.shape), w.shape).astype(w.dtype, copy=False))


def _prediction(site: _Site, drop: np.ndarray, compensate: str) -> tuple[np.ndarray | None, np.ndarray]:
    """B [R, S] predicting the removed channels from the kept ones (None where they get a
    constant), and the constant c [C] (see the module docstring)."""
    shift = np.zeros(len(drop))
    if not drop.any():
        return None, shift.astype(np.float32)
    r, s = np.flatnonzero(drop), np.flatnonzero(~drop)
    if compensate == "lstsq" and _predicts(site, len(s)):
        # [R, S], the refit's solve in float32: an estimate the probe compares, at twice float64's speed
        b = solve_spd_fast(ridged(site.cov[np.ix_(s, s)]), site.cov[np.ix_(s, r)]).T
        shift[r] = site.mean[r] - b @ site.mean[s]
        return b, shift.astype(np.float32)
    if compensate != "none":
        shift[r] = site.mean[r]
    return None, shift.astype(np.float32)


def _predicts(site: _Site, kept: int) -> bool:
    """Whether the lstsq emulation predicts a removal keeping ``kept`` of the site's
    channels from them (enough rows behind its Gram statistics), or gives the mean."""
    return site.gram is not None and enough_rows(site.rows, kept * _taps(site.view))


def _replacement(site: _Site, drop: np.ndarray, compensate: str) -> tuple[np.ndarray, np.ndarray]:
    """P [C, C] (float32) and c [C] with ``x' = P·x + c`` what the compensation puts in the
    consumer's input for the dropped channels (the probe feeds the same through the weight)."""
    pred, shift = _prediction(site, drop, compensate)
    p = np.diag((~drop).astype(np.float32))
    if pred is not None:
        p[np.ix_(drop, ~drop)] = pred
    return p, shift


def probes_text(report: dict) -> str:
    """One line for the report: what the allocation measured."""
    text = (f"{report['probes']} probes on {report['probe_samples']} samples, "
            f"predicted relative L2 error {math.sqrt(report['predicted_error']):.3g}")
    if report["not_probed"]:
        text += f"; groups {', '.join(map(str, report['not_probed']))} have no consumer to probe and lose only dead channels"
    return text
