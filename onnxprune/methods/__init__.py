"""The seed papers' methods as plug-ins of the score/select stages.

A method asks the calibrate stage for the statistics it needs (``requests``), scores
channel classes for budget-driven selection (``scores``), and may bring its own selection
rule (``select``: relief's cumulative α, MIPP's confidence-driven TERC) and its own way of
meeting a MACs/params target (``select_budget``).  ``wanda``/``flap``/``activation`` need only
the basic per-channel statistics and live in :mod:`onnxprune.criteria`.

Adding a method: subclass :class:`Method` in a module of this package and add it to
``REGISTRY`` below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..calibrate import StatRequest, Statistics
from ..consumers import ConsumerView
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


class Method:
    """Base class of a data-driven method plug-in."""

    name = ""

    def requests(self, analysis: Analysis, views: list[ConsumerView], opts: MethodOptions) -> list[StatRequest]:
        """Extra statistics to gather during calibration."""
        return []

    def scores(
        self, analysis: Analysis, stats: Statistics, views: list[ConsumerView], opts: MethodOptions
    ) -> dict[int, float]:
        """Class root -> importance (higher is kept first), for ratio/target selection."""
        raise NotImplementedError

    def own_rule(self, opts: MethodOptions) -> bool:
        """True when the options ask for the method's own selection rule instead of a ratio."""
        return False

    def select(
        self, analysis: Analysis, stats: Statistics, views: list[ConsumerView], opts: MethodOptions,
        groups: list[Group],
    ) -> dict[int, np.ndarray]:
        """Group id -> removed class roots, by the method's own rule."""
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
        """Meet ``measure(selection) <= target`` with the method's own knob, or None to let
        the generic global-ranking bisection do it."""
        return None


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    REGISTRY[method.name] = method
    return method
from . import relief  # noqa: E402,F401
from . import relative  # noqa: E402,F401
from . import mipp  # noqa: E402,F401
from . import obs  # noqa: E402,F401
