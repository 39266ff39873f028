#!/usr/bin/env python3
"""The real Silero VAD (issue 15, item 3): control flow, pruned with its data.

Exact command (from the repo root; a few minutes on 2 loaded CPU cores)::

    .venv/bin/python benchmarks/silero_vad.py [--ratios 0.1 0.2 0.3] [--cache DIR]

It downloads the ``silero-vad`` wheel (pip download, into ``benchmarks/.cache/silero``,
gitignored) and uses two of its models:

- ``silero_vad.onnx``: every Conv inside the branches of ``If 'If_0'`` (the sample rate):
  ``prune`` must refuse it in one line (exit 2);
- ``silero_vad_16k_op15.onnx``: the same network at 16 kHz, encoder in the main graph, the
  LSTM decoder inside ``If`` nodes: pruned outside them with calibration data.

Calibration and held-out data are synthetic audio (no speech corpus installs offline):
utterances of source-filter vowels (glottal pulses with a spectral tilt, three formants, an
f0 contour, 3-6 Hz syllables), noise bursts and near-silence, streamed through the original
as Silero's wrapper feeds it (64 samples of context + 512 new, the state carried); each
sample is (that input, the state the original had before it, sr=16000).  The held-out check
compares the speech probability per frame (with the original's states) and streamed (each
model carrying its own state), and the p > 0.5 decisions.  A markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
VOWELS = [(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (570, 840, 2410),
          (660, 1720, 2410), (390, 1990, 2550)]
SR = 16000


def fetch(cache: Path) -> Path:
    """The wheel's data folder, downloaded once."""
    data = cache / "silero_vad" / "data"
    if not (data / "silero_vad_16k_op15.onnx").exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "silero-vad", "--no-deps", "-q", "-d", str(cache)], check=True)
        with zipfile.ZipFile(next(cache.glob("silero_vad-*.whl"))) as z:
            for name in ("silero_vad.onnx", "silero_vad_16k_op15.onnx"):
                z.extract(f"silero_vad/data/{name}", cache)
    return data


def utterance(rng: np.random.Generator, n: int) -> np.ndarray:
    from scipy.signal import lfilter

    t = np.arange(n) / SR
    f0 = rng.uniform(90, 220) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.3, 1.2) * t))
    saw = np.cumsum(f0 / SR) % 1.0
    src = lfilter([1], [1, -1.9, 0.9025], np.where(np.diff(saw, prepend=0) < -0.5, -1.0, 0.0))
    seg, y = int(rng.uniform(0.15, 0.3) * SR), np.zeros(n)
    for s in range(0, n, seg):  # a vowel per syllable
        piece = src[s:s + seg]
        for f, b in zip(VOWELS[rng.integers(len(VOWELS))], (60, 90, 120)):
            r, th = np.exp(-np.pi * b / SR), 2 * np.pi * f * rng.uniform(0.9, 1.1) / SR
            piece = lfilter([1 - r], [1, -2 * r * np.cos(th), r * r], piece)
        y[s:s + seg] = piece / (np.abs(piece).max() + 1e-9)
    return rng.uniform(0.05, 0.8) * y * (0.5 - 0.5 * np.cos(2 * np.pi * rng.uniform(3, 6) * t))


def audio(seed: int, seconds: float) -> np.ndarray:
    rng, parts, total = np.random.default_rng(seed), [], int(seconds * SR)
    while sum(map(len, parts)) < total:
        kind, n = rng.choice(["speech", "noise", "silence"], p=[0.5, 0.25, 0.25]), int(rng.uniform(0.5, 2.0) * SR)
        parts.append(utterance(rng, n) if kind == "speech" else
                     rng.uniform(0.01, 0.2) * rng.standard_normal(n) if kind == "noise" else 1e-4 * rng.standard_normal(n))
    x = np.concatenate(parts)[:total] + 0.001 * rng.standard_normal(total)
    return np.concatenate([np.zeros(64), x]).astype(np.float32)


def stream(model: Path, x: np.ndarray):
    """(samples, probabilities) of ``model`` run over ``x`` as the wrapper does."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    state, samples, probs = np.zeros((2, 1, 128), np.float32), [], []
    for i in range((len(x) - 64) // 512):
        s = {"input": x[None, i * 512:(i + 1) * 512 + 64], "state": state, "sr": np.array(SR, np.int64)}
        p, state = sess.run(None, s)
        samples.append(s)
        probs.append(float(p.ravel()[0]))
    return samples, np.array(probs)


def write(folder: Path, samples: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(samples):
        np.savez(folder / f"f{i:05d}.npz", **s)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache" / "silero")
    ap.add_argument("--work", type=Path, default=None, help="folder for data and outputs (default: a temp folder)")
    args = ap.parse_args()
    import json
    import tempfile

    import onnxruntime as ort

    data = fetch(args.cache)
    work = args.work or Path(tempfile.mkdtemp(prefix="silero-"))
    work.mkdir(parents=True, exist_ok=True)
    refused = subprocess.run([sys.executable, "-m", "onnxprune", str(data / "silero_vad.onnx"), str(work / "x.onnx")],
                             capture_output=True, text=True)
    print(f"silero_vad.onnx: exit {refused.returncode}: {refused.stderr.strip()}\n")
    src = data / "silero_vad_16k_op15.onnx"
    calib = [s for seed in (2, 3, 4, 0) for s in stream(src, audio(seed, 8 if seed else 16))[0]]
    held, p0 = stream(src, audio(1, 8))
    write(work / "calib", calib)
    print(f"calibration {len(calib)} frames; held-out {len(held)} frames, {np.mean(p0 > 0.5):.0%} speech (p > 0.5)\n")
    print("| ratio | groups (prunable / blocked) | kept per group | params | MACs/frame | fidelity rel. L2 (calib held-out) "
          "| p max/mean abs diff, frame | streamed | decisions agree (streamed) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for ratio in args.ratios:
        out, rep = work / f"pruned_{ratio}.onnx", work / f"report_{ratio}.json"
        subprocess.run([sys.executable, "-m", "onnxprune", str(src), str(out), "--calib", str(work / "calib"),
                        "--ratio", str(ratio), "--report", str(rep), "-q"], check=True)
        r = json.loads(rep.read_text())
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        p1 = np.array([float(sess.run(None, s)[0].ravel()[0]) for s in held])
        _, q1 = stream(out, np.concatenate([np.zeros(64, np.float32)] + [s["input"][0, 64:] for s in held]))
        gs = r["groups"]
        n_blocked = sum(bool(g["blocked"]) for g in gs)
        kept = ", ".join(f"{g['kept']}/{g['channels']}" for g in gs)
        print(f"| {ratio} | {len(gs) - n_blocked} / {n_blocked} | {kept} "
              f"| {r['params']['before']:,} → {r['params']['after']:,} | {r['macs']['before']:,} → {r['macs']['after']:,} "
              f"| {r['fidelity']['rel_l2']:.3f} | {np.abs(p1 - p0).max():.3f} / {np.abs(p1 - p0).mean():.4f} "
              f"| {np.abs(q1 - p0).max():.3f} / {np.abs(q1 - p0).mean():.4f} | {np.mean((q1 > 0.5) == (p0 > 0.5)):.3f} |")


if __name__ == "__main__":
    main()
