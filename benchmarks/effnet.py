#!/usr/bin/env python3
"""EfficientNet-Lite0 (real ImageNet weights, both torch exporters) pruned by onnxprune to
70% of its MACs, scored on real photos.

Run from the repository root (assets first; ~25 min on 2 CPU cores, most of it the lstsq refits, ``--sweep`` ~15 min):

    .venv/bin/python benchmarks/assets.py
    .venv/bin/python benchmarks/effnet.py [--quick] [--sweep] [--json benchmarks/.cache/effnet.json]

For each export (``effnet_lite0.onnx``: TorchScript exporter, opset 17;
``effnet_lite0_dynamo.onnx``: dynamo exporter, external data) this records
``onnxprune.analyze()`` (groups, prunable share of params/MACs, blocked groups and why), then
runs, for ``wanda`` with ``bias`` and ``lstsq`` compensation and ``l1`` with ``bias``, the equivalent of

    onnxprune MODEL OUT --calib benchmarks/.cache/photos_calib --eval benchmarks/.cache/photos_eval \\
        --resize 256 --crop 224 --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 \\
        --method METHOD --target-macs 0.7 --compensate bias|lstsq

(calibration: the 300 photos with index % 4 != 3; evaluation: the other 100, see
``assets.py``; the two folders are symlinks into ``photos/``), and records the top-1
agreement with the unpruned model on the 99 evaluation photos, the relative L2 error of the
logits, onnxprune's MAC count before/after, an independent MAC count (every Conv/Gemm's output
shape as onnxruntime computes it on a real photo, × its weight's fan-in), and the latency of
both models (median, interleaved, batch 1 and 32, real photos) next to onnxprune's own figure.

Issue-4 target: ≥ 90% top-1 agreement with 30% of the MACs removed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import onnxprune  # noqa: E402
from assets import EFFNET, EFFNET_DYNAMO, PHOTOS, photo_split  # noqa: E402
from onnxprune import _ort  # noqa: E402
from onnxprune.data import Preprocess, batches, input_specs, source_items  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache"
PRE = Preprocess(resize=256, crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
MODELS = {"torchscript (opset 17)": EFFNET, "dynamo": EFFNET_DYNAMO}
TARGET = 0.7


def link_folder(folder: Path, files) -> Path:
    """``folder`` holding symlinks to ``files`` and nothing else."""
    folder.mkdir(exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    for p in files:
        (folder / p.name).symlink_to(p.resolve())
    return folder


def split_folders(n_calib: int | None, n_eval: int | None, where: Path = CACHE) -> tuple[Path, Path]:
    """``where``/photos_calib/ and photos_eval/: symlinks into photos/, rebuilt every run (runs
    that overlap need their own ``where``, or one relinks the folders the other is reading)."""
    photos, split = sorted(PHOTOS.glob("photo_*.jpg")), photo_split()
    calib = [p for p in photos if not split[p.name]][:n_calib]
    held = [p for p in photos if split[p.name]][:n_eval]
    return link_folder(where / "photos_calib", calib), link_folder(where / "photos_eval", held)


def summarize_analysis(path: Path) -> dict:
    rep = onnxprune.analyze(path)
    d = rep.to_dict()
    reasons = Counter()
    examples = {}
    for g in rep.groups:
        for r in g.blocked:
            kind = r.split(":")[-1].strip() if ":" in r else r
            reasons[kind] += 1
            examples.setdefault(kind, f"group {g.id} ({g.name}): {r}")
    return {
        "groups": len(rep.groups), "prunable_groups": sum(g.prunable for g in rep.groups),
        "params": rep.params, "macs": rep.macs,
        "prunable_params_share": d["prunable_params_share"], "prunable_macs_share": d["prunable_macs_share"],
        "blocked": [{"reason": k, "groups": v, "example": examples[k]} for k, v in reasons.most_common()],
    }


def true_macs(path: Path, sample: np.ndarray) -> int:
    """MACs per sample from onnxruntime's real shapes: every Conv/Gemm/MatMul output exposed."""
    import onnx

    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in m.graph.node if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    todo = []
    for n in m.graph.node:
        if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1:
            w = inits.get(n.input[1]) or consts.get(n.input[1])
            if w is None:
                continue
            todo.append((n, list(w.dims)))
            if n.output[0] not in {o.name for o in m.graph.output}:
                m.graph.output.append(onnx.helper.make_empty_tensor_value_info(n.output[0]))
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.onnx"
        onnx.save(m, str(p), save_as_external_data=True, location="m.onnx.data")
        sess = _ort.session(str(p))
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: sample[None]})))
    total = 0
    for n, wd in todo:
        y = outs[n.output[0]].shape
        if n.op_type == "Conv":
            total += int(np.prod(y)) * int(np.prod(wd[1:]))
        else:
            trans_b = any(a.name == "transB" and a.i for a in n.attribute)
            k = wd[1] if (n.op_type == "Gemm" and trans_b) else wd[0]
            total += int(np.prod(y)) * k
    return total


