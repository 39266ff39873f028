"""Calibration data: folders of .npy/.npz or images, onnxruntime CalibrationDataReaders,
or any iterable of ``{input_name: array}``; checked against the model and re-batched.

Everything is streamed: a source yields one file (one sample or a batch) at a time, and
:func:`batches` re-cuts the stream into batches of the requested size, so memory does
not grow with the number of samples.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
# Bounds on what one calibration file may unpack to, checked before it is read: a 2 MB
# .npz can hold a 2 GB member, a small PNG a gigapixel image.
MAX_ARRAY_BYTES = 1 << 30
MAX_IMAGE_PIXELS = 64 * 2**20
Sample = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    """What the model expects of one input: name, numpy dtype and dims (None = free)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | None, ...]
    batch_axis: int = 0  # 1 for a recurrent state [layers, batch, hidden] (see batch_axes)


@dataclass
class Preprocess:
    """How images become tensors: resize the shorter side, centre-crop, scale, normalise."""

    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    scale: float = 1.0 / 255.0
    layout: str = "NCHW"
    channels: str | None = None  # GRAY (alias L), RGB or BGR; None: GRAY for a 1-channel input, else RGB


def input_specs(session) -> list[InputSpec]:
    """The model's inputs as onnxruntime reports them."""
    from .verify import _DTYPES

    specs = []
    for inp in session.get_inputs():
        dtype = _DTYPES.get(inp.type)
        if dtype is None:
            raise InputError(f"input '{inp.name}' has type {inp.type}, which onnxprune cannot feed")
        dims = tuple(d if isinstance(d, int) and d > 0 else None for d in inp.shape)
        specs.append(InputSpec(inp.name, np.dtype(dtype), dims))
    axes = batch_axes([list(inp.shape) for inp in session.get_inputs()])
    return [InputSpec(s.name, s.dtype, s.dims, a) for s, a in zip(specs, axes)]


def batch_axes(shapes: list[list]) -> list[int]:
    """The batch axis of every input, 0 unless the model has a dynamic batch (a symbolic
    leading dim on some input) and this input's leading dim is fixed: then the axis of the
    same named dim, or its only symbolic dim (Silero VAD's state ``[2, batch, 128]``)."""
    def symbolic(d) -> bool:
        return not (isinstance(d, int) and d > 0)

    leads = {str(sh[0]) for sh in shapes if sh and symbolic(sh[0])}
    out = []
    for sh in shapes:
        if not leads or not sh or symbolic(sh[0]):
            out.append(0)
            continue
        named = [i for i, d in enumerate(sh) if isinstance(d, str) and d and d in leads]
        free = [i for i, d in enumerate(sh) if symbolic(d)]
        out.append(named[0] if named else free[0] if len(free) == 1 else 0)
    return out


# ----------------------------------------------------------------------------- sources


def data_files(folder: Path, specs: list[InputSpec]) -> list[Path]:
    """The folder's data files in reading order (sorted by name): arrays or images, not both."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    arrays = [p for p in files if p.suffix in (".npy", ".npz")]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not arrays and not images:
        raise InputError(f"calibration folder {folder} holds no .npy, .npz or image files")
    if arrays and images:
        raise InputError(f"calibration folder {folder} mixes arrays and images; use one kind")
    if images and len(specs) != 1:
        raise InputError(f"images can only feed a single-input model; this one has {len(specs)} inputs")
    return images or arrays


def file_item(path: Path, specs: list[InputSpec], pre: Preprocess | None) -> tuple[str, Sample]:
    """(where, sample-or-batch) read from one data file, not yet checked."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return str(path), {specs[0].name: load_image(path, specs[0], pre or Preprocess())}
    try:
        if path.suffix == ".npy":
            if len(specs) != 1:
                raise InputError(
                    f"{path.name}: a .npy file can only feed a single-input model; use .npz with keys "
                    + ", ".join(s.name for s in specs)
                )
            return str(path), {specs[0].name: np.load(path, allow_pickle=False)}
        check_npz_size(path)
        with np.load(path, allow_pickle=False) as z:
            return str(path), {k: z[k] for k in z.files}
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: cannot be read as a numpy array ({' '.join(str(exc).split())[:200]})") from exc


