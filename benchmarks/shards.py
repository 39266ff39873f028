#!/usr/bin/env python3
"""Calibration and refit on Ray workers (issue 18): one process against 1 and 2 local Ray
workers on EfficientNet-Lite0 with 1,024 calibration images, where each run's time and bytes
go, and what that predicts for 8 and 64 workers.

Run from the repository root on a quiet machine (assets first):

    .venv/bin/python benchmarks/assets.py
    .venv/bin/python benchmarks/shards.py [--images 1024] [--workers 1,2] [--json benchmarks/.cache/shards.json]

Every prune is the CLI in a subprocess (``cost.run_cli``: ``-q --report``), ``--target-macs
0.7``, wanda, lstsq, batch size 32, ``--resize 256 --crop 224`` and ImageNet ``--mean/--std``,
on the first ``--images`` of the 2,048 seeded crops of the photos' source photographs
(``cost.crops_2048``); ``--eval`` = the evaluation photos. A plain onnxruntime pass over the
same images (decoded beforehand, batches of 32) is timed before each prune.

Per run: wall time, the report's stage seconds, and with ``--ray`` the report's
``distributed`` section (``distributed.RayPool.summary``): per phase the wall time, the
driver's own serial work (the images' calibration data: the workers read their own batches
from the folder, the driver the first batch, the probe and held-out samples; merging and
solving the refit's sums), the workers' busy seconds (sum and max), the
seconds the driver waited, and the bytes each way. The written weights of the Ray runs are
compared with the one-process run (max relative difference over all initializers).

The scaling estimate (:func:`estimate`), from the one-worker run's measured parts: what stays
on the driver (the stages outside calibration, probes and refit; reading and dealing the
images; merging and the one solve per target) stays; the workers' busy seconds divide by W
(the probes' only up to their 4 batches of 8 samples; the calibration no faster than the
driver reads); the sums cross a 10 Gbit/s wire and the driver's memory (5 GB/s) once per
worker: ``W · (waves · S + statistics) · (1/B + 1/M)``, with S one worker's fold sums per wave.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import assets  # noqa: E402
import cost  # noqa: E402
from onnxprune import allocate  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / ".cache"
NET_BYTES_S = 1.25e9  # 10 Gbit/s between driver and workers, on paper
MEM_BYTES_S = 5e9  # the driver adding the workers' sums
PROBE_BATCHES = allocate.PROBE_SAMPLES // allocate.PROBE_CHUNK  # at most this many workers share the probes


def weights(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def max_rel_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return float("inf")
    return max((float(np.abs(a[k].astype(np.float64) - b[k]).max() / max(np.abs(b[k]).max(), 1e-30))
                for k in a if a[k].size), default=0.0)


def run(label: str, extra: list[str], calib: Path, held: Path, out: Path, feeds, opts) -> dict:
    plain = cost.plain_pass(assets.EFFNET, feeds)
    args = [str(assets.EFFNET), str(out), "--calib", str(calib), "--eval", str(held), *cost.PRE_FLAGS,
            "--target-macs", "0.7", "-q", *extra]
    # Ray's sockets live under TMPDIR (AF_UNIX paths: 107 bytes): a short one.
    os.environ["TMPDIR"] = "/tmp"
    r = cost.run_cli(cost.cli_prefix(ROOT), args, ROOT, opts.timeout)
    print(f"  {label}: {r.wall:.1f} s (plain pass {plain:.2f} s), rc {r.rc}, peak RSS {r.rss_mib:.0f} MiB"
          + (f" ({r.error})" if r.error else ""), flush=True)
    return {"label": label, "wall_s": r.wall, "plain_s": plain, "rc": r.rc, "rss_mib": r.rss_mib,
            "seconds": r.report.get("seconds", {}), "distributed": r.report.get("distributed"),
            "fidelity": r.report.get("fidelity"), "error": r.error, "load": r.load}


def estimate(one: dict, workers: int) -> dict:
    """Predicted wall seconds at ``workers`` workers from the one-worker run's measurements:
    the driver's parts stay (the stages outside calibration, probes and refit: load, rewrite,
    verification; reading and dealing the images; merging and solving), the workers' busy
    seconds divide (the probes' only up to their number of probe batches), the calibration
    cannot outrun the driver's reading (the two overlap), and the sums cross a 10 Gbit/s wire
    and the driver's memory once per worker."""
    d = one["distributed"]
    cal, ref, probes = d["calibrate"], d["refit"], d.get("probes", {"wall_s": 0.0, "worker_busy_sum_s": 0.0})
    read = cal["driver_read_s"] + cal["driver_put_s"]
    c, r, p, solve = cal["worker_busy_sum_s"], ref["worker_busy_sum_s"], probes["worker_busy_sum_s"], ref["driver_merge_solve_s"]
    other = one["wall_s"] - cal["wall_s"] - ref["wall_s"] - probes["wall_s"]
    cal_fixed = max(cal["wall_s"] - max(read, c), 0.0)  # worker start-up, the statistics' return
    ref_fixed = max(ref["wall_s"] - r - solve, 0.0)
    probe_fixed = max(probes["wall_s"] - p, 0.0)  # the driver's part of the probes (rung parameters, tails)
    waves = max(d["waves"], 1)
    per_wave = d["bytes_received"].get("sums", 0) / waves  # one worker's fold sums per wave
    stats = d["bytes_received"].get("statistics", 0)
    wire = workers * (waves * per_wave + stats) * (1 / NET_BYTES_S + 1 / MEM_BYTES_S)
    parts = {"driver stages (load, rewrite, verify)": other, "driver reading": read, "merge+solve": solve,
             "calibrate on workers": max(c / workers - read, 0.0),
             "probes on workers": p / min(workers, PROBE_BATCHES) + probe_fixed, "refit on workers": r / workers,
             "fixed (start-up, returns)": cal_fixed + ref_fixed, "transfer+merge of sums": wire}
    return {"workers": workers, "parts": parts, "total_s": sum(parts.values()),
            "bytes_per_wave_per_worker": per_wave, "statistics_bytes_per_worker": stats}


def table(runs: list[dict], base: dict) -> str:
    lines = ["| run | wall s | ratio to plain pass | calibrate | select | compensate | verify | max rel. weight diff vs one process |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        s = r["seconds"]
        lines.append(f"| {r['label']} | {r['wall_s']:.1f} | {r['wall_s'] / r['plain_s']:.0f}× | {s.get('calibrate', 0):.1f} | "
                     f"{s.get('select', 0):.1f} | {s.get('compensate', 0):.1f} | {s.get('verify', 0):.1f} | "
                     f"{r.get('weight_diff', 0):.1e} |")
    lines += ["", "| run | phase | wall s | driver serial s | put s | workers busy sum / max s | bytes to workers | bytes from workers |",
              "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        d = r["distributed"]
        if not d:
            continue
        cal, ref = d["calibrate"], d["refit"]
        sent, got = d["bytes_sent"], d["bytes_received"]
        lines.append(f"| {r['label']} | calibrate | {cal['wall_s']:.1f} | {cal['driver_read_s']:.1f} (read, decode) | "
                     f"{cal['driver_put_s']:.1f} | {cal['worker_busy_sum_s']:.1f} / {cal['worker_busy_max_s']:.1f} | "
                     f"{sent.get('take', 0) / 2**20:.0f} MiB samples, {sent.get('read', 0) / 2**10:.0f} KiB recipes + "
                     f"{sent.get('collect_start', 0) / 2**20:.0f} MiB graphs | "
                     f"{got.get('statistics', 0) / 2**20:.0f} MiB statistics |")
        lines.append(f"| {r['label']} | refit ({d['waves']} waves) | {ref['wall_s']:.1f} | {ref['driver_merge_solve_s']:.1f} (merge, solve) | – | "
                     f"{ref['worker_busy_sum_s']:.1f} / {ref['worker_busy_max_s']:.1f} | "
                     f"{(sent.get('refit_start', 0) + sent.get('apply', 0) + sent.get('sums', 0)) / 2**20:.0f} MiB graphs, weights | "
                     f"{got.get('sums', 0) / 2**20:.0f} MiB fold sums |")
    return "\n".join(lines)


def report(runs: list[dict]) -> None:
    print()
    print(table(runs, runs[0]))
    ones = [r for r in runs if r["distributed"] and r["distributed"]["workers"] == 1 and r["rc"] == 0]
    if ones:
        est = [estimate(ones[0], w) for w in (1, 2, 8, 64)]
        names = list(est[0]["parts"])
        print("\n| workers | " + " | ".join(names) + " | predicted wall s | speed-up over 1 worker |")
        print("|---" * (len(names) + 3) + "|")
        for e in est:
            print(f"| {e['workers']} | " + " | ".join(f"{e['parts'][n]:.1f}" for n in names)
                  + f" | {e['total_s']:.1f} | {est[0]['total_s'] / e['total_s']:.2f}× |")
        print(f"\nbytes per wave per worker (fold sums): {est[0]['bytes_per_wave_per_worker'] / 2**20:.1f} MiB; "
              f"statistics per worker: {est[0]['statistics_bytes_per_worker'] / 2**20:.1f} MiB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--workers", default="1,2", help="Ray worker counts to run beside one process")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--from-json", type=Path, default=None, help="print the tables of a saved run instead of running")
    opts = ap.parse_args(argv)
    if opts.from_json:
        saved = json.loads(opts.from_json.read_text())
        print(f"EfficientNet-Lite0, {saved['images']} calibration images; run of {saved['date']}")
        report(saved["runs"])
        return 0
    _, held_files = cost.photo_lists()
    files = cost.crops_2048()[: opts.images]
    work = CACHE / "shards-run"
    if work.exists():
        import shutil

        shutil.rmtree(work)
    calib = cost.link_photos(work / "calib", files)
    held = cost.link_photos(work / "eval", held_files)
    feeds = cost.to_batches(cost.images(files))
    print(f"EfficientNet-Lite0, {len(files)} calibration images, {len(held_files)} eval photos; {time.strftime('%c')}", flush=True)
    runs = [run("one process", [], calib, held, work / "one.onnx", feeds, opts)]
    reference = weights(work / "one.onnx") if runs[0]["rc"] == 0 else None
    for w in (int(x) for x in opts.workers.split(",")):
        out = work / f"ray{w}.onnx"
        r = run(f"--ray, {w} worker{'s' if w > 1 else ''}", ["--ray", "--workers", str(w)], calib, held, out, feeds, opts)
        if r["rc"] == 0 and reference is not None:
            r["weight_diff"] = max_rel_diff(weights(out), reference)
        runs.append(r)
    report(runs)
    if opts.json:
        opts.json.write_text(json.dumps({"date": time.strftime("%c"), "images": len(files), "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
