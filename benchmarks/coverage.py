#!/usr/bin/env python3
"""Structural coverage: every torchvision classification architecture (random weights),
exported with both torch exporters, pruned by onnxprune at 30% with ``l1``.

torchvision needs its own environment (the ``dev`` extra pins torch 2.13.0)::

    python3.11 -m venv /work/venv-tv
    /work/venv-tv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /work/venv-tv/bin/pip install onnxscript onnx onnxruntime
    /work/venv-tv/bin/pip install -e '.[cpu]'
    nice -n 10 /work/venv-tv/bin/python benchmarks/coverage.py [--models 'resnet*'] \\
        [--exporter torchscript|dynamo|both] [--timeout 900] [--max-params 200e6]

For each model and exporter, each step in its own subprocess (timeout, memory cap):

1. export (cached in ``benchmarks/.cache/coverage/``): ``torchvision.models.get_model(name,
   weights=None)`` in eval mode, seed 0, example input ``[B, 3, S, S]`` (S = 224, 299 for
   inception_v3; B = 1, 2 for dynamo, which specialises a batch of 1), batch dim dynamic;
   ``torch.onnx.export(dynamo=False)`` or ``dynamo=True``;
2. ``onnxprune.analyze``: prunable share of MACs, the op of every blocked group's reasons;
3. ``onnxprune.prune(method="l1", ratio=0.3, latency=False)`` (its own verification included);
4. an independent check of the written file: ``onnx.checker.check_model(full_check=True)``,
   an onnxruntime run at batch 1 and 3 on random input, output shapes equal to the
   original's on the same input, finite where the original is, and the float parameters
   (initializers + Constant nodes, counted here with onnx) fewer than the original's.

A row is *ok* when 4 passes and the graph is smaller.  *INVALID* is a written file that
fails 4 (onnxprune's verification let it through); *error* is an exception from onnxprune
(nothing written); *timeout*, *too big* (more parameters than ``--max-params``, never
exported) and *export failed* are reported as such, never dropped.

Prints a table (rich when installed) and a summary; ``--json`` and ``--markdown`` write them.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import resource
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache" / "coverage"
EXPORTERS = ("torchscript", "dynamo")
SIZES = {"inception_v3": 299}
RATIO = 0.3


# --------------------------------------------------------------------------- worker side


def _limit_memory(gib: float) -> None:
    # RLIMIT_DATA (private writable memory: the heap, numpy arrays), not RLIMIT_AS: onnx_ir
    # maps the whole external-data file once per tensor, read-only, which costs address
    # space but no memory, and would exhaust an address-space cap on a 100 MB model.
    if gib > 0:
        cap = int(gib * 2**30)
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))


def export(name: str, exporter: str, path: Path) -> dict:
    """Export torchvision's ``name`` with random weights to ``path``."""
    import torch
    import torchvision

    # nn.MultiheadAttention's inference fast path (vit_*) is one fused op: the TorchScript
    # exporter cannot export it, and the dynamo export then fixes the batch inside.
    torch.backends.mha.set_fastpath_enabled(False)
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    s = SIZES.get(name, 224)
    # dynamo: a batch-1 example lets torch.export specialise the batch to 1 inside (vit_*
    # gets a Reshape to [50, 3072] that fails at batch 2 while the input is declared dynamic).
    x = torch.randn(1 if exporter == "torchscript" else 2, 3, s, s)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.onnx")
    t = time.perf_counter()
    with torch.no_grad():
        if exporter == "torchscript":
            torch.onnx.export(
                model, (x,), str(tmp), dynamo=False, input_names=["input"], output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            )
        else:
            torch.onnx.export(
                model, (x,), str(tmp), dynamo=True, input_names=["input"], output_names=["output"],
                dynamic_shapes=({0: torch.export.Dim.DYNAMIC},),
            )
    # Move the model (and its external data, renamed consistently) into place.
    import onnx

    proto = onnx.load(str(tmp), load_external_data=True)
    for p in (path, path.with_name(path.name + ".data")):
        p.unlink(missing_ok=True)
    big = sum(t_.ByteSize() for t_ in proto.graph.initializer) > 1_500_000_000
    onnx.save_model(proto, str(path), save_as_external_data=big or exporter == "dynamo",
                    all_tensors_to_one_file=True, location=path.name + ".data", size_threshold=1024)
    for p in tmp.parent.glob(tmp.name + "*"):
        p.unlink()
    return {"export_s": round(time.perf_counter() - t, 1), "size": s}


_OP = re.compile(r"^([A-Z][A-Za-z0-9]*)(?: '|:)")


