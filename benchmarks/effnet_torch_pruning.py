#!/usr/bin/env python3
"""EfficientNet-Lite0 (real ImageNet weights): onnxprune against Torch-Pruning 1.6.1 at equal MACs.

Exact command (from the repository root; ~25 min on 2 shared CPU cores, most of it the lstsq refits):

    .venv/bin/python benchmarks/assets.py                  # once: model + photos
    .venv/bin/python benchmarks/effnet_torch_pruning.py [--points 30,50]

For each point x (percent of MACs removed; default 30 and 50):

* Torch-Pruning: ``MagnitudePruner`` with ``GroupMagnitudeImportance(p=1)`` (the criterion of
  onnxprune's ``l1``), classifier ``_fc`` ignored, no fine-tuning, ``global_pruning=True`` and
  ``False`` (uniform per layer); the pruned module is exported as ``assets.py`` exports the
  original (TorchScript exporter, opset 17, dynamic batch) and ``pruning_ratio`` is bisected
  (``quality.match``) until the file's MACs (onnxprune's counter) are at most 1 - x.
* onnxprune on ``effnet_lite0.onnx`` with ``target_macs = 1 - x``, ``round_to=1``:
  ``l1/none`` without data (also at each Torch-Pruning file's exact kept MACs, for the
  same-criterion comparison), and with the 301 calibration photos (``eval_samples=0``):
  ``l1/bias``, ``l1/lstsq``, ``wanda/lstsq`` (per-group shares allocated by measured
  sensitivity) and ``l1/lstsq`` with ``global_=True`` (the global-threshold selection).

Measured for every pruned file: top-1 agreement with the unpruned ONNX model on the 100
evaluation photos (decoded by onnxprune's data path with ``effnet.PRE``), relative L2 error of
the logits (‖y − y'‖ / ‖y‖ over all photos), MACs removed and params (onnxprune's counters on
the written file), and the wall time of the prune call (Torch-Pruning: pruner setup + step,
without the export).  Raw results: ``benchmarks/.cache/effnet_torch_pruning.json``; pruned
files: ``benchmarks/.cache/effnet_tp/``.  The photo split is ``effnet.split_folders``'s, linked
into its own folders (``tp_photos_calib``/``tp_photos_eval``) so that a concurrent run of
``effnet.py`` rebuilding its folders cannot disturb this one.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from importlib.metadata import version
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

import onnxprune  # noqa: E402
from assets import EFFNET, PHOTOS, _torch_model, photo_split  # noqa: E402
from effnet import PRE  # noqa: E402
from onnxprune.count import count_macs, count_params  # noqa: E402
from onnxprune.data import batches, input_specs, source_items  # noqa: E402
from onnxprune.load import load_model  # noqa: E402
from quality import match  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache"
OUT_DIR = CACHE / "effnet_tp"
JSON = CACHE / "effnet_torch_pruning.json"
GRID = [0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6]
ITERS = 10
# (label, method, compensate, global_, with data)
ONNXPRUNE = [
    ("onnxprune l1/none", "l1", "none", False, False),
    ("onnxprune l1/bias (alloc)", "l1", "bias", False, True),
    ("onnxprune l1/lstsq (alloc)", "l1", "lstsq", False, True),
    ("onnxprune l1/lstsq (global)", "l1", "lstsq", True, True),
    ("onnxprune wanda/lstsq (alloc)", "wanda", "lstsq", False, True),
]


def session(path: Path) -> ort.InferenceSession:
    """A one-thread onnxruntime CPU session."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def own_split() -> tuple[Path, Path]:
    """effnet.split_folders()'s split (301 calibration / 99 evaluation photos), in our own folders."""
    photos, split = sorted(PHOTOS.glob("photo_*.jpg")), photo_split()
    out = []
    for name, keep in (("tp_photos_calib", False), ("tp_photos_eval", True)):
        d = CACHE / name
        d.mkdir(exist_ok=True)
        for old in d.iterdir():
            old.unlink()
        for p in photos:
            if split[p.name] == keep:
                (d / p.name).symlink_to(Path("..") / "photos" / p.name)
        out.append(d)
    return out[0], out[1]


def macs_of(path: Path) -> int:
    return count_macs(load_model(path)[0])


def op_counts(path: Path) -> dict[str, int]:
    return dict(Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node))


