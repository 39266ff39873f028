#!/usr/bin/env python3
"""Quality benchmark: held-out accuracy vs MACs removed, onnxprune against two anchors.

Exact command (from the repo root; about 6 minutes on 2 shared CPU cores, ~2.5 min of CPU)::

    .venv/bin/python benchmarks/quality.py

Options: ``--models mnist_cnn,lenet300`` (default both), ``--points 20,35,50,65`` (percent
of MACs removed), ``--quick`` (points 35,65, one random seed, coarser anchor search and
latency: a smoke test, about 2 minutes), ``--png`` (default ``benchmarks/quality.png``),
``--json`` (raw results, optional), ``--methods wanda,obs,...`` (a subset of the criteria).

What it measures, per model (``models/mnist_cnn.onnx``, ``models/lenet300.onnx``):

* onnxprune: every criterion (l1, l2, random [mean of 3 seeds], wanda, flap, activation,
  relief, relative, mipp, obs) x compensation (none, bias, lstsq) x point, pruned with
  ``target_macs = 1 - x`` and ``round_to=1`` (the finest selection; anchors do not round):
  with calibration data the per-group shares come from measured sensitivity
  (``onnxprune/allocate.py``), without it from bisection of a global threshold.  Data-free criteria run without calibration data for ``none`` and with
  ``models/data/calib`` for ``bias``; data-driven ones always get the calibration data.
  ``eval_samples=0``: all 256 calibration samples feed the statistics (as the anchors get
  them all).  Accuracy: the pruned file run by onnxruntime on the 1,000 held-out digits
  (``models/data/eval/heldout.npz``, labels ``models/data/heldout_labels.npy``).  MACs: onnxprune's
  own counter on the written file.  Wall time: the whole ``onnxprune.prune`` call (load,
  calibrate, score, select, rewrite, verify; latency measurement off).
* anchor 1, onnxsim 0.8.1 ``apply_structured_wanda_pruning`` (structured Wanda, the same
  256 calibration samples), per-chain (default) and ``global_sparsity=True``.  Its knob is a
  channel sparsity: it is swept on a grid and bisected to the largest MACs reduction not
  above each point's target; unreachable points are reported with the most it can remove.
* anchor 2, Torch-Pruning 1.6.1, ``MagnitudePruner`` with ``GroupMagnitudeImportance(p=1)``
  (group L1, mean reduction, mean normalizer), ``global_pruning=True``, classifier layer
  ignored, no fine-tuning.  The torch modules come from ``models/build_samples.py`` with the
  ONNX initializers loaded by name; ``pruning_ratio`` is bisected on the MACs of the exported
  file (``torch.onnx.export(dynamo=False)``, onnxprune's counter).
* every anchor point is compared with onnxprune at the anchor's own kept MACs fraction
  (``target_macs`` = that fraction): the same-criterion setting (wanda/none vs onnxsim,
  l1/none vs Torch-Pruning) and the best of it and the 3 best settings at the nearest point.
* latency of onnxprune's best model at each point: median onnxruntime CPU latency at batch
  32, one intra-op thread, default optimisation level, before/after runs interleaved;
  reported as speedup / (MACs_before / MACs_after); also with ``round_to=8``, and the
  speedup with ORT_ENABLE_EXTENDED (no NCHWc layout transformer) to show where it goes.

Deterministic: fixed seeds, torch single-threaded with deterministic algorithms; the
accuracies and MACs are reproducible, the timings are not (shared machine).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import io
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
CALIB_DIR = MODELS / "data" / "calib"
HELDOUT = MODELS / "data" / "eval" / "heldout.npz"
LABELS = MODELS / "data" / "heldout_labels.npy"
CRITERIA = ("l1", "l2", "random", "wanda", "flap", "activation", "relief", "relative", "mipp", "obs")
DATA_DRIVEN = ("wanda", "flap", "activation", "relief", "relative", "mipp", "obs")
COMPS = ("none", "bias", "lstsq")
LAST_LAYER = {"mnist_cnn": "fc2", "lenet300": "fc3"}

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

import onnxprune  # noqa: E402
from onnxprune.count import count_macs  # noqa: E402
from onnxprune.load import load_model  # noqa: E402


# ----------------------------------------------------------------------------- helpers
def session(path: str | Path, level=None):
    so = ort.SessionOptions()
    if level is not None:
        so.graph_optimization_level = level
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class Evaluator:
    def __init__(self) -> None:
        self.x = np.load(HELDOUT)["input"]
        self.y = np.load(LABELS)

    def accuracy(self, path: str | Path) -> float:
        out = session(path).run(None, {"input": self.x})[0]
        return float((out.argmax(1) == self.y).mean())


def macs_of(path: str | Path) -> int:
    return count_macs(load_model(path)[0])


def weight_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    m = onnx.load(str(path), load_external_data=False)
    return {i.name: tuple(i.dims) for i in m.graph.initializer if i.name.endswith("weight")}


def latency_pair(before: Path, after: Path, feed: dict, reps: int, level=None) -> tuple[float, float, float]:
    """Median latency of both models and the median of per-pair speedups.

    Runs alternate (before, after, before, after, ...) so load drift on a shared machine
    hits both alike; the per-pair ratio is the robust number.
    """
    a, b = session(before, level), session(after, level)
    for _ in range(5):
        a.run(None, feed)
        b.run(None, feed)
    ta, tb = [], []
    for _ in range(reps):
        t = time.perf_counter()
        a.run(None, feed)
        ta.append(time.perf_counter() - t)
        t = time.perf_counter()
        b.run(None, feed)
        tb.append(time.perf_counter() - t)
    return float(np.median(ta)), float(np.median(tb)), float(np.median(np.array(ta) / np.array(tb)))


def match(fn, target: float, grid: list[float], iters: int):
    """Smallest knob whose kept MACs fraction ``fn(k)[0]`` is <= target.

    The grid brackets it first (an anchor's MACs need not fall monotonically near its
    knob's top: Torch-Pruning at ratio 0.99 removes less than at 0.9), then bisection
    refines between the bracketing grid knobs.  Returns (knob, result), or (None, result
    of the grid knob that removes the most) when no grid knob reaches the target.
    """
    results = [(k, fn(k)) for k in grid]
    hit = next((i for i, (_, r) in enumerate(results) if r[0] <= target), None)
    if hit is None:
        return None, min(results, key=lambda kr: kr[1][0])[1]
    lo = results[hit - 1][0] if hit else 0.0
    best = results[hit]
    hi = best[0]
    for _ in range(iters):
        mid = (lo + hi) / 2
        r = fn(mid)
        if r[0] <= target:
            best, hi = (mid, r), mid
        else:
            lo = mid
    return best


# ----------------------------------------------------------------------------- onnxprune
@dataclass
class Run:
    kept: float  # MACs kept fraction (onnxprune's counter on the written file)
    acc: float
    seconds: float
    path: Path
    reported_kept: float = float("nan")


class OnnxPruneRunner:
    def __init__(self, model: str, ev: Evaluator, work: Path, seeds: list[int]) -> None:
        self.model, self.path, self.ev, self.work, self.seeds = model, MODELS / f"{model}.onnx", ev, work, seeds
        self.macs0 = macs_of(self.path)
        self.cache: dict[tuple, Run] = {}
        self.mismatch: list[str] = []

    def one(self, method: str, comp: str, target: float, seed: int, round_to: int = 1) -> Run:
        key = (method, comp, round(target, 12), seed, round_to)
        if key in self.cache:
            return self.cache[key]
        use_calib = method in DATA_DRIVEN or comp != "none"
        out = self.work / f"op_{self.model}_{method}_{comp}_{seed}_{len(self.cache)}.onnx"
        t = time.perf_counter()
        _, res = onnxprune.prune(
            self.path, out, method=method, target_macs=target, seed=seed,
            calib=str(CALIB_DIR) if use_calib else None, compensate=comp if use_calib else "none",
            eval_samples=0, latency=False, round_to=round_to,
        )
        dt = time.perf_counter() - t
        kept = macs_of(out) / self.macs0
        rk = res.macs_after / res.macs_before
        if abs(kept - rk) > 1e-9:
            self.mismatch.append(f"{self.model} {method}/{comp} target {target:.4f}: report {rk:.6f} vs file {kept:.6f}")
        run = Run(kept, self.ev.accuracy(out), dt, out, rk)
        self.cache[key] = run
        return run

    def setting(self, method: str, comp: str, target: float) -> dict:
        seeds = self.seeds if method == "random" else [0]
        runs = [self.one(method, comp, target, s) for s in seeds]
        return {
            "acc": float(np.mean([r.acc for r in runs])),
            "acc_each": [r.acc for r in runs],
            "removed": 1 - float(np.mean([r.kept for r in runs])),
            "seconds": float(np.mean([r.seconds for r in runs])),
            "path": runs[0].path,
        }

    def all_settings(self, target: float) -> dict[str, dict]:
        return {f"{m}/{c}": self.setting(m, c, target) for m in CRITERIA for c in COMPS}


# ----------------------------------------------------------------------------- anchors
class OnnxsimAnchor:
    """onnxsim 0.8.1 apply_structured_wanda_pruning, per-chain or global sparsity."""

    def __init__(self, model: str, ev: Evaluator, work: Path, global_: bool) -> None:
        from onnxsim.pruning import apply_structured_wanda_pruning

        self.fn = apply_structured_wanda_pruning
        self.model, self.path, self.ev, self.work, self.global_ = model, MODELS / f"{model}.onnx", ev, work, global_
        self.macs0 = macs_of(self.path)
        self.shapes0 = weight_shapes(self.path)
        self.calib = [{"input": np.load(f)} for f in sorted(CALIB_DIR.glob("*.npy"))]
        self.cache: dict[float, tuple] = {}
        self.name = "onnxsim wanda " + ("(global)" if global_ else "(per-chain)")

    def __call__(self, sparsity: float):
        sparsity = round(sparsity, 12)
        if sparsity in self.cache:
            return self.cache[sparsity]
        out = self.work / f"osim_{self.model}_{int(self.global_)}_{len(self.cache)}.onnx"
        t = time.perf_counter()
        note = ""
        try:
            with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = self.fn(str(self.path), calibration_data=self.calib, sparsity=sparsity, global_sparsity=self.global_)
            dt = time.perf_counter() - t
            onnx.save(m, str(out))
        except Exception as exc:  # recorded, not hidden
            r = (1.0, float("nan"), time.perf_counter() - t, None, f"onnxsim raised {type(exc).__name__}: {str(exc)[:200]}", [])
            self.cache[sparsity] = r
            return r
        try:
            kept = macs_of(out) / self.macs0
        except Exception as exc:
            kept, note = float("nan"), f"onnxprune cannot count its graph: {str(exc)[:200]}"
        try:
            acc = self.ev.accuracy(out)
        except Exception as exc:
            acc, note = float("nan"), f"onnxruntime refuses its graph: {' '.join(str(exc).split())[:200]}"
        shapes = weight_shapes(out)
        touched = sorted(k.rsplit(".", 1)[0] for k, v in shapes.items() if self.shapes0.get(k) != v)
        r = (kept, acc, dt, out, note, touched)
        self.cache[sparsity] = r
        return r


def load_build_samples():
    spec = importlib.util.spec_from_file_location("build_samples", MODELS / "build_samples.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class TorchPruningAnchor:
    """Torch-Pruning MagnitudePruner, group L1, global, no fine-tuning."""

    name = "torch-pruning L1 group"

    def __init__(self, model: str, ev: Evaluator, work: Path) -> None:
        import torch
        import torch_pruning as tp
        from onnx import numpy_helper

        self.torch, self.tp = torch, tp
        self.bs = load_build_samples()
        self.model, self.path, self.ev, self.work = model, MODELS / f"{model}.onnx", ev, work
        self.macs0 = macs_of(self.path)
        net = {"mnist_cnn": self.bs.make_mnist_cnn, "lenet300": self.bs.make_lenet300}[model]()
        net.eval()
        inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(self.path)).graph.initializer}
        sd = net.state_dict()
        missing = [k for k in sd if k not in inits and not k.endswith("num_batches_tracked")]
        extra = [k for k in inits if k not in sd]
        if missing or extra:
            raise RuntimeError(f"{model}: ONNX initializers do not match the torch module: missing {missing}, extra {extra}")
        net.load_state_dict({k: torch.from_numpy(inits[k].copy()) for k in sd if k in inits}, strict=False)
        with torch.no_grad():
            logits = net(torch.from_numpy(ev.x)).numpy()
        ref = session(self.path).run(None, {"input": ev.x})[0]
        self.rebuild_diff = float(np.abs(logits - ref).max())
        if self.rebuild_diff > 1e-4:
            raise RuntimeError(f"{model}: rebuilt torch module differs from the ONNX file by {self.rebuild_diff}")
        self.net = net
        self.cache: dict[float, tuple] = {}

    def __call__(self, ratio: float):
        ratio = round(ratio, 12)
        if ratio in self.cache:
            return self.cache[ratio]
        torch, tp = self.torch, self.tp
        net = copy.deepcopy(self.net)
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = tp.pruner.MagnitudePruner(
                net, torch.zeros(1, 1, 28, 28), importance=tp.importance.GroupMagnitudeImportance(p=1),
                global_pruning=True, pruning_ratio=ratio, ignored_layers=[getattr(net, LAST_LAYER[self.model])],
            )
            pruner.step()
        dt = time.perf_counter() - t
        out = self.work / f"tp_{self.model}_{len(self.cache)}.onnx"
        t = time.perf_counter()
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            self.bs.export_onnx(net, out)  # the exact export of models/build_samples.py (dynamo=False)
        dt_export = time.perf_counter() - t
        r = (macs_of(out) / self.macs0, self.ev.accuracy(out), dt, out, dt_export)
        self.cache[ratio] = r
        return r


# ----------------------------------------------------------------------------- benchmark
def bench_model(model: str, points: list[float], quick: bool, ev: Evaluator, work: Path, log) -> dict:
    seeds = [0] if quick else [0, 1, 2]
    op = OnnxPruneRunner(model, ev, work, seeds)
    base_acc = ev.accuracy(op.path)
    res: dict = {"model": model, "macs": op.macs0, "baseline_acc": base_acc, "points": points, "grid": {}, "anchors": {}, "compare": [], "latency": []}

    # onnxprune grid
    t0 = time.perf_counter()
    for x in points:
        res["grid"][x] = op.all_settings(1 - x)
        log(f"  [{model}] onnxprune {x:.0%}: best {max(res['grid'][x].items(), key=lambda kv: kv[1]['acc'])[0]}")
    res["grid_seconds"] = time.perf_counter() - t0

    # anchors: matched points (bisection) and sweeps for the plot
    iters = 7 if quick else 12
    sweep = [0.25, 0.5, 0.75] if quick else [round(0.1 * k, 1) for k in range(1, 10)] + [0.95]
    grid = sweep + [0.99]
    anchors = [OnnxsimAnchor(model, ev, work, False), OnnxsimAnchor(model, ev, work, True)]
    tpa = TorchPruningAnchor(model, ev, work)
    res["tp_rebuild_max_abs_diff"] = tpa.rebuild_diff
    for a in anchors:
        entry = {"matched": {}, "sweep": []}
        for s in sweep:
            kept, acc, dt, _, note, touched = a(s)
            entry["sweep"].append({"knob": s, "removed": 1 - kept, "acc": acc, "seconds": dt, "note": note, "touched": touched})
        for x in points:
            knob, r = match(a, 1 - x, grid, iters)
            kept, acc, dt, path, note, touched = r
            entry["matched"][x] = {"knob": knob, "reached": knob is not None, "removed": 1 - kept, "acc": acc,
                                   "seconds": dt, "note": note, "touched": touched}
            if knob is not None:
                res["compare"].append(_compare(op, res["grid"], a.name, x, kept, acc, "wanda/none"))
        if not any(m["reached"] for m in entry["matched"].values()):
            # never reaches a point: compare at its own sweep points instead (its native range)
            for s in ([0.5, 0.9] if not quick else [0.5, 0.75]):
                kept, acc, *_ = a(s)
                if kept < 1:
                    res["compare"].append(_compare(op, res["grid"], f"{a.name} @sparsity {s}", None, kept, acc, "wanda/none"))
        res["anchors"][a.name] = entry
        log(f"  [{model}] {a.name} done")
    entry = {"matched": {}, "sweep": []}
    for x in points:
        knob, r = match(tpa, 1 - x, grid, iters)
        kept, acc, dt, path, dt_export = r
        entry["matched"][x] = {"knob": knob, "reached": knob is not None, "removed": 1 - kept, "acc": acc,
                               "seconds": dt, "export_seconds": dt_export}
        if knob is not None:
            res["compare"].append(_compare(op, res["grid"], tpa.name, x, kept, acc, "l1/none"))
    for s in sweep:
        kept, acc, dt, _, _ = tpa(s)
        entry["sweep"].append({"knob": s, "removed": 1 - kept, "acc": acc, "seconds": dt})
    res["anchors"][tpa.name] = entry
    log(f"  [{model}] torch-pruning done")

    # latency of onnxprune's best model at each point, and of the same setting with --round-to 8
    feed = {"input": ev.x[:32]}
    reps = 20 if quick else 50
    no_layout = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # everything but the NCHWc layout transformer
    for x in points:
        name, best = max(res["grid"][x].items(), key=lambda kv: kv[1]["acc"])
        method, comp = name.split("/")
        for round_to in (1, 8):
            run = op.one(method, comp, 1 - x, 0, round_to)
            tb, ta, speedup = latency_pair(op.path, run.path, feed, reps)
            speedup_ext = latency_pair(op.path, run.path, feed, reps, no_layout)[2]
            res["latency"].append({"point": x, "setting": name + (f" round-to {round_to}" if round_to > 1 else ""),
                                   "acc": run.acc, "macs_ratio": 1 / run.kept, "before_ms": tb * 1e3, "after_ms": ta * 1e3,
                                   "speedup": speedup, "efficiency": speedup * run.kept, "speedup_no_nchwc": speedup_ext})
    res["counter_mismatch"] = op.mismatch
    return res


def _compare(op: OnnxPruneRunner, grid: dict, anchor: str, x, kept: float, acc: float, same: str) -> dict:
    """onnxprune at the anchor's kept MACs: the same-criterion setting, and the best of the
    candidates (the same criterion plus the 3 best settings at the nearest grid point)."""
    nearest = min(grid, key=lambda p: abs(p - (1 - kept)))
    top = sorted(grid[nearest], key=lambda k: -grid[nearest][k]["acc"])[:3]
    settings = {k: op.setting(*k.split("/"), kept) for k in dict.fromkeys([same] + top)}
    best_name, best = max(settings.items(), key=lambda kv: kv[1]["acc"])
    return {"anchor": anchor, "point": x, "anchor_removed": 1 - kept, "anchor_acc": acc,
            "same_name": same, "same_acc": settings[same]["acc"], "same_removed": settings[same]["removed"],
            "best_name": best_name, "best_acc": best["acc"], "best_removed": best["removed"], "candidates": list(settings)}


# ----------------------------------------------------------------------------- output
def pct(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def tables(res: dict) -> str:
    pts = res["points"]
    lines = [f"### {res['model']} (baseline {pct(res['baseline_acc'])} %, {res['macs']:,} MACs)", ""]
    lines.append("Held-out accuracy (%) at each share of MACs removed; anchors show `acc (MACs removed %)`.")
    lines.append("")
    lines.append("| setting | " + " | ".join(f"{x:.0%} MACs removed" for x in pts) + " | median prune s |")
    lines.append("|---|" + "---|" * (len(pts) + 1))
    for m in CRITERIA:
        for c in COMPS:
            key = f"{m}/{c}"
            row = [res["grid"][x][key] for x in pts]
            best = [max(res["grid"][x].values(), key=lambda d: d["acc"])["acc"] for x in pts]
            cells = [("**" + pct(r["acc"]) + "**") if r["acc"] == b else pct(r["acc"]) for r, b in zip(row, best)]
            label = f"onnxprune {m}{' (mean of 3 seeds)' if m == 'random' and len(row[0]['acc_each']) > 1 else ''} / {c}"
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {np.median([r['seconds'] for r in row]):.2f} |")
    for name, a in res["anchors"].items():
        cells = []
        for x in pts:
            m = a["matched"][x]
            if m["reached"]:
                cells.append(f"{pct(m['acc'])} ({pct(m['removed'])})")
            else:
                cells.append(f"unreachable (max {pct(m['removed'])})")
        secs = [m["seconds"] for m in a["matched"].values()]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {np.median(secs):.2f} |")
    lines.append("")
    lines.append("Each anchor point against onnxprune at the anchor's own kept MACs (`target_macs` = that fraction); "
                 "'best' is the best of the same criterion and the 3 best settings at the nearest grid point:")
    lines.append("")
    lines.append("| anchor | point | anchor MACs removed % | anchor acc % | onnxprune same criterion | onnxprune best setting |")
    lines.append("|---|---|---|---|---|---|")
    for c in res["compare"]:
        pt = "-" if c["point"] is None else f"{c['point']:.0%}"
        lines.append(f"| {c['anchor']} | {pt} | {pct(c['anchor_removed'])} | {pct(c['anchor_acc'])} | "
                     f"{c['same_name']}: {pct(c['same_acc'])} ({pct(c['same_removed'])}) | "
                     f"{c['best_name']}: {pct(c['best_acc'])} ({pct(c['best_removed'])}) |")
    lines.append("")
    lines.append("Latency of onnxprune's best model at each point, and of the same setting with `round_to=8` "
                 "(onnxruntime CPU, batch 32, 1 intra-op thread; speedup = median of interleaved before/after pairs):")
    lines.append("")
    lines.append("| point | setting | acc % | MACs before/after | latency before ms | after ms | speedup | speedup / MACs ratio | speedup, NCHWc layout off |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for l in res["latency"]:
        lines.append(f"| {l['point']:.0%} | {l['setting']} | {pct(l['acc'])} | {l['macs_ratio']:.2f}x | {l['before_ms']:.2f} | {l['after_ms']:.2f} | "
                     f"{l['speedup']:.2f}x | {l['efficiency']:.2f} | {l['speedup_no_nchwc']:.2f}x |")
    lines.append("")
    worse = []
    for m in CRITERIA:
        bad = [f"{x:.0%}" for x in pts if res["grid"][x][f"{m}/bias"]["acc"] <= res["grid"][x][f"{m}/none"]["acc"]]
        worse.append(f"{m}: {'bias better at every point' if not bad else 'bias not better at ' + ', '.join(bad)}")
    lines.append("Bias compensation vs none (held-out accuracy): " + "; ".join(worse) + ".")
    notes = []
    for name, a in res["anchors"].items():
        touched = {tuple(s.get("touched", ())) for s in a["sweep"] if s.get("touched") is not None}
        if name.startswith("onnxsim") and touched:
            layers = sorted({t for tt in touched for t in tt})
            notes.append(f"{name}: weight shapes changed only in {', '.join(layers) or 'nothing'} at every sweep point")
        for s in a["sweep"]:
            if s.get("note"):
                notes.append(f"{name} sparsity {s['knob']}: {s['note']}")
    if res["counter_mismatch"]:
        notes.append("onnxprune report vs file MACs mismatch: " + "; ".join(res["counter_mismatch"]))
    if notes:
        lines.append("")
        lines.extend(f"- {n}" for n in notes)
    return "\n".join(lines)


def plot(results: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.8), squeeze=False)
    for ax, res in zip(axes[0], results):
        pts = res["points"]
        for m in CRITERIA:
            comp = max(COMPS, key=lambda c: np.mean([res["grid"][x][f"{m}/{c}"]["acc"] for x in pts]))
            xs = [100 * res["grid"][x][f"{m}/{comp}"]["removed"] for x in pts]
            ys = [100 * res["grid"][x][f"{m}/{comp}"]["acc"] for x in pts]
            ax.plot(xs, ys, "-o", ms=4, label=f"onnxprune {m}/{comp}")
        marks = {"onnxsim wanda (per-chain)": "s", "onnxsim wanda (global)": "D", "torch-pruning L1 group": "^"}
        for name, a in res["anchors"].items():
            pts_a = [s for s in a["sweep"] if not math.isnan(s["acc"]) and s["removed"] > 0]
            pts_a += [m for m in a["matched"].values() if m["reached"] and not math.isnan(m["acc"])]
            pts_a.sort(key=lambda s: s["removed"])
            ax.plot([100 * s["removed"] for s in pts_a], [100 * s["acc"] for s in pts_a], marks.get(name, "x"),
                    ls="none", mfc="none", mec="black", ms=7, label=name)
        ax.axhline(100 * res["baseline_acc"], color="grey", ls="--", lw=0.8, label="unpruned")
        ax.set_xlabel("MACs removed (%)")
        ax.set_ylabel("held-out accuracy (%)")
        ax.set_title(f"{res['model']} (no fine-tuning)")
        ax.set_ylim(0, 100)
        ax.set_xlim(0, 100 * max(pts) + 10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv=None) -> int:
    global CRITERIA
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="mnist_cnn,lenet300")
    ap.add_argument("--points", default=None, help="percent of MACs removed, comma separated (default 20,35,50,65)")
    ap.add_argument("--quick", action="store_true", help="smoke test: points 35,65, 1 random seed, coarse anchors")
    ap.add_argument("--png", type=Path, default=ROOT / "benchmarks" / "quality.png")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--methods", default=None, help=f"a subset of {','.join(CRITERIA)} (default: all)")
    args = ap.parse_args(argv)
    if args.methods:
        unknown = set(args.methods.split(",")) - set(CRITERIA)
        if unknown:
            ap.error(f"unknown methods {sorted(unknown)}")
        CRITERIA = tuple(m for m in CRITERIA if m in args.methods.split(","))

    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    np.random.seed(0)
    points = [float(p) / 100 for p in (args.points or ("35,65" if args.quick else "20,35,50,65")).split(",")]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in LAST_LAYER:
            ap.error(f"unknown model {m!r}: choose from {', '.join(LAST_LAYER)}")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    ev = Evaluator()
    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="onnxprune-quality-") as d:
        for m in models:
            t = time.perf_counter()
            res = bench_model(m, points, args.quick, ev, Path(d), log)
            res["seconds"] = time.perf_counter() - t
            results.append(res)
            print(tables(res))
            print(f"\n({m}: {res['seconds']:.0f} s)\n", flush=True)
    total = time.perf_counter() - t0
    from importlib.metadata import version

    print(f"versions: onnxprune {version('onnxprune')}, onnxruntime {ort.__version__}, onnxsim {version('onnxsim')}, "
          f"torch-pruning {version('torch-pruning')}, torch {torch.__version__}; {os.cpu_count()} CPUs, {platform.machine()}")
    print(f"total {total:.0f} s")
    if args.png:
        plot(results, args.png)
    if args.json:
        def clean(o):
            if isinstance(o, dict):
                return {str(k): clean(v) for k, v in o.items()}
            if isinstance(o, (list, tuple)):
                return [clean(v) for v in o]
            if isinstance(o, Path):
                return None
            return o
        args.json.write_text(json.dumps({"results": clean(results), "total_seconds": total}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