def blocked_op(reason: str) -> str:
    """The op a blocked group's reason names (``Reshape 'n': ...`` → ``Reshape``)."""
    m = re.search(r"op '(?:[\w.]+::)?(\w+)' is not in onnxprune's op table", reason)
    if m:
        return f"{m.group(1)}?"  # unknown op
    if "is a graph output" in reason:
        return "graph output"
    if "is read inside a subgraph" in reason:
        return "subgraph"
    m = _OP.match(reason)
    return m.group(1) if m else reason.split(":")[0][:30]


def float_params(path: Path) -> int:
    """Elements of every float initializer and float Constant tensor, counted with onnx alone."""
    import numpy as np
    import onnx
    from onnx import TensorProto

    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
    proto = onnx.load(str(path), load_external_data=False)
    total = sum(int(np.prod(t.dims)) for t in proto.graph.initializer if t.data_type in floats)
    for node in proto.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type in floats:
                    total += int(np.prod(a.t.dims))
    return total


def check_written(original: Path, pruned: Path) -> dict:
    """Independent re-check of the pruned file; returns what failed, if anything."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    out: dict = {"checker": True, "runs": True, "same_shapes": True, "finite": True}
    try:
        onnx.checker.check_model(str(pruned), full_check=True)
    except Exception as exc:
        out["checker"] = False
        out["why"] = f"checker: {' '.join(str(exc).split())[:200]}"
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    a = ort.InferenceSession(str(original), opts, providers=["CPUExecutionProvider"])
    try:
        b = ort.InferenceSession(str(pruned), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        out["runs"] = False
        out.setdefault("why", f"onnxruntime: {' '.join(str(exc).split())[:200]}")
        return out
    rng = np.random.default_rng(1)
    inp = a.get_inputs()[0]
    for batch in (1, 3):
        shape = [batch if not isinstance(d, int) else d for d in inp.shape]
        feed = {inp.name: rng.standard_normal(shape).astype(np.float32)}
        ya = a.run(None, feed)
        try:
            yb = b.run(None, feed)
        except Exception as exc:
            out["runs"] = False
            out.setdefault("why", f"onnxruntime run (batch {batch}): {' '.join(str(exc).split())[:200]}")
            return out
        for u, v in zip(ya, yb):
            if np.shape(u) != np.shape(v):
                out["same_shapes"] = False
                out.setdefault("why", f"output shape {np.shape(u)} -> {np.shape(v)} at batch {batch}")
            elif (np.isfinite(u) & ~np.isfinite(v)).any():
                out["finite"] = False
                out.setdefault("why", "non-finite outputs the original does not have")
    return out


def worker(args: argparse.Namespace) -> dict:
    _limit_memory(args.memory_gib)
    name, exporter = args.worker
    path = CACHE / f"{name}.{exporter}.onnx"
    if args.stage == "export":
        return export(name, exporter, path)
    import onnxprune
    from onnxprune.errors import OnnxPruneError

    row: dict = {}
    t = time.perf_counter()
    rep = onnxprune.analyze(path)
    row["groups"] = len(rep.groups)
    row["prunable_groups"] = sum(g.prunable for g in rep.groups)
    row["prunable_macs"] = rep.prunable_macs / rep.macs if rep.macs else 0.0
    row["prunable_params"] = rep.prunable_params / rep.params if rep.params else 0.0
    ops = Counter()
    examples = {}
    for g in rep.groups:
        for op in {blocked_op(r) for r in g.blocked}:
            ops[op] += 1
            examples.setdefault(op, next(r for r in g.blocked if blocked_op(r) == op)[:240])
    row["blocked"] = dict(ops.most_common())
    row["blocked_examples"] = examples
    row["analyze_s"] = round(time.perf_counter() - t, 1)
    row["macs"], row["params"] = rep.macs, rep.params
    if args.stage == "analyze":
        return row
    out = CACHE / "pruned" / f"{name}.{exporter}.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    for p in (out, *out.parent.glob(out.name + ".*.data")):  # NAME.<hash>.data
        p.unlink(missing_ok=True)
    t = time.perf_counter()
    try:
        _, res = onnxprune.prune(path, out, method="l1", ratio=RATIO, latency=False)
    except OnnxPruneError as exc:
        row.update(status="error", error=f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}")
        row["prune_s"] = round(time.perf_counter() - t, 1)
        return row
    row["prune_s"] = round(time.perf_counter() - t, 1)
    row["params_kept"] = res.params_after / res.params_before
    row["macs_kept"] = res.macs_after / res.macs_before if res.macs_before else None
    t = time.perf_counter()
    chk = check_written(path, out)
    before, after = float_params(path), float_params(out)
    row["float_params"] = [before, after]
    row["check_s"] = round(time.perf_counter() - t, 1)
    row["check"] = chk
    valid = chk["checker"] and chk["runs"] and chk["finite"]
    row["valid"] = valid
    row["same_shapes"] = chk["same_shapes"]
    row["smaller"] = after < before
    row["status"] = "ok" if valid and chk["same_shapes"] and after < before else (
        "INVALID" if not (valid and chk["same_shapes"]) else "not smaller")
    if not args.keep:
        for p in (out, *out.parent.glob(out.name + ".*.data")):  # NAME.<hash>.data
            p.unlink(missing_ok=True)
    return row


# --------------------------------------------------------------------------- driver side


def _run_stage(stage: str, name: str, exporter: str, args: argparse.Namespace) -> tuple[str, dict]:
    """Run one stage in a subprocess; ('done', result) / ('timeout'|'failed', {error})."""
    cmd = [sys.executable, __file__, "--worker", name, exporter, "--stage", stage,
           "--memory-gib", str(args.memory_gib)] + (["--keep"] if args.keep else [])
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return "timeout", {"error": f"{stage} took more than {args.timeout:g} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("@@RESULT ")]
    if p.returncode == 0 and lines:
        return "done", json.loads(lines[-1][len("@@RESULT "):])
    tail = [ln for ln in (p.stderr or "").strip().splitlines() if ln.strip()]
    why = tail[-1][:300] if tail else f"exit code {p.returncode}"
    if p.returncode < 0 or "MemoryError" in why or "std::bad_alloc" in why:
        why = f"out of memory under the {args.memory_gib:g} GiB cap ({why})"
    return "failed", {"error": why}


def model_params(name: str) -> int:
    import torch
    import torchvision

    try:
        with torch.device("meta"):
            m = torchvision.models.get_model(name, weights=None)
    except NotImplementedError:  # regnet computes its widths with real tensors
        m = torchvision.models.get_model(name, weights=None)
    return sum(p.numel() for p in m.parameters())


def run_one(name: str, exporter: str, n_params: int, args: argparse.Namespace) -> dict:
    row = {"model": name, "exporter": exporter, "torch_params": n_params}
    t0 = time.perf_counter()
    if args.max_params and n_params > args.max_params:
        row.update(status="too big", error=f"{n_params / 1e6:.0f} M params > --max-params {args.max_params / 1e6:.0f} M")
        return row
    path = CACHE / f"{name}.{exporter}.onnx"
    if not path.exists() or args.reexport:
        state, res = _run_stage("export", name, exporter, args)
        if state != "done":
            row.update(status="export " + ("timeout" if state == "timeout" else "failed"), **res)
            row["seconds"] = round(time.perf_counter() - t0, 1)
            return row
        row.update(res)
    state, res = _run_stage("prune", name, exporter, args)
    if state != "done":
        row.update(status="timeout" if state == "timeout" else "crashed", **res)
    else:
        row.update(res)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def torchvision_gmacs(name: str) -> tuple[float | None, int | None]:
    """torchvision's own GFLOPS figure (multiply-adds, per its docs) and the crop it is for."""
    import torchvision

    try:
        w = torchvision.models.get_model_weights(name).DEFAULT
    except Exception:
        return None, None
    return w.meta.get("_ops"), w.transforms.keywords.get("crop_size")