class Scorer:
    """Logits of a file on the evaluation photos, compared with the unpruned model's."""

    def __init__(self, held: Path) -> None:
        specs = input_specs(session(EFFNET))
        self.x = np.concatenate([b["input"] for b in batches(source_items(held, specs, PRE)(), specs, 50)])
        self.ref = self.logits(EFFNET)
        self.macs0, self.params0 = macs_of(EFFNET), count_params(load_model(EFFNET)[0])
        self.ops0 = op_counts(EFFNET)

    def logits(self, path: Path) -> np.ndarray:
        s = session(path)
        return np.concatenate([s.run(None, {"input": self.x[i : i + 25]})[0] for i in range(0, len(self.x), 25)])

    def score(self, path: Path) -> dict:
        y = self.logits(path)
        model = load_model(path)[0]
        ops = op_counts(path)
        return {
            "agreement": float((y.argmax(1) == self.ref.argmax(1)).mean()),
            "rel_l2": float(np.linalg.norm(y - self.ref) / np.linalg.norm(self.ref)),
            "removed": 1 - count_macs(model) / self.macs0, "params": count_params(model),
            "ops_differ": {k: (self.ops0.get(k, 0), ops.get(k, 0)) for k in set(ops) | set(self.ops0)
                           if self.ops0.get(k, 0) != ops.get(k, 0)},
        }


class TorchPruning:
    """Torch-Pruning MagnitudePruner, group L1, global or uniform, classifier ignored; cached by ratio."""

    def __init__(self, global_: bool, work: Path, macs0: int) -> None:
        import torch

        self.torch, self.global_, self.work, self.macs0 = torch, global_, work, macs0
        self.net = _torch_model()
        self.cache: dict[float, tuple] = {}

    def prune(self, ratio: float):
        """A pruned copy of the network and the seconds of pruner setup + step."""
        import torch_pruning as tp

        net = copy.deepcopy(self.net)
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = tp.pruner.MagnitudePruner(
                net, self.torch.zeros(1, 3, 224, 224), importance=tp.importance.GroupMagnitudeImportance(p=1),
                global_pruning=self.global_, pruning_ratio=ratio, ignored_layers=[net._fc],
            )
            pruner.step()
        return net.eval(), time.perf_counter() - t

    def export(self, net, path: Path) -> None:
        """As assets._export(dynamo=False) does it."""
        x = self.torch.randn(2, 3, 224, 224, generator=self.torch.Generator().manual_seed(1))
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            self.torch.onnx.export(
                net, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )

    def __call__(self, ratio: float) -> tuple:
        """(kept MACs fraction, file, prune seconds, pruned module) at ``ratio``."""
        ratio = round(ratio, 12)
        if ratio not in self.cache:
            net, dt = self.prune(ratio)
            out = self.work / f"tp_{int(self.global_)}_{len(self.cache)}.onnx"
            self.export(net, out)
            self.cache[ratio] = (macs_of(out) / self.macs0, out, dt, net)
        return self.cache[ratio]


def run_onnxprune(label: str, method: str, comp: str, global_: bool, data: bool, target: float, calib: Path,
                  out: Path, scorer: Scorer) -> dict:
    row = {"setting": label, "target_macs": target, "method": method, "compensate": comp, "global_": global_}
    kw = dict(calib=str(calib), preprocess=PRE, eval_samples=0) if data else {}
    t = time.perf_counter()
    try:
        _, res = onnxprune.prune(EFFNET, out, method=method, compensate=comp, target_macs=target, round_to=1,
                                 latency=False, global_=global_, **kw)
    except Exception as exc:  # noqa: BLE001 - recorded as a result
        row.update(error=f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - t)
        return row
    row["seconds"] = time.perf_counter() - t
    row.update(scorer.score(out), selection=res.selection, stage_seconds=res.seconds, file=str(out.relative_to(ROOT)),
               kept=[(g["id"], g["kept"], g["channels"]) for g in res.groups if not g["blocked"]])
    return row


