"""Option checks shared by the API and the CLI: one InputError line per bad value.

Every number is checked for its type first (the API takes Python values, so ``"0.5"``
or ``2.5`` for a count must not end as a bare TypeError deep inside), then for NaN/Inf
(a NaN compares false with everything, so ``x > max_error`` would silently pass), then
for its range.  Messages name the CLI flag, which is also the API keyword with dashes.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import InputError


def real(name: str, value: Any, lo: float | None = None, hi: float | None = None,
         lo_open: bool = False, hi_open: bool = False, optional: bool = False) -> float | None:
    """``value`` as a finite float within the bounds (None passes when ``optional``), else InputError."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} takes a number, got {type(value).__name__} {value!r}")
    x = float(value)
    if not math.isfinite(x):
        raise InputError(f"{name} must be a finite number, got {x}")
    low_bad = lo is not None and (x <= lo if lo_open else x < lo)
    high_bad = hi is not None and (x >= hi if hi_open else x > hi)
    if low_bad or high_bad:
        left = "-inf" if lo is None else f"{lo:g}"
        right = "inf" if hi is None else f"{hi:g}"
        span = f"{'(' if lo_open or lo is None else '['}{left}, {right}{')' if hi_open or hi is None else ']'}"
        raise InputError(f"{name} must be in {span}, got {x:g}")
    return x


def integer(name: str, value: Any, lo: int | None = None, optional: bool = False) -> int | None:
    """``value`` as an int of at least ``lo`` (None passes when ``optional``), else InputError."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} takes a whole number, got {type(value).__name__} {value!r}")
    if lo is not None and value < lo:
        raise InputError(f"{name} must be at least {lo}, got {value}")
    return int(value)


def choice(name: str, value: Any, choices) -> None:
    """Refuse anything but one of ``choices`` (strings)."""
    if not isinstance(value, str) or value not in choices:
        raise InputError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def path_like(name: str, value: Any, optional: bool = False) -> None:
    """Refuse a path argument that is neither a str nor an os.PathLike."""
    if value is None and optional:
        return
    if not isinstance(value, (str, os.PathLike)):
        raise InputError(f"{name} must be a path (str or os.PathLike), got {type(value).__name__}")


def patterns(exclude: Any) -> tuple[str, ...]:
    """``exclude`` as a tuple of fnmatch patterns: a lone string is ONE pattern, not its characters."""
    if exclude is None:
        return ()
    if isinstance(exclude, str):
        return (exclude,)
    try:
        items = tuple(exclude)
    except TypeError:
        raise InputError(f"--exclude takes a pattern or a list of patterns, got {type(exclude).__name__}") from None
    bad = [p for p in items if not isinstance(p, str)]
    if bad:
        raise InputError(f"--exclude patterns must be strings, got {type(bad[0]).__name__} {bad[0]!r}")
    return items


def input_shapes(value: Any) -> dict[str, tuple[int, ...]] | None:
    """``--input-shape``: a mapping of input name -> dims (positive whole numbers), returned
    as a new dict of tuples; None (or an empty mapping) passes as None."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InputError(f"--input-shape takes a dict of input name -> dims, got {type(value).__name__}")
    out: dict[str, tuple[int, ...]] = {}
    for name, dims in value.items():
        if not isinstance(name, str) or not name:
            raise InputError(f"--input-shape names an input by its name (a string), got {name!r}")
        if isinstance(dims, (str, bytes)) or not hasattr(dims, "__iter__"):
            raise InputError(f"--input-shape {name}: dims must be a sequence of whole numbers, got {dims!r}")
        dims = tuple(dims)
        if not dims:
            raise InputError(f"--input-shape {name}: no dims given (a scalar input has none to fix)")
        for d in dims:
            if isinstance(d, bool) or not isinstance(d, numbers.Integral):
                raise InputError(f"--input-shape {name}: dims must be whole numbers, got {d!r}")
            if d < 1:
                raise InputError(f"--input-shape {name}: dims must be positive, got {_dims_text(dims)}")
        out[name] = tuple(int(d) for d in dims)
    return out or None