def latency(a: Path, b: Path, feed: dict, budget_s: float) -> tuple[float, float]:
    """Median wall time of one run of each model on ``feed``, interleaved."""
    sa, sb = _ort.session(str(a)), _ort.session(str(b))
    for s in (sa, sb):
        s.run(None, feed)
        s.run(None, feed)
    ta, tb = [], []
    start = time.perf_counter()
    while len(ta) < 5 or (time.perf_counter() - start < budget_s and len(ta) < 50):
        for s, ts in ((sa, ta), (sb, tb)):
            t = time.perf_counter()
            s.run(None, feed)
            ts.append(time.perf_counter() - t)
    return float(np.median(ta)), float(np.median(tb))


def ort_layout(path: Path) -> dict[str, int]:
    """Conv nodes onnxruntime runs in its blocked NCHWc layout vs the plain fallback, and the
    layout conversions it inserts (from the optimised graph it writes)."""
    import onnx
    import onnxruntime as rt

    with tempfile.TemporaryDirectory() as d:
        o = rt.SessionOptions()
        o.log_severity_level = 3
        o.optimized_model_filepath = str(Path(d) / "opt.onnx")
        rt.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
        m = onnx.load(str(Path(d) / "opt.onnx"), load_external_data=False)
    c = Counter((n.domain, n.op_type) for n in m.graph.node)
    return {
        "nchwc_conv": c[("com.microsoft.nchwc", "Conv")],
        "plain_conv": sum(v for (dom, op), v in c.items() if op in ("Conv", "FusedConv") and dom != "com.microsoft.nchwc"),
        "reorders": c[("com.microsoft.nchwc", "ReorderInput")] + c[("com.microsoft.nchwc", "ReorderOutput")],
    }


