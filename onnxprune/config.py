"""The frozen configuration of one prune: every option of ``prune()``, checked once.

``PruneConfig(...)`` raises :class:`InputError` on the first bad value, with the message
the CLI prints (``onnxprune/checks.py``), so a config that exists is valid; variants come
from ``dataclasses.replace``, which checks them again (``--steps`` rounds, the plot sweep).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import checks
from .compensate import COMPENSATIONS
from .criteria import criterion, methods
from .data import Preprocess
from .errors import InputError
from .methods import MethodOptions
from .plugins import load_plugins


@dataclass(frozen=True)
class PruneConfig:
    """Every option of :func:`onnxprune.prune`, with its defaults (see its docstring)."""

    method: str = "l1"
    ratio: float = 0.5
    global_: bool = False
    min_keep: int = 1
    round_to: int | None = None
    exclude: tuple[str, ...] = ()
    seed: int = 0
    calib: Any = None
    preprocess: Preprocess | None = None
    batch_size: int = 32
    max_samples: int | None = None
    memory_budget_mb: float = 1024
    device: str = "auto"
    compensate: str = "lstsq"
    target_macs: float | None = None
    target_params: float | None = None
    eval_data: Any = None
    labels: str | os.PathLike | np.ndarray | None = None
    max_error: float | None = None
    min_agreement: float | None = None
    force: bool = False
    eval_samples: int = 256
    progress: bool = False
    latency: bool = True
    method_options: MethodOptions | None = None
    steps: int = 1
    ray: str | None = None  # "local" or a Ray cluster address: calibration and the refit on Ray actors
    workers: int = 2  # shards (Ray actors) with ray
    input_shape: dict[str, tuple[int, ...]] | None = None  # input name -> dims for the synthetic run and the MACs

    def __post_init__(self) -> None:
        # A lone string is one pattern: normalised before anything reads it.
        object.__setattr__(self, "exclude", checks.patterns(self.exclude))
        # A private copy of tuples: the caller's dict may change after the check.
        object.__setattr__(self, "input_shape", checks.input_shapes(self.input_shape))
        self._check_options()
        self._check_data_options()

    @property
    def memory_budget(self) -> int:
        """``memory_budget_mb`` in bytes."""
        return int(self.memory_budget_mb * 2**20)

    @property
    def target(self) -> float | None:
        """The MACs or params fraction to keep, whichever was given."""
        return self.target_macs if self.target_macs is not None else self.target_params

    def _check_options(self) -> None:
        """The options that need no data (types included: the API's callers)."""
        load_plugins()  # a plug-in's criteria are choices too
        checks.choice("--method", self.method, methods())
        checks.real("--ratio", self.ratio, 0.0, 1.0, hi_open=True)
        checks.integer("--min-keep", self.min_keep, 1)
        checks.integer("--round-to", self.round_to, 1, optional=True)
        checks.integer("--seed", self.seed)
        checks.integer("--steps", self.steps, 1)
        checks.integer("--workers", self.workers, 1)
        if self.ray is not None and (not isinstance(self.ray, str) or not self.ray.strip()):
            raise InputError(f"--ray takes a cluster address (or nothing for a local runtime), got {self.ray!r}")
        if self.ray is not None and self.method == "mipp":
            # Its MLP estimator keeps a reservoir of rows (algorithm R): shards' reservoirs
            # merge into a fair sample, but not into the one process's sample.
            raise InputError("--ray cannot run --method mipp: its row reservoirs do not merge across workers "
                             "into the selection of one process; run mipp without --ray")
        checks.preprocess(self.preprocess)
        checks.method_options(self.method_options)

    def _check_data_options(self) -> None:
        """The data, budget and gate options, and how they combine."""
        checks.choice("--compensate", self.compensate, tuple(COMPENSATIONS))
        if criterion(self.method).needs_data and self.calib is None:
            raise InputError(f"--method {self.method} scores channels from activations: give calibration data with --calib")
        checks.integer("--batch-size", self.batch_size, 1)
        checks.integer("--max-samples", self.max_samples, 1, optional=True)
        checks.integer("eval_samples", self.eval_samples, 0)
        checks.real("--memory-budget", self.memory_budget_mb, 0.0, lo_open=True)
        self._check_targets()
        checks.real("--max-error", self.max_error, 0.0, optional=True)
        checks.real("--min-agreement", self.min_agreement, 0.0, 1.0, optional=True)
        checks.labels(self.labels)
        if self.labels is not None and self.eval_data is None:
            raise InputError("--labels needs --eval: labels must line up with the evaluation samples")
        gated = self.max_error is not None or self.min_agreement is not None
        if gated and self.calib is None and self.eval_data is None:
            raise InputError("--max-error/--min-agreement need samples to check on: give --eval or --calib")

    def _check_targets(self) -> None:
        if self.target_macs is not None and self.target_params is not None:
            raise InputError("give --target-macs or --target-params, not both")
        for name, t in (("--target-macs", self.target_macs), ("--target-params", self.target_params)):
            checks.real(name, t, 0.0, 1.0, lo_open=True, optional=True)  # the fraction to keep
