"""Every scoring method (criterion) as one kind of plug-in of the score/select stages.

A :class:`Criterion` says which statistics it needs: the basic per-channel sums
(``statistics``) and extra ones gathered during calibration (``requests``); scores channel
classes for budget-driven selection (``scores``); and may bring its own selection rule
(``own_rule``/``select``: relief's cumulative α, MIPP's confidence-driven TERC), its own way
of meeting a MACs/params target (``select_budget``) and report entries (``pre_rewrite``).
The built-in criteria (:mod:`.basic`: l1, l2, random, wanda, flap, activation; and relief,
relative, mipp, obs) are registered the same way a user's is: :func:`register_criterion`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..calibrate import StatRequest, Statistics
from ..consumers import ConsumerView
from ..errors import InputError
from ..groups import Analysis, Group


@dataclass
class MethodOptions:
    """Every knob of the seed methods, with the papers' defaults (METHODS.md)."""

    alpha_conv: float | None = None  # relief: cumulative share kept per conv output unit
    alpha_fc: float | None = None  # relief: ... per dense output unit
    granularity: str = "channel"  # relief: "connection" also zeroes pruned connections
    z: float = 1.0  # relative: keep if mean + z·std >= tau
    tau: float | None = None  # relative: threshold (None: chosen by the budget)
    confidence: float | None = None  # mipp: confidence of the keep test (None: from the budget)
    mi_estimator: str = "linear"  # mipp: linear (closed form) or mlp
    mi_estimates: int = 5  # mipp: repeated estimates for the confidence
    min_keep: int = 1
    seed: int = 0


class Criterion:
    """Base class of a scoring method: override ``scores``, the rest is optional.

    ``needs_data``: scores come from calibration statistics (``--calib`` is required, and
    channels that were exactly 0 on every sample score ``-inf``, so they go first).
    ``statistics``: the per-channel sums calibration gathers at every consumer input
    (``"sum"``, ``"sumsq"``, ``"sumabs"``); read through ``stats.tensors[name]``.
    """

    needs_data = True
    statistics: tuple[str, ...] = ("sum", "sumsq")

    def requests(self, analysis: Analysis, views: list[ConsumerView], opts: MethodOptions) -> list[StatRequest]:
        """Extra statistics to gather during calibration (``stats.extra[key]``)."""
        return []

    def scores(
        self, analysis: Analysis, stats: Statistics | None, views: list[ConsumerView], opts: MethodOptions
    ) -> dict[int, float]:
        """Class root -> importance (higher is kept first); a class left out scores 0.
        ``stats`` is None for a criterion that does not need data."""
        raise NotImplementedError

    def own_rule(self, opts: MethodOptions) -> bool:
        """True when the options ask for the criterion's own selection rule instead of a ratio."""
        return False

    def select(
        self, analysis: Analysis, stats: Statistics, views: list[ConsumerView], opts: MethodOptions,
        groups: list[Group],
    ) -> dict[int, np.ndarray]:
        """Group id -> removed class roots, by the criterion's own rule."""
        raise NotImplementedError

    def pre_rewrite(
        self, analysis: Analysis, stats: Statistics, views: list[ConsumerView], opts: MethodOptions,
        removed: np.ndarray,
    ) -> dict | None:
        """Called with the final selection before the structured rewrite (relief's
        connection granularity zeroes pruned connections here); returns report entries."""
        return None

    def select_budget(
        self, analysis: Analysis, stats: Statistics, views: list[ConsumerView], opts: MethodOptions,
        groups: list[Group], measure: Callable[[dict[int, np.ndarray]], float], target: float,
    ) -> tuple[dict[int, np.ndarray], float] | None:
        """Meet ``measure(selection) <= target`` with the criterion's own knob, or None to let
        the generic allocation or global-ranking bisection do it."""
        return None


REGISTRY: dict[str, Criterion] = {}


def register_criterion(name: str, criterion: Criterion, *, replace: bool = False) -> Criterion:
    """Make ``criterion`` selectable as ``method=name`` (the CLI's ``--method NAME``).
    A name already registered raises :class:`~onnxprune.InputError` unless ``replace=True``."""
    if not isinstance(name, str) or not name or name.startswith("-") or any(ch.isspace() for ch in name):
        raise InputError(f"register_criterion: the name must be one word, got {name!r}")
    if not isinstance(criterion, Criterion):
        kind = f"the class {criterion.__name__}: pass an instance" if isinstance(criterion, type) else type(criterion).__name__
        raise InputError(f"register_criterion: expected an onnxprune.Criterion instance, got {kind}")
    if name in REGISTRY and not replace:
        raise InputError(f"register_criterion: '{name}' is already registered "
                         f"({type(REGISTRY[name]).__name__}); pass replace=True to replace it")
    REGISTRY[name] = criterion
    return criterion


from . import basic  # noqa: E402,F401  (registered first: the order --help lists them in)
from . import relief  # noqa: E402,F401
from . import relative  # noqa: E402,F401
from . import mipp  # noqa: E402,F401
from . import obs  # noqa: E402,F401
