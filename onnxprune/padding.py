"""Padded sequences: calibration batches sorted by length and cut to their longest sample.

Tokenised text reaches a model padded to one length, with an attention mask saying which
positions are real.  A transformer computes every padded position anyway and nothing reads
it back: the statistics, Gram sums, refit rows and probe errors of those positions describe
tokens that do not exist, and on short sentences they are most of the work.  So, where the
model has a mask input and is checked to give the same outputs at the real positions on a
sample cut to its own length (:func:`trims_exactly`), the calibrated batches are

* sorted by length within windows of a few batches (:func:`sorted_batches`; the held-out
  and probe samples are chosen before, from the reading order, as without padding), and
* cut after the last position any of their samples uses (:func:`trim`),

so each batch carries little padding.  Verification cuts its batches the same way.  The
first batch's reference run, the MAC count and the check of the pruned model keep the
padded shapes the user gave.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from .data import Sample, _axis, _join, _with_axes, samples_in, take_samples

# Relative L2 difference allowed between a padded sample's outputs at its real positions and
# the same sample cut to its length (float rounding of a softmax over fewer masked terms).
EXACT = 1e-5


@dataclass(frozen=True)
class Padding:
    """The mask input and, per input that shares its sequence dim, that dim's axis."""

    mask: str
    axes: tuple[tuple[str, int], ...]  # (input name, sequence axis); the mask's included


def find_padding(inputs: Iterable) -> Padding | None:
    """The padding of a model from onnxruntime's input list (``session.get_inputs()``): a
    rank-2 integer, bool or float input whose name contains ``mask`` and whose second dim is
    symbolic, with every input that has the same symbolic dim; None without one."""
    inputs = list(inputs)
    for inp in inputs:
        shape = list(inp.shape or [])
        if "mask" not in inp.name.lower() or len(shape) != 2 or not isinstance(shape[1], str) or not shape[1]:
            continue
        if not any(t in inp.type for t in ("int", "bool", "float")):
            continue
        seq = shape[1]
        axes = tuple((other.name, 1 + list(other.shape)[1:].index(seq)) for other in inputs
                     if seq in list(other.shape or [])[1:])  # never the batch axis
        return Padding(inp.name, axes)
    return None


def lengths(batch: Sample, padding: Padding) -> np.ndarray:
    """Per sample, one past its last position the mask marks as real (0 for none)."""
    m = np.asarray(batch[padding.mask]) != 0
    if _axis(batch, padding.mask):
        m = np.moveaxis(m, _axis(batch, padding.mask), 0)
    used = m.any(axis=1)
    return np.where(used, m.shape[1] - np.argmax(m[:, ::-1], axis=1), 0)


def trim(batch: Sample, padding: Padding) -> Sample:
    """``batch`` cut after the last position any of its samples uses (at least one)."""
    if padding.mask not in batch or not samples_in(batch):
        return batch
    full = np.shape(batch[padding.mask])[1]
    keep = max(int(lengths(batch, padding).max()), 1)
    if keep >= full:
        return batch
    cut = dict(batch)
    for name, axis in padding.axes:
        if name in cut and np.ndim(cut[name]) > axis:
            cut[name] = cut[name][(slice(None),) * axis + (slice(None, keep),)]
    return _with_axes(batch, cut)


def sorted_batches(batches: Iterable[Sample], padding: Padding, window: int) -> Iterator[Sample]:
    """The samples of every ``window`` consecutive batches sorted by length, longest first
    (stable), and cut again into batches of the same sizes, each trimmed.  A window whose batches differ in
    padded length is only trimmed."""
    buffer: list[Sample] = []
    for batch in batches:
        buffer.append(batch)
        if len(buffer) == window:
            yield from _sorted_window(buffer, padding)
            buffer = []
    if buffer:
        yield from _sorted_window(buffer, padding)


def _sorted_window(buffer: list[Sample], padding: Padding) -> Iterator[Sample]:
    shapes = {tuple(np.shape(b[name])[axis] for name, axis in padding.axes) for b in buffer}
    if len(shapes) > 1:
        yield from (trim(b, padding) for b in buffer)
        return
    joined = _join(buffer)
    # Longest first: the first batch then plans the calibration's runs for every later one.
    order = np.argsort(-lengths(joined, padding), kind="stable")
    start = 0
    for b in buffer:
        n = samples_in(b)
        yield trim(take_samples(joined, order[start : start + n]), padding)
        start += n


def trims_exactly(sess, batch: Sample, padding: Padding) -> bool:
    """Whether the model's outputs at the real positions of the shortest sample of
    ``batch`` stay the same with the sample cut to its length (relative L2 ≤ EXACT); False
    when no sample of ``batch`` is padded (nothing to check on)."""
    n = lengths(batch, padding)
    full = np.shape(batch[padding.mask])[1]
    i = int(np.argmin(n))
    if n[i] >= full:
        return False  # no padded sample to check on: nothing is cut
    one = take_samples(batch, slice(i, i + 1))
    padded = sess.run(None, dict(one))
    cut = sess.run(None, dict(trim(one, padding)))
    for p, c in zip(padded, cut):
        p, c = np.asarray(p, np.float64), np.asarray(c, np.float64)
        if p.ndim != c.ndim or any(cd != pd and (pd != full or cd != max(n[i], 1)) for pd, cd in zip(p.shape, c.shape)):
            return False
        p = p[tuple(slice(None, d) for d in c.shape)]
        if np.linalg.norm(p - c) > EXACT * max(np.linalg.norm(p), 1e-30):
            return False
    return True