def best_line(x: float, rows: list[dict]) -> str:
    ok = [r for r in rows if r["point"] == x and "agreement" in r]
    best = max(ok, key=lambda r: (r["agreement"], -r["rel_l2"]))
    parts = [f"{x:.0%}: best {best['setting']} ({best['agreement']:.0%} agreement, rel. L2 {best['rel_l2']:.3f})"]
    for mode in ("global", "uniform"):
        tp_row = next((r for r in ok if r["setting"] == f"torch-pruning l1 {mode}"), None)
        op_row = next((r for r in ok if r["setting"] == f"onnxprune l1/none @TP-{mode} MACs"), None)
        if tp_row and op_row:
            beats = (op_row["agreement"], -op_row["rel_l2"]) > (tp_row["agreement"], -tp_row["rel_l2"])
            tie = " (agreement tied: decided by rel. L2 only)" if op_row["agreement"] == tp_row["agreement"] else ""
            parts.append(f"same criterion at TP-{mode}'s MACs ({tp_row['removed']:.1%} removed): onnxprune l1/none "
                         f"{op_row['agreement']:.0%} / {op_row['rel_l2']:.3f} vs TP {tp_row['agreement']:.0%} / "
                         f"{tp_row['rel_l2']:.3f} -> onnxprune {'beats' if beats else 'does NOT beat'} TP{tie}")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", default="30,50", help="percent of MACs removed, comma-separated")
    args = ap.parse_args(argv)
    points = [float(p) / 100 for p in args.points.split(",")]
    if not (EFFNET.exists() and PHOTOS.exists()):
        raise SystemExit("assets missing: run .venv/bin/python benchmarks/assets.py first")
    import torch
    import torch_pruning as tp

    torch.set_num_threads(1)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    calib, held = own_split()
    scorer = Scorer(held)
    log = lambda s: print(f"[{time.perf_counter() - t0:6.0f} s] {s}", file=sys.stderr, flush=True)  # noqa: E731
    rows: list[dict] = []
    meta: dict = {"macs": scorer.macs0, "params": scorer.params0, "eval_photos": len(scorer.x),
                  "calib_photos": len(list(calib.iterdir())), "torch": torch.__version__, "torch_pruning": f"{version('torch-pruning')} (__version__ {tp.__version__})",
                  "onnxruntime": ort.__version__, "points": points}
    with torch.no_grad():  # the torch model vs its ONNX export, on the evaluation photos
        meta["torch_vs_onnx_max_abs"] = float(np.abs(_torch_model()(torch.from_numpy(scorer.x)).numpy() - scorer.ref).max())

    with tempfile.TemporaryDirectory(prefix="tp-bisect-", dir=CACHE) as d:
        for global_ in (True, False):
            mode = "global" if global_ else "uniform"
            tpr = None
            try:
                tpr = TorchPruning(global_, Path(d), scorer.macs0)
                for x in points:
                    knob, (kept, path, dt, net) = match(tpr, 1 - x, GRID, ITERS)
                    final = OUT_DIR / f"tp_{mode}_{x:.2f}.onnx"
                    shutil.copyfile(path, final)
                    row = {"setting": f"torch-pruning l1 {mode}", "point": x, "knob": knob, "reached": knob is not None,
                           "seconds": dt, "file": str(final.relative_to(ROOT)), **scorer.score(final)}
                    with torch.no_grad():
                        y = net(torch.from_numpy(scorer.x)).numpy()
                    row["torch_vs_export_max_abs"] = float(np.abs(y - scorer.logits(final)).max())
                    row["widths"] = [m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
                    rows.append(row)
                    log(f"torch-pruning {mode} {x:.0%}: ratio {knob}, removed {row['removed']:.2%}, agreement {row['agreement']:.0%}")
                    # the same criterion in onnxprune at exactly this file's MACs
                    r = run_onnxprune(f"onnxprune l1/none @TP-{mode} MACs", "l1", "none", False, False, kept, calib,
                                      OUT_DIR / f"op_l1_none_at_tp_{mode}_{x:.2f}.onnx", scorer)
                    rows.append({**r, "point": x})
            except Exception as exc:  # noqa: BLE001 - recorded verbatim
                rows.append({"setting": f"torch-pruning l1 {mode}", "point": None, "error": f"{type(exc).__name__}: {exc}"})
                log(f"torch-pruning {mode} failed: {type(exc).__name__}: {exc}")
            meta[f"tp_{mode}_evaluations"] = len(tpr.cache) if tpr else 0

    for x in points:
        for label, method, comp, global_, data in ONNXPRUNE:
            out = OUT_DIR / f"op_{method}_{comp}_{'global' if global_ else 'alloc'}_{x:.2f}.onnx"
            r = run_onnxprune(label, method, comp, global_, data, 1 - x, calib, out, scorer)
            rows.append({**r, "point": x})
            log(f"{label} {x:.0%}: " + (r.get("error") or f"removed {r['removed']:.2%}, agreement {r['agreement']:.0%}, {r['seconds']:.0f} s"))

    meta["total_s"] = time.perf_counter() - t0
    JSON.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    print(f"\nEfficientNet-Lite0, {meta['macs']:,} MACs, {meta['params']:,} params; agreement with the unpruned model "
          f"on {meta['eval_photos']} evaluation photos; no fine-tuning\n")
    print("| setting | point | MACs removed % | agreement % | rel. L2 | params | prune s |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["point"] or 0, r["setting"])):
        pt = f"{r['point']:.0%}" if r["point"] is not None else "-"
        if "error" in r:
            print(f"| {r['setting']} | {pt} | error: {' '.join(r['error'].split())[:300]} | | | | |")
            continue
        print(f"| {r['setting']} | {pt} | {r['removed']:.2%} | {r['agreement']:.0%} | {r['rel_l2']:.3f} | "
              f"{r['params']:,} | {r['seconds']:.1f} |")
    print()
    for x in points:
        print(best_line(x, rows))
    print(f"\ntotal {meta['total_s']:.0f} s; raw results: {JSON.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
