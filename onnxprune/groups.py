"""Dependency groups: which channels must be removed together, and which cannot be.

Walks the main graph once in topological order, asking the op table how each node
maps the channel layouts of its inputs to its outputs (see :mod:`onnxprune.ops`).
The result is a list of :class:`Group` objects plus the edit records the rewrite
applies once the removed channels are chosen.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ._graph import all_graph_nodes, node_label, opset
from .fold import prepare_graph
from .errors import InputError
from .layout import FIXED, Edit, Layout, SliceBounds, SliceParam, SplitSizes, UnionFind
from .ops import handler_for, subgraph_reason


@dataclass
class Group:
    """Channels removed together: the producers that create them and the nodes that read them."""

    id: int
    producers: list[ir.Node]
    consumers: list[ir.Node]
    classes: np.ndarray  # root atom of every removable channel, in a stable order
    n_channels: int  # removable + fixed
    blocked: list[str] = field(default_factory=list)
    excluded: bool = False
    # Class roots of each sub-range read on its own (a Split output, a channel Slice):
    # at least one of each must stay, or an empty tensor reaches its readers.  A chunk
    # may span several groups (Concat then Slice), so roots of other groups can appear.
    keep_any: list[np.ndarray] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return not self.blocked and not self.excluded and len(self.classes) > 1

    @property
    def name(self) -> str:
        return ", ".join(p.name or p.op_type for p in self.producers)

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "producers": [node_label(n) for n in self.producers],
            "consumers": [node_label(n) for n in self.consumers],
            "channels": self.n_channels,
            "removable_channels": int(len(self.classes)),
            "blocked": list(self.blocked),
            "excluded": self.excluded,
        }


@dataclass
class Analysis:
    """Everything the later stages need to know about the graph's channels."""

    model: ir.Model
    groups: list[Group]
    edits: list[Edit]
    roots: np.ndarray  # atom id -> root atom id (its channel class)
    layouts: dict[ir.Value, Layout]
    # What count.estimate_after needs that does not depend on the removal (built on first use).
    estimate_plan: object = field(default=None, repr=False, compare=False)
    # id(node) -> MACs on the run's input shapes (count.macs_by_node); None: the graph's own shapes.
    node_macs: dict[int, int] | None = field(default=None, repr=False, compare=False)

    def class_of(self, atoms: np.ndarray) -> np.ndarray:
        return self.roots[atoms]


class _Context:
    """What op handlers may do while layouts propagate (see ops.py)."""

    def __init__(self, model: ir.Model) -> None:
        self.graph = model.graph
        self.opset = opset(model)
        self.uf = UnionFind()
        self.uf.add(1)  # atom 0 is FIXED
        self.owner: list[int] = [-1]  # atom -> index of the producer that made it
        self.producer_nodes: list[ir.Node] = []
        self.group_uf = UnionFind()
        self.layouts: dict[ir.Value, Layout] = {}
        self.edits: list[Edit] = []
        self.blocks: list[tuple[np.ndarray, str]] = []

    # -- used by handlers ------------------------------------------------------------
    def layout(self, value: ir.Value | None) -> Layout | None:
        return None if value is None else self.layouts.get(value)

    def set_layout(self, value: ir.Value, layout: Layout) -> None:
        self.layouts[value] = layout

    def new_atoms(self, n: int, node: ir.Node) -> np.ndarray:
        atoms = self.uf.add(n)
        self.owner.extend([len(self.producer_nodes)] * n)
        self.producer_nodes.append(node)
        self.group_uf.add(1)
        return atoms

    def fixed(self, n: int) -> np.ndarray:
        return np.full(n, FIXED, dtype=np.int64)

    def union(self, a: np.ndarray, b: np.ndarray, node: ir.Node) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            self.uf.union(x, y)
            if x != FIXED and y != FIXED:
                self.group_uf.union(self.owner[x], self.owner[y])

    def block(self, atoms: np.ndarray, node: ir.Node, reason: str) -> None:
        self.blocks.append((atoms, f"{node_label(node)}: {reason}"))

    def block_reason(self, atoms: np.ndarray, reason: str) -> None:
        """Block ``atoms`` with a reason that names its own node."""
        self.blocks.append((atoms, reason))

    def edit(self, record: Edit) -> None:
        self.edits.append(record)


