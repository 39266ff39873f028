#!/usr/bin/env python3
"""EfficientNet-Lite0 at 70 % of its MACs: three ways to spread the budget over the groups,
same criterion (wanda), same MACs, bias and lstsq compensation: a uniform per-group ratio,
the global (per-group standardised) threshold (``--target-macs --global``), and the
allocation by measured sensitivity (``--target-macs`` with data, ``onnxprune/allocate.py``).

    .venv/bin/python benchmarks/assets.py
    .venv/bin/python benchmarks/effnet_selection.py [--target 0.7] [--compensate bias lstsq]
        [--selections uniform,global,sensitivity] [--extra-calib N]

The uniform ratio is found by bisection on onnxprune's own MACs estimate, then both
selections run through ``onnxprune.prune`` on the 301 calibration photos and are scored by
top-1 agreement with the unpruned model on the 99 held-out photos (``assets.eval_split``: a fourth of each source's crops).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import onnxprune  # noqa: E402
from assets import EFFNET, build_extra_photos  # noqa: E402
from effnet import PRE, split_folders  # noqa: E402
from onnxprune.count import count_macs, estimate_after  # noqa: E402
from onnxprune.groups import analyze_groups  # noqa: E402
from onnxprune.load import load_model  # noqa: E402
from onnxprune.select import select  # noqa: E402


def uniform_ratio(target: float, round_to: int | None) -> float:
    """The per-group ratio whose removal keeps ``target`` of the MACs (onnxprune's estimate)."""
    model, _ = load_model(EFFNET)
    analysis = analyze_groups(model)
    base = count_macs(model)
    groups = [g for g in analysis.groups if g.prunable]
    order = {g.id: np.arange(len(g.classes), dtype=float) for g in groups}  # counts only
    lo, hi = 0.0, 0.99
    for _ in range(25):
        mid = (lo + hi) / 2
        removed = np.concatenate(list(select(groups, order, mid, round_to=round_to).values()))
        if estimate_after(analysis, removed)[1] / base <= target:
            hi = mid
        else:
            lo = mid
    return hi


def in_sample(pruned: Path, folder: Path):
    """Fidelity on photos the prune calibrated on: the gap to the held-out figure is what
    the statistics and refits learnt about these photos rather than about the model."""
    from onnxprune._ort import session
    from onnxprune.data import batches, input_specs, source_items
    from onnxprune.verify import measure_fidelity

    specs = input_specs(session(str(EFFNET), ["CPUExecutionProvider"]))
    return measure_fidelity(EFFNET, pruned, batches(source_items(str(folder), specs, PRE)(), specs, 32, None))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=0.7)
    ap.add_argument("--compensate", nargs="+", default=["bias", "lstsq"])
    ap.add_argument("--round-to", type=int, default=None, help="default: onnxprune's automatic rounding")
    ap.add_argument("--selections", default="uniform,global,sensitivity", help="a subset, comma separated")
    ap.add_argument("--extra-calib", type=int, default=0,
                    help="add this many more seeded crops of the same source photos to the 301 calibration photos")
    args = ap.parse_args(argv)
    wanted = set(args.selections.split(","))
    ratio = uniform_ratio(args.target, args.round_to) if "uniform" in wanted else None
    if ratio is not None:
        print(f"uniform ratio {ratio:.4f} for {args.target:g} of the MACs", flush=True)
    calib, held = split_folders(None, None)
    in_calib = calib
    if args.extra_calib:
        both = calib.parent / "photos_calib_plus"
        both.mkdir(exist_ok=True)
        for old in both.iterdir():
            old.unlink()
        for p in [*calib.iterdir(), *build_extra_photos(args.extra_calib).glob("extra_*.jpg")]:
            (both / p.name).symlink_to(p.resolve())
        calib = both
    print(f"{sum(1 for _ in calib.iterdir())} calibration photos, {sum(1 for _ in held.iterdir())} held out", flush=True)
    print("| selection | --compensate | MACs kept | top-1 agreement | rel. L2 (logits) | on the split's calibration photos: agreement / rel. L2 | latency speedup | prune s | of which select s |")
    print("|---|---|---|---|---|---|---|---|---|")
    out = ROOT / "benchmarks" / ".cache"
    for comp in args.compensate:
        for key, how, budget in (("uniform", "uniform --ratio", {"ratio": ratio}),
                                 ("global", "global threshold (--target-macs --global)", {"target_macs": args.target, "global_": True}),
                                 ("sensitivity", "measured sensitivity (--target-macs)", {"target_macs": args.target})):
            if key not in wanted:
                continue
            t = time.perf_counter()
            _, res = onnxprune.prune(EFFNET, out / "effnet_selection.onnx", method="wanda", calib=str(calib),
                                     preprocess=PRE, compensate=comp, eval_data=str(held), batch_size=32,
                                     round_to=args.round_to, **budget)
            seconds = time.perf_counter() - t
            seen = in_sample(out / "effnet_selection.onnx", in_calib)
            print(f"| {how} | {comp} | {res.macs_after / res.macs_before:.1%} | {res.fidelity['agreement']:.1%} | "
                  f"{res.fidelity['rel_l2']:.3f} | {seen.agreement:.1%} / {seen.rel_l2:.3f} | "
                  f"{res.latency['speedup']:.2f}× | {seconds:.0f} | "
                  f"{res.seconds['select']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