def _folder_items(folder: Path, specs: list[InputSpec], pre: Preprocess | None,
                  workers: int = 1) -> Iterator[tuple[str, Sample]]:
    """The folder's files read in order; with ``workers`` > 1, that many read at once (in
    threads: Pillow and numpy leave the interpreter while they decode and scale), at most
    twice as many files ahead of the caller."""
    paths = data_files(folder, specs)
    if workers <= 1:
        for path in paths:
            yield file_item(path, specs, pre)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    # Leaving early (an error, a signal) waits for the few reads under way.
    with ThreadPoolExecutor(workers, thread_name_prefix="onnxprune-decode") as pool:
        todo, ahead = iter(paths), deque()
        for path in todo:
            ahead.append(pool.submit(file_item, path, specs, pre))
            if len(ahead) == 2 * workers:
                break
        while ahead:
            item = ahead.popleft().result()
            path = next(todo, None)
            if path is not None:
                ahead.append(pool.submit(file_item, path, specs, pre))
            yield item
            item = None


def check_npz_size(path: Path, bound: int | None = None) -> None:
    """Refuse an .npz whose members unpack to more than ``bound`` bytes in all, read from the
    zip directory and each member's .npy header before any array is decompressed."""
    bound = MAX_ARRAY_BYTES if bound is None else bound
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        return  # not a zip: np.load says so, in one line
    total = 0
    with zf:
        for info in zf.infolist():
            declared = info.file_size
            if info.filename.endswith(".npy") and info.file_size <= bound:
                declared = max(declared, _declared_bytes(zf, info))
            total += declared
            if total > bound:
                raise InputError(
                    f"{path}: unpacks to more than {bound >> 20} MiB (member '{info.filename}': {declared:,} bytes); "
                    "split the calibration data into smaller files"
                )


def _declared_bytes(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> int:
    """The array size an .npy member's header announces (numpy allocates that much first)."""
    header = npz_member_header(zf, info)
    return 0 if header is None else int(np.prod(header[0], dtype=object)) * header[1].itemsize


def npz_member_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo | str) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) from an .npy member's header, without reading its data; None if unreadable."""
    try:
        with zf.open(info) as f:
            fmt = np.lib.format
            version = fmt.read_magic(f)
            reader = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
            if reader is None:
                return None
            shape, _, dtype = reader(f)
    except Exception:  # a bad header: np.load reports it
        return None
    return tuple(shape), dtype