def analyze_groups(model: ir.Model, exclude: list[str] | tuple[str, ...] = ()) -> Analysis:
    """Find every channel group of ``model``'s main graph and why some cannot be pruned.

    ``exclude`` holds fnmatch patterns matched against producer node names and their
    output names; matching groups are kept whole and reported as excluded.
    """
    # A no-op after load_model, which normalises and then infers shapes; kept for graphs built in memory.
    prepare_graph(model.graph)
    ctx = _Context(model)
    graph = model.graph
    for node in graph:
        handler = handler_for(node)
        carried = [ctx.layout(v) for v in node.inputs if v is not None]
        carried = [lay for lay in carried if lay is not None]
        if handler is None:
            for lay in carried:
                where = f"{node.domain}::" if node.domain not in ("", "ai.onnx") else ""
                ctx.block(lay.atoms, node, f"op '{where}{node.op_type}' is not in onnxprune's op table")
            continue
        if carried or handler.creates_channels:
            handler.propagate(node, ctx)

    owners = control_flow_owners(graph)
    for value, lay in ctx.layouts.items():
        if value.is_graph_output():
            ctx.blocks.append((lay.atoms, f"'{value.name}' is a graph output: its channels are kept"))
        for use in value.uses():
            if use.node.graph is not graph and id(use.node) in owners:
                ctx.block_reason(lay.atoms, subgraph_reason(value, owners[id(use.node)]))

    return _build(model, ctx, exclude)


def control_flow_owners(graph: ir.Graph) -> dict[int, ir.Node]:
    """id of every node inside a subgraph (at any depth) -> the main-graph If/Loop/Scan
    (or other node with a body) that holds it: a capture read at any depth blocks as a
    read of that top-level node, which is what a user can find in the graph."""
    owners: dict[int, ir.Node] = {}
    for node in graph:
        for attr in node.attributes.values():
            bodies = [attr.value] if attr.type == ir.AttributeType.GRAPH else (
                list(attr.value) if attr.type == ir.AttributeType.GRAPHS else [])
            for body in bodies:
                owners.update((id(inner), node) for inner in all_graph_nodes(body))
    return owners


_WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def control_flow_summary(graph: ir.Graph) -> str | None:
    """One phrase naming the weighted nodes that live inside If/Loop/Scan bodies (which
    onnxprune neither prunes nor counts MACs of), or None when there are none."""
    owners = control_flow_owners(graph)
    inside = [n for n in all_graph_nodes(graph) if id(n) in owners and n.op_type in _WEIGHTED]
    if not inside:
        return None
    by_op: dict[str, int] = {}
    for n in inside:
        by_op[n.op_type] = by_op.get(n.op_type, 0) + 1
    ops = f"{next(iter(by_op))} nodes" if len(by_op) == 1 else (
        "weighted nodes (" + ", ".join(f"{k} {v}" for k, v in sorted(by_op.items())) + ")")
    holders = list(dict.fromkeys(node_label(owners[id(n)]) for n in inside))
    more = f" and {len(holders) - 3} more" if len(holders) > 3 else ""
    return f"{len(inside)} {ops} are inside the subgraphs of {', '.join(holders[:3])}{more}"


def refuse_control_flow_only(graph: ir.Graph, any_prunable: bool = True) -> None:
    """Raise the one-line refusal when nothing outside control flow can be pruned: no
    weighted node in the main graph (checked before any run, so a model whose branches
    need special inputs is refused without them), or no prunable group (``any_prunable``)."""
    inside = control_flow_summary(graph)
    outside = any(n.op_type in _WEIGHTED for n in graph)
    if inside and (not outside or not any_prunable):
        raise InputError(f"nothing outside control flow is prunable: {inside}, "
                         "which onnxprune does not rewrite; nothing was written")