def run(label: str, path: Path, method: str, comp: str, round_to: int, target: float, calib: Path, held: Path,
        out_dir: Path, feeds: dict | None, lat_budget: float) -> dict:
    out = out_dir / f"{path.stem}_{method}_{comp}_{round_to}_{target}.onnx"
    t = time.perf_counter()
    row: dict = {"export": label, "method": method, "compensate": comp, "round_to": round_to, "target": target}
    try:
        _, res = onnxprune.prune(
            path, out, method=method, calib=str(calib), preprocess=PRE, target_macs=target, compensate=comp,
            eval_data=str(held), batch_size=32, round_to=round_to, latency=feeds is not None,
        )
    except Exception as exc:  # noqa: BLE001 - record onnxprune's failure as a result
        row.update(error=f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}", seconds=time.perf_counter() - t)
        return row
    row["seconds"] = time.perf_counter() - t
    row["stage_seconds"] = res.seconds
    row["fidelity"] = res.fidelity
    row["macs_onnxprune"] = (res.macs_before, res.macs_after)
    row["params"] = (res.params_before, res.params_after)
    row["latency_onnxprune"] = res.latency
    row["kept"] = [(g["id"], g["kept"], g["channels"]) for g in res.groups if not g["blocked"]]
    if feeds is not None:
        sample = feeds[1]["input"][0]
        row["macs_true"] = (true_macs(path, sample), true_macs(out, sample))
        row["latency"] = {bs: latency(path, out, feed, lat_budget) for bs, feed in feeds.items()}
        row["ort_layout"] = (ort_layout(path), ort_layout(out))
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="EfficientNet-Lite0 pruning benchmark (see the module docstring)")
    ap.add_argument("--quick", action="store_true", help="64 calibration photos, 32 evaluation photos")
    ap.add_argument("--sweep", action="store_true",
                    help="instead: wanda on the dynamo export at --target-macs 0.95/0.9/0.85/0.8 (agreement only)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if not (EFFNET.exists() and EFFNET_DYNAMO.exists() and PHOTOS.exists()):
        raise SystemExit("assets missing: run .venv/bin/python benchmarks/assets.py first")
    t0 = time.perf_counter()
    calib, held = split_folders(64 if args.quick else None, 32 if args.quick else None)
    n_cal, n_eval = len(list(calib.iterdir())), len(list(held.iterdir()))
    specs = input_specs(_ort.session(str(EFFNET)))
    evb = list(batches(source_items(held, specs, PRE)(), specs, 32))
    feeds = {1: {"input": evb[0]["input"][:1]}, 32: {"input": evb[0]["input"][:32]}}
    analyses = {label: summarize_analysis(p) for label, p in MODELS.items()}
    ts, dyn = MODELS.items()
    if args.sweep:  # (export, method, round_to, target, measure latency)
        plan = [(*dyn, "wanda", c, 1, t, False) for t in (0.95, 0.9, 0.85, 0.8) for c in ("bias", "lstsq")]
    else:
        plan = [(*ts, "wanda", "bias", 1, TARGET, True), (*ts, "wanda", "lstsq", 1, TARGET, True),
                (*ts, "l1", "bias", 1, TARGET, True), (*dyn, "wanda", "bias", 1, TARGET, True),
                (*dyn, "wanda", "lstsq", 1, TARGET, True), (*dyn, "l1", "bias", 1, TARGET, True),
                (*dyn, "wanda", "lstsq", 16, TARGET, True)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-effnet-") as d:
        for label, path, method, comp, round_to, target, lat in plan:
            t = time.perf_counter()
            rows.append(run(label, path, method, comp, round_to, target, calib, held, Path(d), feeds if lat else None,
                            3.0 if args.quick else 6.0))
            print(f"[{label} {method}/{comp} round_to={round_to} target={target}] {time.perf_counter() - t:.0f} s", file=sys.stderr)
    total = time.perf_counter() - t0

    print(f"\nanalyze() ({n_cal} calibration photos, {n_eval} evaluation photos)")
    print("| export | groups (prunable) | params | MACs (onnxprune) | prunable share params / MACs | blocked groups: reason (count) |")
    print("|---|---|---|---|---|---|")
    for label, a in analyses.items():
        why = "; ".join(f"{b['reason']} ({b['groups']})" for b in a["blocked"]) or "-"
        print(f"| {label} | {a['groups']} ({a['prunable_groups']}) | {a['params']:,} | {a['macs']:,} | "
              f"{a['prunable_params_share']:.1%} / {a['prunable_macs_share']:.1%} | {why} |")
    print(f"\ntop-1 agreement with the unpruned model on {n_eval} held-out photos")
    print("| export | method | --compensate | --round-to | --target-macs | top-1 agreement | rel. L2 (logits) | MACs removed (onnxprune count) | MACs removed (real shapes) | "
          "params removed | latency speedup b1 / b32 | onnxprune's latency speedup | ORT convs NCHWc / fallback / reorders (before → after) | calibrate s | compensate s | total s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        head = f"| {r['export']} | {r['method']} | {r['compensate']} | {r['round_to']} | {r['target']} |"
        if "error" in r:
            print(f"{head} error: {r['error']} | | | | | | | | | | {r['seconds']:.0f} |")
            continue
        mo, pa = r["macs_onnxprune"], r["params"]
        mt = r.get("macs_true")
        true = f"{1 - mt[1] / mt[0]:.1%} ({mt[0] / 1e6:.0f}M → {mt[1] / 1e6:.0f}M)" if mt else "-"
        lat = r.get("latency")
        sp = " / ".join(f"{lat[b][0] / lat[b][1]:.2f}×" for b in (1, 32)) if lat else "-"
        lo = r["latency_onnxprune"] or {}
        lo_s = f"{lo['speedup']:.2f}×" if lo.get("speedup") else "-"
        lay = r.get("ort_layout")
        lays = f"{lay[0]['nchwc_conv']}/{lay[0]['plain_conv']}/{lay[0]['reorders']} → {lay[1]['nchwc_conv']}/{lay[1]['plain_conv']}/{lay[1]['reorders']}" if lay else "-"
        print(f"{head} **{r['fidelity']['agreement']:.1%}** | {r['fidelity']['rel_l2']:.3f} | "
              f"{1 - mo[1] / mo[0]:.1%} ({mo[0]:,} → {mo[1]:,}) | {true} | {1 - pa[1] / pa[0]:.1%} | {sp} | "
              f"{lo_s} | {lays} | "
              f"{r['stage_seconds'].get('calibrate', 0):.0f} | {r['stage_seconds'].get('compensate', 0):.0f} | {r['seconds']:.0f} |")
    print(f"\ntotal {total:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"analyze": analyses, "runs": rows, "total_s": total, "quick": args.quick,
                                         "calib_photos": n_cal, "eval_photos": n_eval}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
