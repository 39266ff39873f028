#!/usr/bin/env python3
"""Calibration benchmark: what onnxprune's calibrate stage costs over plain onnxruntime
inference of the same samples, and whether its peak memory stays flat as the data grows.

Run from the repository root (assets first; ~5 min on 2 CPU cores, ``--quick`` ~3 min):

    .venv/bin/python benchmarks/assets.py
    .venv/bin/python benchmarks/calibration.py [--quick] [--json benchmarks/.cache/calibration.json]

Models and data:

* ``cnn``: the shipped ``models/mnist_cnn.onnx`` with ``models/data/calib`` (256 real MNIST
  digits) repeated to N samples;
* ``effnet-ts`` / ``effnet-dynamo``: EfficientNet-Lite0 (real ImageNet weights) from both torch
  exporters (``benchmarks/assets.py``), fed the 400 photos of ``benchmarks/.cache/photos``
  through onnxprune's image-folder path with ``--resize 256 --crop 224 --mean
  0.485,0.456,0.406 --std 0.229,0.224,0.225``.

(i) Time. The tensors are the ones ``api.prune`` would expose (every consumer input of every
prunable group, ``consumer_views``), the batches the ones ``api.prune`` would build
(``data.batches``, batch size 32), the session options onnxprune's (``_ort.session``, the
same for both). The batches are decoded once and held in memory, so that the ratio compares
the calibration pass (``calibrate(...)``: instrumented session run + statistics) with a plain
``session.run`` loop over exactly the same batches, both from a fresh session; the image
decoding (what the folder path adds to both) is timed on its own. Three loops are
interleaved (CNN 7 times, EfficientNet twice): plain inference, ``calibrate`` as it is
(channels-first activations reduced by onnxruntime inside the graph), and ``calibrate`` with
every tensor fetched and reduced in numpy (how it worked before 2026-12-02); the median of
the per-pair ratios is reported: the machine is shared and its load drifts. Reported: the
calibration loop (``Statistics.seconds``) and, inside it, the time spent in numpy
(``TensorStats.update`` / ``update_reduced``, wrapped with a timer for the run); the whole
``calibrate()`` call (adds writing the instrumented model and creating its session), wall and
CPU time. Then a profile on a subset with warm sessions: the instrumented session fetching
only the model's outputs, every exposed tensor, or the in-graph means; ``TensorStats.update``
on the fetched tensors; and the largest relative deviation of the in-graph statistics from
numpy's on the same batches. ``calibrate`` is asked for the statistics ``api.prune`` asks for
with wanda, its default data-driven method (``criteria.statistics_for``).

(ii) Memory. Each measurement runs in a fresh subprocess that streams N (then 10·N) samples
through ``data.batches`` → ``calibrate`` from a generator yielding augmented copies (never
materialising the samples), and reports its peak RSS (``VmHWM`` of ``/proc/self/status``),
also before calibration starts. For the CNN the whole ``onnxprune.prune`` (wanda, bias
compensation, verification) is measured the same way. The full run adds EfficientNet (dynamo)
at the default batch size 32, where one batch of exposed outputs is 352 MB.

Targets (issue 3): calibration ≤ 1.5× plain inference; peak RSS at 10·N ≤ 1.1× that at N.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxprune import _ort  # noqa: E402
from onnxprune import calibrate as calibrate_module  # noqa: E402
from onnxprune.calibrate import (  # noqa: E402
    TensorStats, _bytes_per_sample, _shape_known, calibrate, instrumented_model_path,
)
from onnxprune.consumers import consumer_views  # noqa: E402
from onnxprune.criteria import statistics_for  # noqa: E402
from onnxprune.data import Preprocess, batches, input_specs, load_image, source_items  # noqa: E402
from onnxprune.groups import analyze_groups  # noqa: E402
from onnxprune.load import load_model  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache"
PHOTOS = CACHE / "photos"
MODELS = {
    "cnn": ROOT / "models" / "mnist_cnn.onnx",
    "effnet-ts": CACHE / "effnet_lite0.onnx",
    "effnet-dynamo": CACHE / "effnet_lite0_dynamo.onnx",
}
PRE = Preprocess(resize=256, crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
PROVIDERS = ["CPUExecutionProvider"]
BUDGET = 1024 * 2**20  # api.prune's default --memory-budget
BATCH = 32  # api.prune's default --batch-size
GATHERED = statistics_for("wanda")  # what api.prune gathers with its default data-driven method


# ----------------------------------------------------------------------------- setup


class Ctx:
    """What api.prune hands to calibrate(): the model, the exposed tensors, the specs."""

    def __init__(self, key: str) -> None:
        self.key, self.path = key, MODELS[key]
        self.model, _ = load_model(self.path)
        analysis = analyze_groups(self.model, ())
        views = consumer_views(analysis)
        self.tensors = {v.tensor: (v.value, v.axis) for v in views}
        self.specs = input_specs(_ort.session(str(self.path), PROVIDERS))
        self.groups = len(analysis.groups)
        self.prunable = sum(g.prunable for g in analysis.groups)
        self.exposed_mb_per_sample = sum(_bytes_per_sample(v) for v, _ in self.tensors.values()) / 2**20

    def calibrate(self, batch_iter, total=None):
        return calibrate(
            self.model, self.tensors, batch_iter, batch_size=BATCH, providers=PROVIDERS,
            memory_budget=BUDGET, progress=False, total=total, hold_out=0, statistics=GATHERED,
        )


def cnn_batches(ctx: Ctx, n: int) -> list[dict]:
    base = list(batches(source_items(ROOT / "models" / "data" / "calib", ctx.specs)(), ctx.specs, BATCH))
    out, k = [], 0
    while sum(b["input"].shape[0] for b in out) < n:
        out.append(base[k % len(base)])
        k += 1
    return out


def photo_batches(ctx: Ctx, n: int | None) -> tuple[list[dict], float]:
    """The image-folder path (decode, resize, crop, normalise, check, batch), timed."""
    t = time.perf_counter()
    out = list(batches(source_items(PHOTOS, ctx.specs, PRE)(), ctx.specs, BATCH, n))
    return out, time.perf_counter() - t


def n_samples(bl: list[dict]) -> int:
    return sum(next(iter(b.values())).shape[0] for b in bl)


# ----------------------------------------------------------------------------- (i) time


def time_plain(path: Path, bl: list[dict]) -> dict[str, float]:
    """A plain loop from a fresh session: loop wall time, and wall/CPU time with the session creation."""
    c0, t0 = time.process_time(), time.perf_counter()
    sess = _ort.session(str(path), PROVIDERS)  # fresh, like the instrumented one in calibrate()
    t = time.perf_counter()
    for b in bl:
        sess.run(None, b)
    end = time.perf_counter()
    return {"loop": end - t, "call": end - t0, "cpu": time.process_time() - c0}


def time_calibrate(ctx: Ctx, bl: list[dict], fetched: bool = False) -> dict[str, float]:
    """calibrate() on ``bl``; the numpy side (TensorStats.update and update_reduced) is
    wrapped with a timer for the duration, to split the loop into numpy reductions and the
    rest (onnxruntime runs, output copies).  ``fetched``: every tensor fetched and reduced
    in numpy, the in-graph reduction off (how calibrate() worked before 2026-12-02)."""
    spent = [0.0]
    saved = {name: getattr(TensorStats, name) for name in ("update", "update_reduced")}

    def timed(f):
        def wrapper(*a):
            t = time.perf_counter()
            f(*a)
            spent[0] += time.perf_counter() - t
        return wrapper

    for name, f in saved.items():
        setattr(TensorStats, name, timed(f))
    reducible = calibrate_module._reducible
    if fetched:
        calibrate_module._reducible = lambda *a: False
    try:
        c0, t0 = time.process_time(), time.perf_counter()
        stats, _ = ctx.calibrate(iter(bl), n_samples(bl))
        end = time.perf_counter()
    finally:
        for name, f in saved.items():
            setattr(TensorStats, name, f)
        calibrate_module._reducible = reducible
    return {"loop": stats.seconds, "call": end - t0, "cpu": time.process_time() - c0, "update": spent[0]}


def _interleaved(fns: dict, reps: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: median(v) for k, v in times.items()}


def profile(ctx: Ctx, bl: list[dict], reps: int = 3) -> dict:
    """Where the calibration loop's time goes, on ``bl`` (warm sessions, median of ``reps``):
    the plain model; the instrumented one fetching only the model outputs, every exposed
    tensor, or the in-graph means; TensorStats.update on the fetched tensors; and how far the
    in-graph statistics are from numpy's on the same batches."""
    values = [v for v, _ in ctx.tensors.values()]
    names = [v.name for v in values]
    out_names = [o.name for o in ctx.model.graph.outputs]
    reduced = {v.name: GATHERED for v, axis in ctx.tensors.values() if calibrate_module._reducible(v, axis, GATHERED)}
    mean_names = {name: calibrate_module._reduced_names(ctx.tensors[name][0], GATHERED) for name in reduced}
    flat = [o for names_ in mean_names.values() for o in names_.values()]
    res: dict = {"samples": n_samples(bl), "reduced_in_graph": len(reduced)}
    fetched: list = []
    means: list = []
    with tempfile.TemporaryDirectory(prefix="bench-cal-") as d:
        plain = _ort.session(str(ctx.path), PROVIDERS)
        sess = _ort.session(str(instrumented_model_path(ctx.model, values, Path(d))), PROVIDERS)
        (Path(d) / "instrumented.onnx").rename(Path(d) / "fetch.onnx")
        red = _ort.session(str(instrumented_model_path(ctx.model, values, Path(d), reduced)), PROVIDERS)
        plain.run(None, bl[0])
        sess.run(names, bl[0])
        red.run(flat, bl[0])
        fetched.extend(sess.run(names, b) for b in bl)  # kept (untimed) to time the reductions on
        means.extend(dict(zip(flat, red.run(flat, b))) for b in bl)
        res.update(_interleaved({
            "plain": lambda: [plain.run(None, b) for b in bl],
            "instrumented, outputs only": lambda: [sess.run(out_names, b) for b in bl],
            "instrumented, all exposed": lambda: [sess.run(names, b) for b in bl],  # dropped at once, as in calibrate()
            "instrumented, in-graph means": lambda: [red.run(flat + [n for n in names if n not in reduced], b) for b in bl],
        }, reps))
    n0 = next(iter(bl[0].values())).shape[0]
    res["exposed_mb_per_sample_actual"] = sum(x.nbytes for x in fetched[0]) / n0 / 2**20
    # what calibrate() plans with: the inferred shape where it is complete, else measured
    res["exposed_mb_per_sample_planned"] = sum(
        _bytes_per_sample(v) if _shape_known(v) else x.nbytes / n0 for v, x in zip(values, fetched[0])) / 2**20
    spent: list[float] = []
    for _ in range(reps):  # the total over the subset, median of reps
        acc, total = {}, 0.0
        for outs in fetched:
            for name, x in zip(names, outs):
                axis = ctx.tensors[name][1]
                st = acc.get(name)
                if st is None:
                    st = acc[name] = TensorStats.empty(x.shape[axis], GATHERED)
                t = time.perf_counter()
                st.update(x, axis)
                total += time.perf_counter() - t
        spent.append(total)
    res["TensorStats.update on fetched tensors"] = median(spent)
    dev = 0.0  # onnxruntime's float32 means against the blocked numpy reduction
    for name, out in mean_names.items():
        st = TensorStats.empty(acc[name].sum.size, GATHERED)
        for m in means:
            st.update_reduced({k: m[o] for k, o in out.items() if k != "shape"}, calibrate_module._spatial(ctx.tensors[name][0]),
                              means=True)
        assert st.n == acc[name].n, name
        for f in GATHERED:
            ref = getattr(acc[name], f)
            dev = max(dev, float(np.abs(getattr(st, f) - ref).max() / max(np.abs(ref).max(), 1e-30)))
    res["max rel. deviation in-graph vs numpy"] = dev
    return res


