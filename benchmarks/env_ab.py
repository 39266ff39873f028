#!/usr/bin/env python3
"""One ``cost.py`` row's prune under several environments, taking turns: what an environment
variable (a BLAS or onnxruntime setting) does to a prune's wall time and stage times.

Exact command (repo root; each ENV is ``NAME=VALUE[,NAME=VALUE...]``, ``""`` for the
environment as it is)::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/env_ab.py [--row effnet|minilm|cnn] [--repeat 2] ENV [ENV ...]

Each prune is ``python -m onnxprune`` (the console script's path: its environment settings
apply unless the ENV sets the variable itself) on the row's model and data as ``cost.py``
builds them, with ``--report``; the printout is per prune the wall time and the report's
seconds per stage, then each ENV's wall times sorted.
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

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import profile_prune  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--row", default="effnet", choices=("effnet", "minilm", "cnn"))
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("envs", nargs="+", help="NAME=VALUE[,NAME=VALUE...] per variant; '' for none")
    opts = ap.parse_args(argv)
    variants = [dict(kv.split("=", 1) for kv in v.split(",") if kv) for v in opts.envs]
    walls: list[list[float]] = [[] for _ in variants]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, args, cwd = profile_prune.case_args(opts.row, work)
        for _ in range(opts.repeat):
            for i, env in enumerate(variants):
                report = work / "report.json"
                start = time.perf_counter()
                proc = subprocess.run([sys.executable, "-m", "onnxprune", str(model), str(work / "out.onnx"), *args,
                                       "--report", str(report)], cwd=cwd, env=dict(os.environ, **env),
                                      capture_output=True, text=True)
                wall = time.perf_counter() - start
                walls[i].append(wall)
                stages = json.loads(report.read_text())["seconds"] if proc.returncode == 0 else proc.stderr[-300:]
                shown = {k: round(v, 1) for k, v in stages.items()} if isinstance(stages, dict) else stages
                print(f"{env or '(as is)'}: {wall:.1f} s, rc {proc.returncode}, {shown}", flush=True)
    for env, w in zip(variants, walls):
        print(f"{env or '(as is)'}: {', '.join(f'{x:.1f}' for x in sorted(w))} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