def load_image(path: Path, spec: InputSpec, pre: Preprocess) -> np.ndarray:
    """One image as a sample of ``spec`` (no batch axis)."""
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - pillow is a dependency
        raise InputError("reading images needs Pillow: pip install pillow") from exc
    gray = _gray(spec, pre)
    img = _open_image(path, Image, "L" if gray else "RGB")  # L, RGB, or F (16-bit gray on 0..255)
    if pre.resize:
        w, h = img.size
        s = pre.resize / min(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
    if pre.crop:
        w, h = img.size
        left, top = (w - pre.crop) // 2, (h - pre.crop) // 2
        img = img.crop((left, top, left + pre.crop, top + pre.crop))
    arr = np.asarray(img)
    if arr.ndim == 2:  # one channel: the model's, or a 16-bit gray image read for a colour model
        arr = arr[..., None] if gray else np.repeat(arr[..., None], 3, axis=2)
    mean, std = np.asarray(pre.mean, np.float32), np.asarray(pre.std, np.float32)
    if gray:
        if np.ptp(mean) or np.ptp(std):
            raise InputError(f"{path}: a 1-channel model reads images as grayscale: give one --mean and one --std value")
        mean, std = mean[:1], std[:1]
    elif _channels(pre) == "BGR":
        arr = arr[..., ::-1]
    # Normalised plane by plane, in place, in float32: the same operations on every value
    # as (x·scale − mean) / std over the pixel array, without numpy's loop over 3 channels
    # per pixel (most of an image's reading after its decoding).
    planes = np.array(np.moveaxis(arr, 2, 0), dtype=np.float32, order="C")  # a copy: normalised in place
    for plane, m, s in zip(planes, mean, std):
        plane *= pre.scale
        plane -= m
        plane /= s
    if pre.layout.upper() != "NCHW":
        planes = np.ascontiguousarray(np.moveaxis(planes, 0, 2))
    return planes.astype(spec.dtype, copy=False)


def _channels(pre: Preprocess) -> str | None:
    """``--channels`` by its canonical name (``L`` is ``GRAY``), None when not given."""
    ch = pre.channels.upper() if pre.channels else None
    return "GRAY" if ch == "L" else ch


def _gray(spec: InputSpec, pre: Preprocess) -> bool:
    """Whether images are read as one grayscale channel: ``--channels GRAY``, or by default
    a model input whose channel dim (by ``--layout``) is 1, as MNIST models have.  A channel
    count the model fixes otherwise is refused in one line."""
    ch = _channels(pre)
    takes = None
    if len(spec.dims) == 4:
        takes = spec.dims[1] if pre.layout.upper() == "NCHW" else spec.dims[3]
    if ch is None:
        return takes == 1
    if ch == "GRAY":
        if takes not in (None, 1):
            raise InputError(f"--channels GRAY reads images as 1 channel, but input '{spec.name}' takes {takes} "
                             f"({pre.layout}): use --channels RGB or BGR")
        return True
    if takes == 1:
        raise InputError(f"--channels {ch} reads images as 3 channels, but input '{spec.name}' takes 1 ({pre.layout}): "
                         "use --channels GRAY (the default for it)")
    return False


# Pillow modes of 16-bit (and 32-bit integer) grayscale, which PNG holds: read on the 8-bit
# scale (value / 257) instead of Pillow's conversion, which clips everything above 255.
_WIDE_GRAY = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _convert(img, mode: str):
    """``img`` as ``mode`` (L or RGB).  Alpha (RGBA, LA, PA, a palette's transparent entry)
    is dropped, keeping the stored colours, as ``convert('RGB')`` in torchvision's image
    folder loader does, so calibration sees what training pipelines feed; a palette with
    transparency goes through RGBA (Pillow warns otherwise).  16-bit grayscale becomes
    float (mode F) on the 8-bit scale, replicated to 3 channels later for a colour model."""
    if img.mode in _WIDE_GRAY:
        from PIL import Image

        return Image.fromarray(np.asarray(img.convert("F"), dtype=np.float32) / np.float32(257.0), mode="F")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert(mode)


def _open_image(path: Path, Image, mode: str = "RGB"):
    """``path`` as an image of ``mode`` (RGB, or L for grayscale; see :func:`_convert`), refused in one line above MAX_IMAGE_PIXELS (checked on the
    header, before decoding) and with Pillow's decompression-bomb warning as that error."""
    too_big = f"{path}: image too large (more than {MAX_IMAGE_PIXELS // 2**20} megapixels)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            if img.size[0] * img.size[1] > MAX_IMAGE_PIXELS:
                raise InputError(f"{too_big}: {img.size[0]}x{img.size[1]}")
            return _convert(img, mode)
    except InputError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise InputError(too_big) from exc
    except Exception as exc:
        raise InputError(f"{path}: not a readable image ({' '.join(str(exc).split())[:200]})") from exc


def _reader_items(reader: Any) -> Iterator[tuple[str, Sample]]:
    k = 0
    while True:
        item = reader.get_next()
        if item is None:
            return
        yield f"get_next() #{k}", item
        k += 1


def source_items(
    source: Any, specs: list[InputSpec], pre: Preprocess | None = None, workers: int = 1
) -> Callable[[], Iterator[tuple[str, Sample]]]:
    """A function returning a fresh iterator of (where, sample-or-batch) for ``source``.

    Folders and ``ray.data.Dataset`` s (of input dicts) can be read again; a reader or a
    one-shot iterable is read once (a reader with ``rewind()`` is rewound instead).
    ``workers``: files of a folder read at once (see :func:`_folder_items`).
    """
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not folder.exists():
            raise InputError(f"calibration data not found: {folder}")
        if folder.is_file():
            raise InputError(f"calibration data must be a folder, got the file {folder}")
        return lambda: _folder_items(folder, specs, pre, workers)
    if hasattr(source, "get_next"):
        state = {"used": False}

        def again() -> Iterator[tuple[str, Sample]]:
            # A reader may have been read by an earlier round (--steps): rewind when it can.
            if hasattr(source, "rewind"):
                source.rewind()
            elif state["used"]:
                raise InputError("the CalibrationDataReader was already consumed and has no rewind()")
            state["used"] = True
            return _reader_items(source)

        return again
    if type(source).__module__.startswith("ray.data") and hasattr(source, "iter_batches"):
        # A ray.data.Dataset of input dicts: read again on every call, a batch at a time.
        return lambda: ((f"dataset batch #{i}", b) for i, b in enumerate(source.iter_batches(batch_format="numpy")))
    if isinstance(source, Iterable):
        items = source if isinstance(source, (list, tuple)) else None
        if items is not None:
            return lambda: ((f"item #{i}", s) for i, s in enumerate(items))
        state_it = {"it": iter(source), "used": False}

        def once() -> Iterator[tuple[str, Sample]]:
            if state_it["used"]:
                raise InputError("the calibration iterable can only be read once; pass a list or a folder")
            state_it["used"] = True
            return ((f"item #{i}", s) for i, s in enumerate(state_it["it"]))

        return once
    raise InputError(f"unsupported calibration source: {type(source).__name__}")


# ----------------------------------------------------------------------------- checks


def check_sample(where: str, sample: Any, specs: list[InputSpec]) -> Sample:
    """Return ``sample`` as a batch (leading axis added for single samples) after checking
    names, ranks, dtypes, fixed dims and finiteness; raise InputError naming what is wrong."""
    if not isinstance(sample, dict):
        raise InputError(f"{where}: expected a dict of input name -> array, found {type(sample).__name__}")
    names = [s.name for s in specs]
    if sorted(sample) != sorted(names):
        missing = sorted(set(names) - set(sample))
        extra = sorted(set(sample) - set(names))
        raise InputError(
            f"{where}: expected inputs {names}, found {sorted(sample)}"
            + (f" (missing {missing})" if missing else "")
            + (f" (unexpected {extra})" if extra else "")
        )
    out: Sample = {}
    batch = None
    for spec in specs:
        arr = np.asarray(sample[spec.name])
        rank = len(spec.dims)
        if rank == 0:  # a scalar input (a sample rate): one value the whole batch shares
            if arr.ndim != 0:
                raise InputError(f"{where}: input '{spec.name}' is a scalar (rank 0), found shape {list(arr.shape)}")
            if arr.dtype != spec.dtype:
                raise InputError(f"{where}: input '{spec.name}' expected dtype {spec.dtype}, found {arr.dtype}")
            if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
                raise InputError(f"{where}: input '{spec.name}' contains NaN or Inf")
            out[spec.name] = arr
            continue
        ax = spec.batch_axis
        if arr.ndim == rank - 1:
            arr = np.expand_dims(arr, ax)
        elif arr.ndim != rank:
            raise InputError(
                f"{where}: input '{spec.name}' expected rank {rank} (or {rank - 1} for one sample), "
                f"found shape {list(arr.shape)}"
            )
        if arr.dtype != spec.dtype:
            raise InputError(f"{where}: input '{spec.name}' expected dtype {spec.dtype}, found {arr.dtype}")
        for axis, (want, got) in enumerate(zip(spec.dims, arr.shape)):
            if axis != ax and want is not None and want != got:
                raise InputError(
                    f"{where}: input '{spec.name}' expected shape {_fmt(spec.dims)}, found {list(arr.shape)}"
                )
        if arr.shape[ax] == 0:
            raise InputError(f"{where}: input '{spec.name}' holds no samples")
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise InputError(f"{where}: input '{spec.name}' contains NaN or Inf")
        if batch is not None and arr.shape[ax] != batch:
            raise InputError(f"{where}: inputs disagree on the number of samples"
                             + (f" (input '{spec.name}' has them on axis {ax})" if ax else ""))
        batch = arr.shape[ax]
        out[spec.name] = arr
    axes = {s.name: s.batch_axis for s in specs if s.batch_axis}
    return Batch(out, axes) if axes else out


class Batch(dict):
    """A sample dict whose inputs named in ``axes`` carry their samples on another axis than
    0; take_samples, samples_in and batching keep it.  Plain dicts mean axis 0 everywhere."""

    def __init__(self, items: dict, axes: dict[str, int]) -> None:
        super().__init__(items)
        self.axes = axes


def _axis(batch: Sample, name: str) -> int:
    return getattr(batch, "axes", {}).get(name, 0)


def _with_axes(like: Sample, items: dict) -> Sample:
    axes = getattr(like, "axes", None)
    return Batch(items, axes) if axes else items


def pins_more(array: np.ndarray) -> bool:
    """Whether ``array`` keeps more memory alive than its own bytes: a view of a larger
    array, or of memory numpy does not own (an onnxruntime output)."""
    base = array.base
    if base is None:
        return False
    return not isinstance(base, np.ndarray) or base.base is not None or base.nbytes > array.nbytes


def samples_in(batch: Sample) -> int:
    """Samples in ``batch``: the leading dim of its first input that has one (a scalar input
    is shared by the whole batch; a batch of scalars only is one sample).  A batch still
    to be read (``shared_data.LazyBatch``) says itself."""
    if not isinstance(batch, dict):
        return batch.samples()
    for k, v in batch.items():
        if np.ndim(v):
            return int(np.shape(v)[_axis(batch, k)])
    return 1


def take_samples(batch: Sample, index: Any) -> Sample:
    """The samples ``index`` (a slice, a mask or positions) of every batched input; scalar
    inputs as they are.  A batch still to be read takes its own."""
    if not isinstance(batch, dict):
        return batch.take(index)
    return _with_axes(batch, {k: v[(slice(None),) * _axis(batch, k) + (index,)] if np.ndim(v) else v
                              for k, v in batch.items()})


def _join(buffer: list[Sample]) -> Sample:
    """One batch from several: batched inputs concatenated, a scalar input's one value kept
    (samples that disagree on it cannot share a run)."""
    out: Sample = {}
    for k, first in buffer[0].items():
        if np.ndim(first):
            out[k] = np.concatenate([b[k] for b in buffer], axis=_axis(buffer[0], k))
            continue
        other = next((b[k] for b in buffer if not np.array_equal(b[k], first)), None)
        if other is not None:
            raise InputError(
                f"scalar input '{k}' changes value between calibration samples ({first.item()!r}, then {other.item()!r}): "
                "the samples of one batch share it; give one value, or --batch-size 1"
            )
        out[k] = first
    return _with_axes(buffer[0], out)


def _fmt(dims: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


# ----------------------------------------------------------------------------- batches


def batches(
    items: Iterator[tuple[str, Sample]],
    specs: list[InputSpec],
    batch_size: int,
    max_samples: int | None = None,
) -> Iterator[Sample]:
    """Checked, re-cut batches of exactly ``batch_size`` samples (the last may be smaller)."""
    buffer: list[Sample] = []
    held = 0
    seen = 0
    for where, raw in items:
        sample = check_sample(where, raw, specs)
        n = samples_in(sample)
        if max_samples is not None and seen + n > max_samples:
            sample = take_samples(sample, slice(None, max_samples - seen))
            n = max_samples - seen
        if n <= 0:
            break
        seen += n
        buffer.append(sample)
        held += n
        while held >= batch_size:
            joined = _join(buffer)
            yield take_samples(joined, slice(None, batch_size))
            rest = take_samples(joined, slice(batch_size, None))
            held -= batch_size
            buffer = [rest] if held else []
        if max_samples is not None and seen >= max_samples:
            break
    if held:
        yield _join(buffer)
    if seen == 0:
        raise InputError("the calibration data holds no samples")