def reanalyze(names: list[str], exporters, args: argparse.Namespace) -> None:
    rows = json.loads(args.json.read_text()) if args.json and args.json.exists() else []
    for r in rows:
        if r["model"] not in names or r["exporter"] not in exporters:
            continue
        if not (CACHE / f"{r['model']}.{r['exporter']}.onnx").exists():
            continue
        state, res = _run_stage("analyze", r["model"], r["exporter"], args)
        if state == "done":
            r.update(res)
        r["tv_gmacs"], r["tv_crop"] = torchvision_gmacs(r["model"])
        print(r["model"], r["exporter"], r.get("macs"), r["tv_gmacs"], r["tv_crop"], flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))


def _fmt_blocked(b: dict) -> str:
    # Every classifier's logits are a graph output: that one blocked group says nothing.
    b = {op: n for op, n in b.items() if op != "graph output"}
    return ", ".join(f"{op}×{n}" for op, n in b.items()) if b else "-"


def _cells(r: dict) -> list[str]:
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}"

    valid = {True: "yes", False: "NO"}.get(r.get("valid"), "-")
    shapes = {True: "yes", False: "NO"}.get(r.get("same_shapes"), "-")
    status = r["status"]
    if status != "ok":
        status += ": " + (r.get("error") or r.get("check", {}).get("why") or "")[:90]
    gmacs = "-" if r.get("macs") is None else f"{r['macs'] / 1e9:.3g}"
    if r.get("tv_gmacs") is not None and r.get("tv_crop") == r.get("size", SIZES.get(r["model"], 224)):
        gmacs += f" ({r['tv_gmacs']:.3g})"  # torchvision's figure, where it is for the same input size
    return [r["model"], r["exporter"], status, valid, pct(r.get("params_kept")), pct(r.get("macs_kept")), shapes,
            pct(r.get("prunable_macs")), gmacs, _fmt_blocked(r.get("blocked") or {}), f"{r.get('seconds', 0):.0f}"]