def bench_time(key: str, n: int | None, reps: int, prof_n: int) -> dict:
    ctx = Ctx(key)
    decode = None
    if key == "cnn":
        bl = cnn_batches(ctx, n)
    else:
        bl, decode = photo_batches(ctx, n)
    ns = n_samples(bl)
    time_plain(ctx.path, bl[:1])  # load the libraries' code paths once before timing anything
    plains, cals, olds = [], [], []
    for _ in range(reps):  # interleaved, median of each
        plains.append(time_plain(ctx.path, bl))
        cals.append(time_calibrate(ctx, bl))
        olds.append(time_calibrate(ctx, bl, fetched=True))
    pm = {k: median(p[k] for p in plains) for k in plains[0]}
    cm = {k: median(c[k] for c in cals) for k in cals[0]}
    pair = [c["loop"] / p["loop"] for p, c in zip(plains, cals)]  # robust to drifting load on a shared machine
    k = 1
    while n_samples(bl[:k]) < prof_n and k < len(bl):
        k += 1
    prof = profile(ctx, bl[:k])
    return {
        "model": key, "samples": ns, "batch": BATCH, "reps": reps, "groups": ctx.groups, "prunable": ctx.prunable,
        "exposed_tensors": len(ctx.tensors), "exposed_mb_per_sample": ctx.exposed_mb_per_sample,
        "decode_s": decode, "plain_s": pm["loop"], "plain_call_s": pm["call"], "plain_cpu_s": pm["cpu"],
        "calib_loop_s": cm["loop"], "calib_call_s": cm["call"], "calib_cpu_s": cm["cpu"],
        "ratio_loop": median(pair), "ratio_loop_pairs": pair,
        "fetched_ratio_loop": median(o["loop"] / p["loop"] for p, o in zip(plains, olds)),
        "fetched_ratio_loop_pairs": [o["loop"] / p["loop"] for p, o in zip(plains, olds)],
        "update_s": cm["update"], "update_x_plain": median(c["update"] / p["loop"] for p, c in zip(plains, cals)),
        "rest_x_plain": median((c["loop"] - c["update"]) / p["loop"] for p, c in zip(plains, cals)),
        "ratio_loop_min": min(c["loop"] for c in cals) / min(p["loop"] for p in plains), "ratio_call": cm["call"] / pm["call"], "ratio_cpu": cm["cpu"] / pm["cpu"],
        "ratio_with_decode": None if decode is None else (cm["call"] + decode) / (pm["call"] + decode),
        "load_avg": os.getloadavg()[0],
        "profile": prof,
    }


