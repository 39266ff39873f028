"""The vocabulary shared by the dependency analysis and the rewrite.

A *channel atom* is one output channel of one producer (Conv, Gemm, MatMul with a
constant weight).  Every tensor that carries prunable channels has a :class:`Layout`:
the axis that carries them and, for every index along that axis, the atom it holds.
Coupling (a residual Add, a grouped Conv) unites atoms; the classes of the union-find
are the channels that must be removed together, and the producers they link form a
group.  Atom 0 is ``FIXED``: a position that can never be removed (it comes from a graph
input, say); any atom united with it becomes unremovable.

Edits are small records the op handlers emit while propagating layouts.  The rewrite
applies them once the removed classes are known; each edit only needs ``keep(atoms)``,
a boolean mask saying which of its atoms survive.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

FIXED = 0


@dataclass
class Layout:
    """Which atom sits at each index of a tensor's channel axis."""

    axis: int
    atoms: np.ndarray  # int64, one atom id per index along `axis`

    def __len__(self) -> int:
        return int(self.atoms.shape[0])


class UnionFind:
    """Growable union-find over atom ids (ints)."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a: int) -> int:
        parent = self.parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        # The smaller id wins so FIXED (0) stays the root of its class and results are
        # independent of the order in which couplings are discovered.
        lo, hi = (ra, rb) if ra < rb else (rb, ra)
        self.parent[hi] = lo
        return lo

    def roots(self) -> np.ndarray:
        """Root of every id, as an array indexable by atom id."""
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


# ----------------------------------------------------------------------------- edits


@dataclass
class SliceParam:
    """Constant input ``index`` of ``node`` has one entry per atom along ``axis``.

    ``role`` is ``weight_out`` (a producer's filters), ``weight_in`` (a consumer's
    input weights), or ``param`` (bias, norm parameters, per-channel constants).
    """

    node: ir.Node
    index: int
    axis: int
    atoms: np.ndarray
    role: str


@dataclass
class SetCount:
    """Entry ``pos`` of a 1-D integer constant (input ``index``) or attribute ``attr``
    becomes ``scale`` times the number of kept atoms (Reshape shapes, Resize sizes)."""

    node: ir.Node
    index: int | None
    attr: str | None
    pos: int
    atoms: np.ndarray
    scale: int = 1


@dataclass
class SetGroup:
    """The ``group`` attribute of a depthwise Conv follows the kept channel count."""

    node: ir.Node
    atoms: np.ndarray


@dataclass
class SplitSizes:
    """A Split on the channel axis: each output's size becomes its kept count."""

    node: ir.Node
    chunks: list[np.ndarray]


@dataclass
class SliceBounds:
    """A step-1 Slice on the channel axis: start/end are remapped to the kept indices."""

    node: ir.Node
    pos: int  # position of the channel axis in the Slice's axes list
    atoms: np.ndarray  # the full input layout
    start: int
    end: int


Edit = SliceParam | SetCount | SetGroup | SplitSizes | SliceBounds
