#!/usr/bin/env python3
"""EfficientNet-Lite0 at 70 % of its MACs: three ways to spread the budget over the groups,
same criterion (wanda), same MACs, bias and lstsq compensation: a uniform per-group ratio,
the global (per-group standardised) threshold (``--target-macs --global``), and the
allocation by measured sensitivity (``--target-macs`` with data, ``onnxprune/allocate.py``).

    .venv/bin/python benchmarks/assets.py
    .venv/bin/python benchmarks/effnet_selection.py [--target 0.7] [--compensate bias lstsq]
        [--selections uniform,global,sensitivity] [--extra-calib N] [--more-sources N [--calib-more]]

The uniform ratio is found by bisection on onnxprune's own MACs estimate, then both
selections run through ``onnxprune.prune`` on the 301 calibration photos and are scored by
top-1 agreement with the unpruned model on the 99 held-out photos (``assets.eval_split``: a fourth of each source's crops).
``--more-sources N`` also scores the pruned model on the held-out fourth of N crops of 14
other, object-centric photographs (``assets.MORE_SOURCES``, read from pinned wheels), and
``--calib-more`` adds their other three fourths to the calibration photos: distinct images,
not more crops of the same 22.
"""

from __future__ import annotations

import argparse
import tempfile
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import onnxprune  # noqa: E402
from assets import EFFNET, build_extra_photos, build_more_photos  # noqa: E402
from effnet import CACHE, PRE, link_folder, split_folders  # noqa: E402
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
    ap.add_argument("--more-sources", type=int, default=0,
                    help="build this many crops of the 14 other photographs (assets.MORE_SOURCES) and score "
                         "the pruned model on their evaluation fourth too")
    ap.add_argument("--calib-more", action="store_true",
                    help="with --more-sources: their calibration fourths join the calibration photos")
    args = ap.parse_args(argv)
    wanted = set(args.selections.split(","))
    ratio = uniform_ratio(args.target, args.round_to) if "uniform" in wanted else None
    if ratio is not None:
        print(f"uniform ratio {ratio:.4f} for {args.target:g} of the MACs", flush=True)
    with tempfile.TemporaryDirectory(prefix="effnet-selection-", dir=CACHE) as work:
        run(args, ratio, wanted, Path(work))
    return 0


def run(args: argparse.Namespace, ratio: float | None, wanted: set[str], work: Path) -> None:
    """The runs, with the photo folders (symlinks) and the pruned model in ``work``."""
    calib, held = split_folders(None, None, work)
    in_calib = calib
    if args.extra_calib:
        extra = build_extra_photos(args.extra_calib).glob("extra_*.jpg")
        calib = link_folder(work / "photos_calib_plus", [*calib.iterdir(), *extra])
    more_held = None
    if args.more_sources:
        folder = build_more_photos(args.more_sources)
        rows = [line.split("\t") for line in (folder / ".sources.tsv").read_text().splitlines() if line]
        more_held = link_folder(work / "photos_more_eval", [folder / r[0] for r in rows if r[2] == "eval"])
        if args.calib_more:
            calib = link_folder(work / "photos_calib_more",
                                [*calib.iterdir(), *(folder / r[0] for r in rows if r[2] != "eval")])
    print(f"{sum(1 for _ in calib.iterdir())} calibration photos, {sum(1 for _ in held.iterdir())} held out", flush=True)
    more_col = f" held-out crops of the other photographs ({sum(1 for _ in more_held.iterdir())}): agreement / rel. L2 |" if more_held else ""
    print("| selection | --compensate | MACs kept | top-1 agreement | rel. L2 (logits) | on the split's calibration photos: agreement / rel. L2 |"
          f"{more_col} latency speedup | prune s | of which select s |")
    print("|---|---|---|---|---|---|" + ("---|" if more_held else "") + "---|---|---|")
    out = work / "effnet_selection.onnx"
    for comp in args.compensate:
        for key, how, budget in (("uniform", "uniform --ratio", {"ratio": ratio}),
                                 ("global", "global threshold (--target-macs --global)", {"target_macs": args.target, "global_": True}),
                                 ("sensitivity", "measured sensitivity (--target-macs)", {"target_macs": args.target})):
            if key not in wanted:
                continue
            t = time.perf_counter()
            _, res = onnxprune.prune(EFFNET, out, method="wanda", calib=str(calib),
                                     preprocess=PRE, compensate=comp, eval_data=str(held), batch_size=32,
                                     round_to=args.round_to, **budget)
            seconds = time.perf_counter() - t
            seen = in_sample(out, in_calib)
            more = ""
            if more_held:
                m = in_sample(out, more_held)
                more = f" {m.agreement:.1%} / {m.rel_l2:.3f} |"
            print(f"| {how} | {comp} | {res.macs_after / res.macs_before:.1%} | {res.fidelity['agreement']:.1%} | "
                  f"{res.fidelity['rel_l2']:.3f} | {seen.agreement:.1%} / {seen.rel_l2:.3f} |{more} "
                  f"{res.latency['speedup']:.2f}× | {seconds:.0f} | "
                  f"{res.seconds['select']:.0f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
