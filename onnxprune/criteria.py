"""Score stage: one importance value per removable channel of each group, by the registered
criterion (:mod:`onnxprune.methods`: the built-in ones and any a user registers)."""

from __future__ import annotations

import numpy as np

from .groups import Analysis, Group
from .methods import REGISTRY, Criterion, MethodOptions

# The built-in criteria, in the order --help lists them (register_criterion adds more).
METHODS = tuple(REGISTRY)
DATA_DRIVEN = tuple(name for name, c in REGISTRY.items() if c.needs_data)


def methods() -> tuple[str, ...]:
    """Every registered criterion's name: the built-in ones first."""
    return tuple(REGISTRY)


def criterion(method: str) -> Criterion:
    """The registered criterion ``method``; ValueError naming the choices otherwise."""
    if method not in REGISTRY:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[method]


def statistics_for(method: str) -> tuple[str, ...]:
    """The per-channel statistics ``calibrate`` must gather for ``method`` (and for the
    dead channels and bias compensation)."""
    return tuple(criterion(method).statistics)


def dead_classes(analysis: Analysis, stats, views) -> set[int]:
    """Classes whose every index was exactly 0 on every calibration sample, at every
    consumer with statistics."""
    n_atoms = len(analysis.roots)
    alive = np.zeros(n_atoms, dtype=bool)
    measured = np.zeros(n_atoms, dtype=bool)
    for view in views:
        st = stats.tensors.get(view.tensor)
        if st is None:
            continue
        roots = analysis.roots[view.atoms]
        measured[roots] = True
        alive |= np.bincount(roots, weights=(~st.dead).astype(float), minlength=n_atoms) > 0
    return {int(r) for r in np.flatnonzero(measured & ~alive)}


def score_groups(
    analysis: Analysis, method: str, seed: int = 0, stats=None, opts: MethodOptions | None = None
) -> dict[int, np.ndarray]:
    """Group id -> score of each of its removable channels (same order as ``group.classes``).

    Data-driven criteria need ``stats`` (from the calibrate stage).  Dead channels score
    ``-inf`` so every selection removes them first.
    """
    from .consumers import consumer_views

    crit = criterion(method)
    if crit.needs_data and stats is None:
        raise ValueError(f"method {method!r} needs calibration statistics")
    views = consumer_views(analysis)
    totals = crit.scores(analysis, stats, views, opts or MethodOptions(seed=seed))
    dead = dead_classes(analysis, stats, views) if crit.needs_data else set()
    return {
        g.id: np.array([-np.inf if int(c) in dead else totals.get(int(c), 0.0) for c in g.classes])
        for g in analysis.groups if g.prunable
    }


def group_of(analysis: Analysis, gid: int) -> Group:
    return next(g for g in analysis.groups if g.id == gid)
