#!/usr/bin/env python3
"""Where a prune's time goes: one prune of a ``cost.py`` row through the CLI in this process
under cProfile, summed into the parts that issue 17 is about (RESULTS "Cost", "Where the time
goes").

Exact command (repo root; the rows and their data as in ``benchmarks/cost.py``)::

    .venv/bin/python benchmarks/profile_prune.py [--row effnet|minilm|cnn] [--stats FILE.prof]
    .venv/bin/python benchmarks/profile_prune.py --row effnet --onnxruntime

``--onnxruntime``: no cProfile; instead every ``InferenceSession.run`` and session creation
is timed, per stage and per thread (the calibration's and the refit's runs are in their
worker threads), beside each stage's wall time.

Prints the wall time, the report's seconds per stage, and the cumulative seconds of each part
below (parts nest: the probes' and the refit's onnxruntime runs are also in "onnxruntime runs").
cProfile adds its own overhead to Python-heavy parts; onnxruntime and BLAS run at full speed.
cProfile sees the main thread only: calibration's reading and onnxruntime runs, and the
refit's pruned-graph segments, run one batch ahead in a worker thread (``onnxprune._ahead``)
and are in no part below but in their stage's seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
from onnxprune import _spin  # noqa: E402

_spin.settle()  # as the console script does, before numpy is imported
sys.path.insert(0, str(BENCH))
import cost  # noqa: E402

# (label, file suffix, function name): cumulative time of every function matching both (no
# suffix: a built-in, matched by a part of its name)
PARTS = (
    ("onnxruntime runs (all)", "", "onnxruntime_pybind11_state.run"),
    ("calibration (stage)", "onnxprune/calibrate.py", "calibrate"),
    ("  Gram sums", "onnxprune/gram.py", "update"),
    ("  image decoding", "onnxprune/data.py", "load_image"),
    ("  the refit's rows, recorded", "onnxprune/reconstruct.py", "update"),
    ("allocation probes (tails)", "onnxprune/allocate.py", "squared_errors"),
    ("segment runs (the refit's and the probes')", "onnxprune/segments.py", "_batches"),
    ("refit: the original's rows (a pass of its own: Ray, no record)", "onnxprune/reconstruct.py", "_record"),
    ("refit: fold sums", "onnxprune/reconstruct.py", "add"),
    ("refit: held-out fold errors", "onnxprune/reconstruct.py", "fold_errors"),
    ("  Cholesky solves", "onnxprune/gram.py", "solve_spd"),
    ("verification: fidelity", "onnxprune/verify.py", "measure_fidelity"),
    ("verification: latency", "onnxprune/verify.py", "paired_latency"),
)


def case_args(row: str, work: Path) -> tuple[Path, list[str], Path]:
    """The model, the CLI arguments after the two paths, and the cwd of ``row``."""
    if row == "cnn":
        c = cost.cnn_case()
        return cost.ROOT / c.model, c.args, cost.ROOT
    cases = cost.build_cases([row], argparse.Namespace(seq_len=48), work, {})
    c = next(iter(cases))
    return c.model, c.args, c.cwd


def part_seconds(stats: pstats.Stats) -> dict[str, float]:
    """Cumulative seconds of each PARTS entry (summed over matching functions)."""
    def matches(f: str, fn: str, suffix: str, name: str) -> bool:
        return f.endswith(suffix) and fn == name if suffix else name in fn

    return {label: sum(v[3] for (f, _, fn), v in stats.stats.items() if matches(f, fn, suffix, name))
            for label, suffix, name in PARTS}


def onnxruntime_time(run_cli) -> tuple[int, dict[str, float], dict[tuple[str, str], list]]:
    """``run_cli()`` with onnxruntime's runs and session creations timed: (its exit code,
    each stage's wall seconds, (stage, thread or "sessions built") -> [seconds, count])."""
    import threading

    import onnxruntime as rt

    from onnxprune import stages

    where = ["-"]
    walls: dict[str, float] = {}
    spent: dict[tuple[str, str], list] = {}

    def timed(fn, label):
        def call(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                key = (where[0], label or threading.current_thread().name)
                acc = spent.setdefault(key, [0.0, 0])
                acc[0] += time.perf_counter() - t
                acc[1] += 1
        return call

    def staged(cls):
        run = cls.run

        def call(self, state):
            where[0], t = cls.name, time.perf_counter()
            try:
                return run(self, state)
            finally:
                walls[cls.name] = time.perf_counter() - t
                where[0] = "-"
        return call

    originals = (rt.InferenceSession.run, rt.InferenceSession.__init__)
    rt.InferenceSession.run = timed(rt.InferenceSession.run, "")
    rt.InferenceSession.__init__ = timed(rt.InferenceSession.__init__, "sessions built")
    for cls in stages.PIPELINE:
        type(cls).run = staged(type(cls))
    try:
        rc = run_cli()
    finally:
        rt.InferenceSession.run, rt.InferenceSession.__init__ = originals
    return rc, walls, spent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--row", default="effnet", choices=("effnet", "minilm", "cnn"))
    ap.add_argument("--stats", type=Path, help="also write the raw cProfile stats here")
    ap.add_argument("--onnxruntime", action="store_true", help="time onnxruntime's runs per stage instead of cProfile")
    opts = ap.parse_args(argv)
    if opts.onnxruntime:
        from onnxprune import cli

        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            model, args, cwd = case_args(opts.row, work)
            argv_ = [str(model), str(work / "out.onnx"), *[a for a in args if a != "-q"], "-q"]
            os.chdir(cwd)
            rc, walls, spent = onnxruntime_time(lambda: cli.main(argv_))
        print(f"{opts.row}: exit {rc}")
        for stage, wall in walls.items():
            parts = ", ".join(f"{who} {s:.2f} s ({n})" for (st, who), (s, n) in spent.items() if st == stage)
            print(f"  {stage:10s} {wall:5.2f} s wall; onnxruntime: {parts or '-'}")
        return rc
    import cProfile

    from onnxprune import cli

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, args, cwd = case_args(opts.row, work)
        report = work / "report.json"
        argv_ = [str(model), str(work / "out.onnx"), *[a for a in args if a != "-q"], "-q", "--report", str(report)]
        os.chdir(cwd)  # the cnn row's paths are relative to the repository
        prof = cProfile.Profile()
        start = time.perf_counter()
        prof.enable()
        rc = cli.main(argv_)
        prof.disable()
        wall = time.perf_counter() - start
        seconds = json.loads(report.read_text())["seconds"] if rc == 0 else {}
    if opts.stats:
        prof.dump_stats(str(opts.stats))
    stats = pstats.Stats(prof)
    print(f"{opts.row}: exit {rc}, {wall:.1f} s wall under cProfile")
    print("stages: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    for label, s in part_seconds(stats).items():
        print(f"  {label:34s} {s:6.1f} s")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