def parse_input_shapes(texts: Any) -> dict[str, tuple[int, ...]] | None:
    """The CLI's repeated ``--input-shape NAME:D0,D1,...`` as the API's dict (the name may
    itself hold colons: the dims follow the last one)."""
    out: dict[str, tuple[int, ...]] = {}
    for text in texts or ():
        name, sep, rest = text.rpartition(":")
        if not sep or not name:
            raise InputError(f"--input-shape takes NAME:D0,D1,... (e.g. images:1,3,320,320), got '{text}'")
        try:
            dims = tuple(int(d) for d in rest.split(","))
        except ValueError:
            raise InputError(f"--input-shape {name}: dims must be comma-separated whole numbers, got '{rest}'") from None
        if name in out:
            raise InputError(f"--input-shape gives input '{name}' twice")
        out[name] = dims
    return out or None


def input_shapes_fit(shapes: dict[str, tuple[int, ...]] | None, specs: list) -> None:
    """``--input-shape`` against the model's inputs (``data.InputSpec``): a known name, the
    input's rank, and every dim the model fixes kept as it is."""
    if not shapes:
        return
    by_name = {s.name: s for s in specs}
    for name, dims in shapes.items():
        spec = by_name.get(name)
        if spec is None:
            raise InputError(f"--input-shape names input '{name}', which the model does not have "
                             f"(inputs: {', '.join(by_name) or 'none'})")
        if len(dims) != len(spec.dims):
            raise InputError(f"--input-shape {name}:{_dims_text(dims, ',')} has rank {len(dims)}, "
                             f"but input '{name}' has rank {len(spec.dims)} {_dims_text(spec.dims)}")
        for axis, (want, got) in enumerate(zip(spec.dims, dims)):
            if want is not None and want != got:
                raise InputError(f"--input-shape {name}:{_dims_text(dims, ',')} sets dim {axis} to {got}, "
                                 f"but the model fixes it to {want} {_dims_text(spec.dims)}")


def _dims_text(dims: tuple, sep: str = ", ") -> str:
    text = sep.join("?" if d is None else str(d) for d in dims)
    return text if sep == "," else f"[{text}]"


def preprocess(pre: Any) -> None:
    """Image preprocessing values: positive sizes, finite scale/mean/std, no zero std."""
    from .data import Preprocess

    if pre is None:
        return
    if not isinstance(pre, Preprocess):
        raise InputError(f"preprocess must be an onnxprune.data.Preprocess, got {type(pre).__name__}")
    integer("--resize", pre.resize, 1, optional=True)
    integer("--crop", pre.crop, 1, optional=True)
    real("--scale", pre.scale)
    for flag, values in (("--mean", pre.mean), ("--std", pre.std)):
        values = _sequence(flag, values)
        for v in values:
            real(flag, v)
        if len(values) not in (1, 3):
            raise InputError(f"{flag} takes 1 or 3 values (one per colour channel), got {len(values)}")
    if any(float(v) == 0.0 for v in pre.std):
        raise InputError(f"--std divides the pixels: it cannot be 0, got {','.join(f'{float(v):g}' for v in pre.std)}")
    choice("--layout", pre.layout, ("NCHW", "NHWC"))
    if pre.channels is not None:
        choice("--channels", pre.channels, ("GRAY", "RGB", "BGR", "L"))


def _sequence(flag: str, values: Any) -> tuple:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise InputError(f"{flag} takes a sequence of numbers, got {type(values).__name__}")
    return tuple(values)


def method_options(opts: Any) -> None:
    """The seed methods' knobs (relief's α, relative's z/τ, mipp's confidence)."""
    from .methods import MethodOptions
    from .methods.mipp import confidence_value

    if opts is None:
        return
    if not isinstance(opts, MethodOptions):
        raise InputError(f"method_options must be an onnxprune.methods.MethodOptions, got {type(opts).__name__}")
    # Scores of a unit sum to 1: above 1 no prefix reaches α, at 0 nothing is kept.
    real("--alpha-conv", opts.alpha_conv, 0.0, 1.0, lo_open=True, optional=True)
    real("--alpha-fc", opts.alpha_fc, 0.0, 1.0, lo_open=True, optional=True)
    real("--z", opts.z)
    real("--tau", opts.tau, optional=True)
    if opts.confidence is not None:
        confidence_value(real("--confidence", opts.confidence))
    choice("--granularity", opts.granularity, ("channel", "connection"))
    choice("--mi-estimator", opts.mi_estimator, ("linear", "mlp"))
    integer("mi_estimates", opts.mi_estimates, 1)


def labels(value: Any) -> None:
    """Labels are a path to a .npy file or an integer array."""
    if value is None or isinstance(value, (str, os.PathLike)):
        return
    if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.integer):
        raise InputError(f"--labels must be a .npy path or an integer numpy array, got {type(value).__name__}")
