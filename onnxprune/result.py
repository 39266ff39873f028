"""What a run returns: :class:`PruneResult` (a prune) and :class:`AnalysisReport` (``analyze``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .groups import Group


@dataclass
class AnalysisReport:
    """What ``onnxprune analyze`` prints: groups, blocked groups, prunable shares."""

    groups: list[Group]
    params: int
    macs: int
    prunable_params: int
    prunable_macs: int
    macs_basis: str = "declared shapes"  # as PruneResult's
    macs_input_shapes: dict[str, list[int]] | None = None
    macs_symbolic: dict[str, list[str]] | None = None
    macs_excluded: str | None = None  # weighted nodes inside If/Loop/Scan bodies (groups.control_flow_summary)

    def to_dict(self) -> dict:
        return {
            "params": self.params,
            "macs": self.macs,
            "prunable_params": self.prunable_params,
            "prunable_macs": self.prunable_macs,
            "prunable_params_share": self.prunable_params / self.params if self.params else 0.0,
            "prunable_macs_share": self.prunable_macs / self.macs if self.macs else 0.0,
            "macs_counted_on": self.macs_basis,
            "macs_input_shapes": self.macs_input_shapes,
            "macs_symbolic_dims": self.macs_symbolic,
            "macs_not_counted": self.macs_excluded,
            "groups": [g.to_dict() for g in self.groups],
        }


@dataclass
class RefitCounts:
    """How many consumers the compensate stage refitted on the pruned graph, by fit."""

    lstsq: int = 0  # least squares from their inputs in the pruned graph
    bias: int = 0  # the bias fit, which predicted held-out samples better
    keep_zeros: int = 0  # the bias fit, to keep their zero weights (sparse on purpose)
    post_relu: int = 0  # ``--compensate bias``: feeding a Relu, bias refitted for the post-ReLU mean
    bias_only: bool = False  # ``--compensate bias`` (the result's ``compensation`` says so too)

    def to_dict(self) -> dict[str, int]:
        # int(): the counts are sums over numpy booleans
        return {"lstsq": int(self.lstsq), "bias": int(self.bias), "keep_zeros": int(self.keep_zeros),
                "post_relu": int(self.post_relu)}

    def note(self) -> str:
        """The report's sentence, built from the counts."""
        if self.bias_only:
            return f"{self.post_relu} consumers feeding a Relu: bias refitted in the pruned graph to keep the post-ReLU mean"
        text = f"{self.lstsq} consumers refitted by least squares from their inputs in the pruned graph"
        if self.bias:
            text += f", {self.bias} by bias only (it predicted held-out samples better)"
        if self.keep_zeros:
            text += f", {self.keep_zeros} by bias only to keep their zero weights (sparse)"
        return text


@dataclass
class PruneResult:
    """What a prune did: counts before/after, per-group kept channels, blocked groups, timings."""

    method: str
    ratio: float
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    groups: list[dict]
    output: str | None = None
    file_size_before: int | None = None
    file_size_after: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    compensation: str = "none"
    compensation_note: str | None = None  # RefitCounts.note() of ``refit``
    refit: dict[str, int] | None = None  # RefitCounts.to_dict(): consumers refitted on the pruned graph, by fit
    calibration: dict | None = None
    fidelity: dict | None = None
    latency: dict | None = None
    gate_forced: bool = False
    method_report: dict | None = None
    steps: int = 1
    distributed: dict | None = None  # with --ray: time and bytes per phase (distributed.RayPool.summary)
    selection: str = ""
    # What the MACs were counted on: the input shapes (per sample) and where they came from
    # ("calibration data", "--input-shape", "declared shapes", or "per unit" of the symbolic
    # dims in ``macs_symbolic`` when the run knew no real shapes: then not a total).
    macs_input_shapes: dict[str, list[int]] | None = None
    macs_basis: str = "declared shapes"
    macs_symbolic: dict[str, list[str]] | None = None
    # --plot's error curve: (MACs removed, rel. L2 error, agreement or None) per point
    sweep: list[tuple[float, float, float | None]] = field(default_factory=list)
    macs_excluded: str | None = None  # weighted nodes inside If/Loop/Scan bodies: not counted
    # With --target-macs/--target-params: requested vs achieved (select.target_outcome).
    target: dict | None = None

    @property
    def blocked(self) -> list[dict]:
        return [g for g in self.groups if g["blocked"]]

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "ratio": self.ratio,
            "params": {"before": self.params_before, "after": self.params_after},
            "macs": {"before": self.macs_before, "after": self.macs_after, "input_shapes": self.macs_input_shapes,
                     "counted_on": self.macs_basis, "symbolic_dims": self.macs_symbolic,
                     "not_counted": self.macs_excluded},
            "file_size": {"before": self.file_size_before, "after": self.file_size_after},
            "output": self.output,
            "groups": self.groups,
            "seconds": self.seconds,
            "compensation": self.compensation,
            "compensation_note": self.compensation_note,
            "refit": self.refit,
            "calibration": self.calibration,
            "fidelity": self.fidelity,
            "error_curve": [{"macs_removed": m, "rel_l2": e, "agreement": a} for m, e, a in self.sweep] or None,
            "latency": self.latency,
            "method_report": self.method_report,
            "steps": self.steps,
            "selection": self.selection,
            "distributed": self.distributed,
            "target": self.target,
        }
