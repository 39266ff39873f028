"""Calibration batches from a folder every Ray worker can read (``--ray`` with ``--calib
FOLDER``): the driver reads only the files' headers and deals *recipes* (which samples of
which files make each batch); each worker reads its own batches from the folder.

A :class:`FolderIndex` numbers the folder's samples in the order :func:`data.batches`
reads them (file by file, sorted by name).  A :class:`LazyBatch` is a batch named by the
positions of its samples; :func:`data.samples_in` and :func:`data.take_samples` accept
it, so the held-out split and the batch numbering run on recipes exactly as they run on
arrays, and :func:`read` turns one into the arrays the driver would have built (the same
files, checks and joins: equal bytes).
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .data import (IMAGE_SUFFIXES, InputSpec, Preprocess, Sample, _join, check_npz_size, check_sample, data_files,
                   file_item, npz_member_header, take_samples)
from .errors import InputError


@dataclass(frozen=True)
class FolderIndex:
    """The folder's data files in reading order, and how many samples each holds."""

    folder: str
    names: tuple[str, ...]
    counts: tuple[int, ...]
    sizes: tuple[int, ...]  # bytes per file: how a worker checks that it sees the same folder
    specs: tuple[InputSpec, ...]
    pre: Preprocess | None

    @property
    def total(self) -> int:
        return sum(self.counts)

    def starts(self) -> np.ndarray:
        """The position of each file's first sample."""
        return np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)


@dataclass(frozen=True)
class LazyBatch:
    """A batch named by its samples' positions in a :class:`FolderIndex`."""

    rows: np.ndarray  # int64 positions, increasing

    def samples(self) -> int:
        return len(self.rows)

    def take(self, index) -> "LazyBatch":
        return LazyBatch(self.rows[index])


def index_folder(folder: str | os.PathLike, specs: list[InputSpec], pre: Preprocess | None) -> FolderIndex:
    """Count each data file's samples from its header (an image is one sample): nothing
    is decoded.  The checks the arrays need are made where they are read."""
    files = data_files(Path(folder), specs)
    counts = [1 if p.suffix.lower() in IMAGE_SUFFIXES else _samples_in_file(p, specs) for p in files]
    return FolderIndex(str(folder), tuple(p.name for p in files), tuple(counts),
                       tuple(p.stat().st_size for p in files), tuple(specs), pre)


def _samples_in_file(path: Path, specs: list[InputSpec]) -> int:
    """Samples in one .npy/.npz, from its header, by the rule of :func:`data.check_sample`
    (a leading batch axis, or one sample without it); a file that breaks the rules is
    refused by the full check where it is read (one line, exit 2)."""
    batched = [s for s in specs if len(s.dims)]
    if not batched:
        return 1
    spec = batched[0]
    if path.suffix == ".npy":
        try:
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
        except Exception as exc:
            raise InputError(f"{path}: cannot be read as a numpy array ({' '.join(str(exc).split())[:200]})") from exc
    else:
        check_npz_size(path)
        try:
            with zipfile.ZipFile(path) as zf:
                header = npz_member_header(zf, f"{spec.name}.npy") if f"{spec.name}.npy" in zf.namelist() else None
        except (zipfile.BadZipFile, OSError) as exc:
            raise InputError(f"{path}: cannot be read as a numpy array ({exc})") from exc
        if header is None:
            return 1  # no such member: the worker's check names what is missing
        shape = header[0]
    return int(shape[spec.batch_axis]) if len(shape) == len(spec.dims) else 1


def lazy_batches(index: FolderIndex, batch_size: int, max_samples: int | None = None) -> Iterator[LazyBatch]:
    """The recipes of :func:`data.batches` over the folder: ``batch_size`` consecutive
    samples each (the last may be smaller), at most ``max_samples`` in all."""
    total = index.total if max_samples is None else min(index.total, max_samples)
    if total == 0:
        raise InputError("the calibration data holds no samples")
    for lo in range(0, total, batch_size):
        yield LazyBatch(np.arange(lo, min(lo + batch_size, total), dtype=np.int64))


def read(index: FolderIndex, batch: LazyBatch | Sample, last: dict | None = None) -> Sample:
    """The arrays of ``batch`` (a Sample is returned as it is): each file it touches read
    and checked, the samples taken in order and joined.  ``last``: a dict that keeps the
    last file read between calls, so consecutive batches cut from one many-sample file
    read it once."""
    if not isinstance(batch, LazyBatch):
        return batch
    last = {} if last is None else last
    starts = index.starts()
    files = np.searchsorted(starts, batch.rows, side="right") - 1
    pieces = []
    for f in np.unique(files):  # increasing: the rows are
        if last.get("file") != f:
            path = Path(index.folder) / index.names[f]
            if not path.is_file():
                raise InputError(f"{path}: not readable here (--ray with a calibration folder needs one every worker can read)")
            last.clear()
            last.update(file=f, arrays=_read_file(path, index))
        pieces.append(take_samples(last["arrays"], batch.rows[files == f] - starts[f]))
    return _join(pieces)


def _read_file(path: Path, index: FolderIndex) -> Sample:
    """One file as a checked batch, read as :func:`data.batches` reads it."""
    return check_sample(*file_item(path, list(index.specs), index.pre), list(index.specs))


def folder_sizes(folder: str, names: tuple[str, ...]) -> tuple[int, ...] | str:
    """Bytes of each named file as this process sees the folder, or why it cannot."""
    try:
        return tuple((Path(folder) / n).stat().st_size for n in names)
    except OSError as exc:
        return f"{exc.strerror or exc}: {exc.filename or folder}"