def _build(model: ir.Model, ctx: _Context, exclude) -> Analysis:
    roots = ctx.uf.roots()
    n_prod = len(ctx.producer_nodes)
    gid = np.array([ctx.group_uf.find(i) for i in range(n_prod)], dtype=np.int64)
    owner = np.array(ctx.owner, dtype=np.int64)

    reasons: dict[int, list[str]] = {}
    for atoms, reason in ctx.blocks:
        for g in sorted({int(gid[owner[a]]) for a in atoms.tolist() if a != FIXED}):
            if reason not in reasons.setdefault(g, []):
                reasons[g].append(reason)

    producers: dict[int, list[ir.Node]] = {}
    for i, node in enumerate(ctx.producer_nodes):
        producers.setdefault(int(gid[i]), []).append(node)
    consumers: dict[int, list[ir.Node]] = {}
    for e in ctx.edits:
        if isinstance(e, SliceParam) and e.role == "weight_in":
            gs = {int(gid[owner[a]]) for a in e.atoms.tolist() if a != FIXED}
            for g in gs:
                if e.node not in consumers.setdefault(g, []):
                    consumers[g].append(e.node)

    # Channel classes of each group, ordered by first appearance among its atoms.
    atom_ids = np.arange(1, len(roots), dtype=np.int64)
    atom_group = gid[owner[atom_ids]]
    groups: list[Group] = []
    by_gid: dict[int, Group] = {}
    for new_id, g in enumerate(sorted(producers, key=lambda g: min(np.flatnonzero(gid == g)))):
        mine = roots[atom_ids[atom_group == g]]
        _, first = np.unique(mine, return_index=True)
        ordered = mine[np.sort(first)]
        removable = ordered[ordered != roots[FIXED]]
        group = Group(
            id=new_id,
            producers=producers[g],
            consumers=consumers.get(g, []),
            classes=removable,
            n_channels=int(len(ordered)),
            blocked=reasons.get(g, []),
        )
        if len(removable) < len(ordered) and len(removable) == 0:
            group.blocked.append("every channel is coupled to a tensor that cannot be pruned")
        names = [n.name or "" for n in group.producers] + [o.name or "" for n in group.producers for o in n.outputs]
        group.excluded = any(fnmatch.fnmatchcase(n, pat) for pat in exclude for n in names)
        groups.append(group)
        by_gid[g] = group
    _attach_chunks(ctx, roots, gid, owner, by_gid)
    return Analysis(model=model, groups=groups, edits=ctx.edits, roots=roots, layouts=ctx.layouts)


def _attach_chunks(ctx: _Context, roots: np.ndarray, gid: np.ndarray, owner: np.ndarray,
                   by_gid: dict[int, Group]) -> None:
    """Give every group the Split/Slice chunks its channels appear in (``Group.keep_any``).

    Every tensor that carries channels is a chunk too: a producer whose channels are all
    coupled into a larger group (Concat then Add, say) must keep at least one filter.
    """
    chunks = [lay.atoms for lay in ctx.layouts.values()]
    for e in ctx.edits:
        if isinstance(e, SplitSizes):
            chunks.extend(e.chunks)
        elif isinstance(e, SliceBounds):
            chunks.append(e.atoms[e.start : e.end])
    seen: set[tuple[int, ...]] = set()
    for chunk in chunks:
        classes = np.unique(roots[chunk])
        key = tuple(classes.tolist())
        # An empty chunk was empty already; one holding a fixed channel never empties.
        if not len(classes) or roots[FIXED] in classes or key in seen:
            continue
        seen.add(key)
        for g in sorted({int(gid[owner[a]]) for a in chunk.tolist()}):
            by_gid[g].keep_any.append(classes)
