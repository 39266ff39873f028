"""Temporary changes to a graph, undone when the block that made them ends.

Some stages need the graph a little changed for a moment: calibration writes a copy that
also outputs the tensors it measures, the allocation's probes serialise a tail whose
consumers read fed parameters.  :func:`temporary_changes` records each change as it is made
and undoes them in reverse order on the way out, also when the block raises.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import onnx_ir as ir


class Changes:
    """The changes made to ``graph`` inside one :func:`temporary_changes` block."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self._undo: list[Callable[[], None]] = []

    def add_nodes(self, nodes: Sequence[ir.Node]) -> None:
        """Append ``nodes`` to the graph."""
        nodes = list(nodes)
        self.graph.extend(nodes)
        self._undo.append(lambda: self.graph.remove(nodes, safe=True))

    def add_outputs(self, values: Sequence[ir.Value]) -> None:
        """Make ``values`` graph outputs too."""
        values = list(values)
        self.graph.outputs.extend(values)
        self._undo.append(lambda: [self.graph.outputs.remove(v) for v in values])

    def swap_input(self, node: ir.Node, index: int, value: ir.Value | None) -> None:
        """Make ``node`` read ``value`` as its input ``index``."""
        old = node.inputs[index]
        node.replace_input_with(index, value)
        self._undo.append(lambda: node.replace_input_with(index, old))

    def undo(self) -> None:
        """Undo every change, the last one first."""
        while self._undo:
            self._undo.pop()()


@contextlib.contextmanager
def temporary_changes(graph: ir.Graph) -> Iterator[Changes]:
    """A :class:`Changes` of ``graph`` whose changes are undone when the block ends."""
    changes = Changes(graph)
    try:
        yield changes
    finally:
        changes.undo()