HEAD = ["model", "exporter", "status", "valid", "params kept %", "MACs kept %", "same out shapes",
        "prunable MACs %", "GMACs (torchvision's)", "blocked groups by op", "s"]


def summary(rows: list[dict]) -> list[str]:
    lines = []
    for exp in EXPORTERS:
        mine = [r for r in rows if r["exporter"] == exp]
        if not mine:
            continue
        ok = sum(r["status"] == "ok" for r in mine)
        invalid = sum(r["status"] == "INVALID" for r in mine)
        other = Counter(r["status"] for r in mine if r["status"] not in ("ok", "INVALID"))
        rest = "".join(f", {n} {s}" for s, n in sorted(other.items()))
        lines.append(f"{exp}: {ok} of {len(mine)} valid & smaller ({100 * ok / len(mine):.1f}%), {invalid} invalid{rest}")
    ok = sum(r["status"] == "ok" for r in rows)
    invalid = sum(r["status"] == "INVALID" for r in rows)
    if rows:
        lines.append(f"all: {ok} of {len(rows)} valid & smaller ({100 * ok / len(rows):.1f}%), {invalid} invalid")
    return lines


def markdown(rows: list[dict]) -> str:
    out = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    for r in rows:
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(r)) + " |")
    return "\n".join(out)


def show(rows: list[dict]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(markdown(rows))
    else:
        table = Table(*HEAD)
        for r in rows:
            table.add_row(*_cells(r))
        Console(width=220).print(table)
    for line in summary(rows):
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=["*"], help="fnmatch patterns over torchvision classification model names")
    ap.add_argument("--exporter", choices=["torchscript", "dynamo", "both"], default="both")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per step (export, prune+check) of one model")
    ap.add_argument("--memory-gib", type=float, default=14, help="memory cap (RLIMIT_DATA) of each step's subprocess")
    ap.add_argument("--max-params", type=float, default=0, help="report models with more parameters as too big (0: no limit)")
    ap.add_argument("--reexport", action="store_true", help="export again even when cached")
    ap.add_argument("--keep", action="store_true", help="keep the pruned files in benchmarks/.cache/coverage/pruned/")
    ap.add_argument("--json", type=Path, help="write the rows here (merged with rows already there)")
    ap.add_argument("--markdown", type=Path, help="write the table and summary here")
    ap.add_argument("--from-json", type=Path, nargs="+",
                    help="only print the table of these files (later ones override; with --json/--markdown: write the merge)")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--stage", choices=["export", "analyze", "prune"], help=argparse.SUPPRESS)
    ap.add_argument("--analyze-only", action="store_true",
                    help="re-run only onnxprune.analyze on the cached exports and update those fields of the --json rows")
    args = ap.parse_args()

    if args.worker:
        res = worker(args)
        print("@@RESULT " + json.dumps(res), flush=True)
        return
    if args.from_json:
        merged: dict = {}
        for f in args.from_json:  # later files override earlier rows of the same model/exporter
            for r in json.loads(f.read_text()):
                key = (r["model"], r["exporter"])
                merged[key] = {**merged.get(key, {}), **r}
        rows = sorted(merged.values(), key=lambda r: (r["model"], EXPORTERS.index(r["exporter"])))
        show(rows)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
        if args.markdown:
            args.markdown.write_text(markdown(rows) + "\n\n" + "\n".join(f"- {s}" for s in summary(rows)) + "\n")
        return

    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in args.models)]
    exporters = EXPORTERS if args.exporter == "both" else (args.exporter,)
    old = json.loads(args.json.read_text()) if args.json and args.json.exists() else []
    if args.analyze_only:
        reanalyze(names, exporters, args)
        return
    sizes = {n: model_params(n) for n in names}
    rows = []
    for name in sorted(names, key=sizes.get):  # small models first
        n_params = sizes[name]
        for exp in exporters:
            row = run_one(name, exp, n_params, args)
            rows.append(row)
            print(" | ".join(_cells(row)), flush=True)
            if args.json:
                keep = [r for r in old if (r["model"], r["exporter"]) not in {(x["model"], x["exporter"]) for x in rows}]
                merged = sorted(keep + rows, key=lambda r: (r["model"], EXPORTERS.index(r["exporter"])))
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(merged, indent=1))
    show(rows)
    if args.markdown:
        args.markdown.write_text(markdown(rows) + "\n\n" + "\n".join(f"- {s}" for s in summary(rows)) + "\n")


if __name__ == "__main__":
    main()