# ----------------------------------------------------------------------------- (ii) memory


def _vmhwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _stream(key: str, specs, n: int, trace: list[float], every: int, seed: int = 0):
    """Yield ``n`` augmented samples one at a time; nothing is kept.  Appends the peak RSS so
    far to ``trace`` every ``every`` samples (once per batch)."""
    rng = np.random.default_rng(seed)
    name = specs[0].name
    if key == "cnn":
        base = np.concatenate([np.load(p) for p in sorted((ROOT / "models" / "data" / "calib").glob("*.npy"))])
    else:
        photos = sorted(PHOTOS.glob("*.jpg"))
    for i in range(n):
        if i % every == 0:
            trace.append(_vmhwm_mb())
        if key == "cnn":
            x = base[i % len(base)]
            x = np.roll(x, tuple(rng.integers(-2, 3, size=2)), axis=(1, 2))
            x = np.clip(x + rng.normal(0, 0.02, x.shape).astype(np.float32), 0, 1)
        else:
            x = load_image(photos[i % len(photos)], specs[0], PRE)
            if (i // len(photos)) % 2:
                x = x[:, :, ::-1]
            x = x + rng.normal(0, 0.01, x.shape).astype(np.float32)
        yield {name: np.ascontiguousarray(x, dtype=np.float32)}


def child(what: str, key: str, n: int, batch: int) -> dict:
    """Runs in a fresh interpreter: stream ``n`` samples, report peak RSS."""
    t = time.perf_counter()
    trace: list[float] = []
    if what == "calibrate":
        ctx = Ctx(key)
        before = _vmhwm_mb()
        stream = _stream(key, ctx.specs, n, trace, batch)
        stats, _ = calibrate(
            ctx.model, ctx.tensors, batches(source_items(stream, ctx.specs)(), ctx.specs, batch), batch_size=batch,
            providers=PROVIDERS, memory_budget=BUDGET, progress=False, total=n, hold_out=0, statistics=GATHERED,
        )
        samples = stats.samples
    else:  # the whole api.prune: wanda, bias compensation, verification on held-out samples
        import onnxprune

        specs = input_specs(_ort.session(str(MODELS[key]), PROVIDERS))
        before = _vmhwm_mb()
        _, result = onnxprune.prune(MODELS[key], None, method="wanda", ratio=0.3, batch_size=batch,
                                    calib=_stream(key, specs, n, trace, batch), latency=False)
        samples = result.calibration["samples"] + result.calibration["held_out"]
    return {"what": what, "model": key, "n": n, "batch": batch, "samples": samples, "hwm_before_mb": before,
            "hwm_mb": _vmhwm_mb(), "trace_mb": trace, "seconds": time.perf_counter() - t}


def bench_rss(what: str, key: str, n: int, batch: int) -> dict:
    rows = []
    for m in (n, 10 * n):
        proc = subprocess.run(
            [sys.executable, __file__, "--child", what, key, str(m), str(batch)], capture_output=True, text=True, cwd=ROOT,
        )
        if proc.returncode:
            raise RuntimeError(f"child {what} {key} {m} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    a, b = rows
    return {"what": what, "model": key, "n": n, "batch": batch, "small": a, "large": b, "ratio": b["hwm_mb"] / a["hwm_mb"]}


# ----------------------------------------------------------------------------- report


def print_tables(times: list[dict], rss: list[dict]) -> None:
    print(f"\n(i) calibration (gathering {', '.join(GATHERED)}) vs plain onnxruntime inference, same batches (batch 32), same session options; medians of the repetitions")
    print("| model | samples × reps | exposed tensors (reduced in the graph) (MiB/sample if fetched: static shapes / planned / actual) | plain loop s | calibrate loop s | **ratio, loops** (median of interleaved pairs; min/min) | of which numpy / the rest (× plain) | all fetched (before): ratio | ratio incl. session creation (wall / CPU) | image decode s | ratio incl. decode | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in times:
        dec = "-" if r["decode_s"] is None else f"{r['decode_s']:.2f}"
        rd = "-" if r["ratio_with_decode"] is None else f"{r['ratio_with_decode']:.2f}×"
        p = r["profile"]
        print(f"| {r['model']} | {r['samples']} × {r['reps']} | {r['exposed_tensors']} ({p['reduced_in_graph']}) ({r['exposed_mb_per_sample']:.2f} / {p['exposed_mb_per_sample_planned']:.2f} / {p['exposed_mb_per_sample_actual']:.2f}) | "
              f"{r['plain_s']:.2f} | {r['calib_loop_s']:.2f} | **{r['ratio_loop']:.2f}×** ({r['ratio_loop_min']:.2f}×) | {r['update_x_plain']:.2f}× / {r['rest_x_plain']:.2f}× | {r['fetched_ratio_loop']:.2f}× | {r['ratio_call']:.2f}× / {r['ratio_cpu']:.2f}× | {dec} | {rd} | {r['load_avg']:.1f} |")
    print("\nwhere the time goes (profile on a subset, warm sessions, median of 3; seconds, and × plain inference)")
    print("| model | samples | plain run | instrumented, model outputs only | instrumented, all exposed fetched "
          "| instrumented, in-graph means fetched | TensorStats.update on the fetched tensors | max rel. deviation in-graph vs numpy |")
    print("|---|---|---|---|---|---|---|---|")
    for r in times:
        p = r["profile"]
        pl = p["plain"]
        f = lambda k: f"{p[k]:.2f} ({p[k] / pl:.2f}×)"  # noqa: E731
        print(f"| {r['model']} | {p['samples']} | {pl:.2f} | {f('instrumented, outputs only')} | {f('instrumented, all exposed')} | "
              f"{f('instrumented, in-graph means')} | {f('TensorStats.update on fetched tensors')} | {p['max rel. deviation in-graph vs numpy']:.1e} |")
    if rss:
        print("\n(ii) peak RSS (VmHWM of a fresh process) streaming N and 10·N samples")
        print("| stage | model | batch | N (batches) | RSS before calibration | peak at N | peak at 10·N | ratio | 10·N run: peak after batch 1 / 2 / 3 / 5 / 10 | 10·N run s |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rss:
            a, b = r["small"], r["large"]
            tr = b["trace_mb"]
            pick = " / ".join(f"{tr[i]:.0f}" for i in (1, 2, 3, 5, 10) if i < len(tr))
            print(f"| {r['what']} | {r['model']} | {r['batch']} | {r['n']} ({-(-r['n'] // r['batch'])}) | {a['hwm_before_mb']:.0f} MiB | "
                  f"{a['hwm_mb']:.0f} MiB | {b['hwm_mb']:.0f} MiB | **{r['ratio']:.3f}** | {pick} | {b['seconds']:.0f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="onnxprune calibration benchmark (see the module docstring)")
    ap.add_argument("--quick", action="store_true", help="fewer samples and repetitions (~3 min)")
    ap.add_argument("--models", default="cnn,effnet-ts,effnet-dynamo")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--json", type=Path, help="write the raw numbers here")
    ap.add_argument("--child", nargs=4, metavar=("WHAT", "MODEL", "N", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], int(args.child[2]), int(args.child[3]))))
        return 0
    keys = args.models.split(",")
    for k in keys:
        if not MODELS[k].exists() or (k != "cnn" and not PHOTOS.exists()):
            raise SystemExit(f"{MODELS[k]} or {PHOTOS} missing: run .venv/bin/python benchmarks/assets.py first")
    q = args.quick
    t0 = time.perf_counter()
    times, rss = [], []
    for k in keys:
        t = time.perf_counter()
        if k == "cnn":
            times.append(bench_time(k, 1024 if q else 4096, 3 if q else 7, 1024))
        else:
            times.append(bench_time(k, 96 if q else None, 1 if q else 2, 64 if q else 128))
        print(f"[time] {k}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    if not args.skip_rss:
        # N spans several batches: onnxruntime and the allocator reach their plateau by batch 3-5
        plan = [("calibrate", "cnn", 512 if q else 2048, BATCH), ("prune", "cnn", 512 if q else 2048, BATCH)]
        plan += [("calibrate", k, 24 if q else 40, 8) for k in keys if k != "cnn"]
        if not q:  # the default batch size: two batches' outputs used to be held at once
            plan += [("calibrate", "effnet-dynamo", 64, BATCH)]
        for what, k, n, bs in plan:
            if k not in keys:
                continue
            t = time.perf_counter()
            rss.append(bench_rss(what, k, n, bs))
            print(f"[rss] {what} {k}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    print_tables(times, rss)
    total = time.perf_counter() - t0
    print(f"\ntotal {total:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"time": times, "rss": rss, "total_s": total, "quick": q}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
