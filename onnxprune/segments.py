"""Run a graph piece by piece over cached tensors: the block-wise pass of SparseGPT, Wanda
and FLAP, for any ONNX graph.

A :class:`SegmentPass` holds, for every calibration batch, the tensors of one graph that are
still needed (its *frontier*), starting from the graph inputs.  ``advance(names)`` runs the
nodes that ``names`` depend on and that have not run yet, as one real sub-model (a
*segment*: its inputs are frontier tensors, its outputs the tensors still needed after it),
once per batch, and drops every cached tensor nothing later reads; ``stream(names)`` runs
them alike but hands ``names`` over batch by batch instead of caching them.  So every sample passes
through every node once, however many times the caller stops to look (the least-squares
refit stops once per wave of consumers; the allocation once per group).

A segment is built when it is needed, from the graph as it is then: a caller may rewrite
nodes that have not run yet (the refit writes a wave's new weights before the pass reaches
them).

The cache stays in memory up to ``budget`` bytes; past it, new tensors go to ``.npy``
files in a private temp folder, read back one batch at a time, and removed when the pass
closes (also on an exception or a signal that raises one).
"""

from __future__ import annotations

import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from . import _ort
from ._graph import inline_external
from .data import pins_more, samples_in
from .errors import InputError

Sample = dict[str, np.ndarray]


class _Spilled:
    """A batch written to disk: read back whole on each access, so the process holds one
    spilled batch at a time (a memory map would keep every page it touched resident)."""

    __slots__ = ("path", "nbytes")

    def __init__(self, path: Path, nbytes: int) -> None:
        self.path, self.nbytes = path, nbytes

    def load(self) -> np.ndarray:
        return np.load(self.path, allow_pickle=False)


class _FromSource:
    """A graph input's batch, read from the caller's batch sequence when indexed: a
    :class:`BatchStore` that spilled reads it back from disk, so holding every batch here
    would bring the whole spilled store back into memory, uncounted."""

    __slots__ = ("batches", "k", "name")

    def __init__(self, batches: Sequence[Sample], k: int, name: str) -> None:
        self.batches, self.k, self.name = batches, k, name

    def load(self) -> np.ndarray:
        return self.batches[self.k][self.name]


class Batches(list):
    """One tensor's batches, in order; a spilled batch is read from disk when indexed."""

    def __getitem__(self, k):  # type: ignore[override]
        item = super().__getitem__(k)
        return item.load() if isinstance(item, (_Spilled, _FromSource)) else item

    def __iter__(self):
        return (self[k] for k in range(len(self)))


class TensorCache:
    """Per-batch arrays by tensor name, in memory up to ``budget`` bytes, then spilled to
    ``.npy`` files in a private folder (created on first spill, removed at ``close``)."""

    def __init__(self, budget: int, prefix: str = "onnxprune-cache-") -> None:
        self.budget = budget
        self.prefix = prefix
        self.arrays: dict[str, Batches] = {}
        self.shared: set[str] = set()  # names whose arrays the caller owns: not counted
        self.in_memory = 0
        self.spilled = 0
        self.peak = 0
        self._folder: Path | None = None
        self._files = 0

    def put(self, name: str, batch: int, array: np.ndarray | _FromSource, shared: bool = False,
            arena: bool = False) -> None:
        """Store ``array`` as batch ``batch`` of ``name`` (batches arrive in order).
        ``shared``: the caller owns it (input batches, or where to read them): never spilled.
        ``arena``: an output of a session on the shared arena (:func:`_ort.in_shared_arena`),
        kept as it is."""
        rows = self.arrays.setdefault(name, Batches())
        assert len(rows) == batch, "batches arrive in order"
        item: np.ndarray | _Spilled | _FromSource = array
        if shared:
            self.shared.add(name)
        elif self.in_memory + array.nbytes > self.budget:
            item = self._spill(array)
            self.spilled += array.nbytes
        else:
            if pins_more(array) and not arena:
                # A view pins memory the budget does not see: the rest of the array it views,
                # or the arena of the session that made it, which stays whole while one output
                # of it is alive.  An output in the shared arena pins its own bytes only, and
                # a copy would fault fresh pages in for every batch (RESULTS "Cost").
                item = array.copy()
            self.in_memory += array.nbytes
        self.peak = max(self.peak, self.in_memory)
        rows.append(item)

    def _spill(self, array: np.ndarray) -> _Spilled:
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix=self.prefix))
            # Removed at close(), else when the cache is collected or the interpreter exits.
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._folder), True)
        self._files += 1
        path = self._folder / f"t{self._files}.npy"
        np.save(path, array, allow_pickle=False)
        return _Spilled(path, array.nbytes)

    def get(self, name: str) -> Batches:
        return self.arrays[name]

    def release(self, name: str, batch: int) -> None:
        """Forget one batch of ``name`` (nothing reads it again), so its bytes count no
        more: a segment frees its inputs batch by batch as its outputs arrive."""
        rows = self.arrays.get(name)
        if rows is None or name in self.shared:
            return
        self._forget(list.__getitem__(rows, batch))
        list.__setitem__(rows, batch, None)

    def _forget(self, item: np.ndarray | _Spilled | None) -> None:
        if isinstance(item, _Spilled):
            item.path.unlink(missing_ok=True)
        elif item is not None:
            self.in_memory -= item.nbytes

    def __contains__(self, name: str) -> bool:
        return name in self.arrays

    def drop(self, name: str) -> None:
        rows = self.arrays.pop(name, Batches())
        if name in self.shared:
            self.shared.discard(name)
            return
        for item in list.__iter__(rows):
            self._forget(item)

    def close(self) -> None:
        self.arrays.clear()
        self.in_memory = 0
        if self._folder is not None:
            self._cleanup()
            self._folder = None


def _subgraph_reads(node: ir.Node) -> list[ir.Value]:
    """Values of enclosing graphs that ``node``'s subgraphs (If/Loop/Scan bodies) read."""
    out: list[ir.Value] = []
    for attr in node.attributes.values():
        graphs = []
        if attr.type == ir.AttributeType.GRAPH:
            graphs = [attr.value]
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs = list(attr.value)
        for g in graphs:
            defined = {id(v) for v in g.inputs} | {id(v) for v in g.initializers.values()}
            for inner in g:
                defined.update(id(o) for o in inner.outputs)
            for inner in g:
                for v in list(inner.inputs) + _subgraph_reads(inner):
                    if v is not None and id(v) not in defined:
                        out.append(v)
    return out


def node_reads(node: ir.Node) -> list[ir.Value]:
    """Every value ``node`` reads: its inputs and what its subgraphs read from outside."""
    reads = [v for v in node.inputs if v is not None]
    if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
        reads += _subgraph_reads(node)
    return reads


def _is_const(value: ir.Value) -> bool:
    return value.producer() is None and value.const_value is not None and not value.is_graph_input()


def const_cone(graph: ir.Graph) -> set[int]:
    """Ids of the nodes whose outputs follow from constants alone (``Constant`` nodes, a
    ``Cast`` of a constant ...).  Sub-models include the ones they need rather than read
    their outputs as inputs: a Clip's bounds or a Pad's pads fed at run time stop
    onnxruntime from fusing and pre-packing, and a tail ran slower than the whole model."""
    cone: set[int] = set()
    for node in graph:
        if node.op_type.startswith("Random") or any(
                a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            continue
        if all(v is None or _is_const(v) or id(v.producer()) in cone for v in node.inputs):
            cone.add(id(node))
    return cone


def with_cone(graph: ir.Graph, nodes: Sequence[ir.Node], cone: set[int]) -> list[ir.Node]:
    """``nodes`` plus the constant-cone nodes (:func:`const_cone`) they read from, in graph order."""
    need = {id(n) for n in nodes}
    stack = [v for n in nodes for v in node_reads(n)]
    while stack:
        v = stack.pop()
        p = v.producer() if v is not None else None
        if p is not None and id(p) in cone and id(p) not in need:
            need.add(id(p))
            stack.extend(node_reads(p))
    return [n for n in graph if id(n) in need]


def _view_proto(model: ir.Model, inputs: Sequence[ir.Value], outputs: Sequence[ir.Value],
                nodes: Sequence[ir.Node], shared: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """The sub-model as a message.  With ``shared``, its large constants are left out of the
    message as external-data stubs and their arrays put in ``shared`` instead (see
    :func:`session_from_view`)."""
    consts: dict[int, ir.Value] = {}
    for n in nodes:
        for v in node_reads(n):
            if _is_const(v):
                consts[id(v)] = v
    initializers = list(consts.values())
    if shared is not None:
        initializers = [_stub(v, shared) for v in initializers]
    view = ir.GraphView(list(inputs), list(outputs), nodes=list(nodes), initializers=initializers,
                        opset_imports=dict(model.opset_imports), name="segment")
    proto = onnx.ModelProto()
    proto.ir_version = model.ir_version
    for domain, version in model.opset_imports.items():
        proto.opset_import.add(domain=domain, version=version)
    ir.serde.serialize_graph_into(proto.graph, view)
    for f in model.functions.values():
        ir.serde.serialize_function_into(proto.functions.add(), f)
    return inline_external(proto, [v for v in consts.values() if shared is None or v.name not in shared])


# Constants below this many bytes stay in the message: onnxruntime reads shape and index
# constants while it loads the model, before external initializers are put in place.
SHARED_MIN_BYTES = 1024
_SHAREABLE = {ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.INT64, ir.DataType.INT32,
              ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.BOOL}


def _stub(value: ir.Value, shared: dict[str, np.ndarray]) -> ir.Value:
    """``value`` itself, or, when it is large, a value of the same name, type and shape whose
    tensor is an external-data stub, its array put in ``shared``."""
    t = value.const_value
    if t.nbytes < SHARED_MIN_BYTES or t.dtype not in _SHAREABLE or isinstance(t, ir.StringTensor):
        return value
    shared[value.name] = np.ascontiguousarray(t.numpy())
    stub = ir.ExternalTensor("onnxprune-shared", 0, t.nbytes, t.dtype, shape=t.shape, name=value.name)
    return ir.Value(name=value.name, shape=value.shape, type=value.type, const_value=stub)


def view_bytes(model: ir.Model, inputs: Sequence[ir.Value], outputs: Sequence[ir.Value], nodes: Sequence[ir.Node]) -> bytes:
    """The sub-model of ``model`` made of ``nodes`` (in graph order), serialised (below
    protobuf's 2 GiB only)."""
    return _view_proto(model, inputs, outputs, nodes).SerializeToString()


def session_from_view(model: ir.Model, inputs: Sequence[ir.Value], outputs: Sequence[ir.Value],
                      nodes: Sequence[ir.Node], providers: list[str]):
    """An onnxruntime session for the sub-model of ``model`` made of ``nodes`` (in graph
    order), reading ``inputs`` and returning ``outputs``.  Its large constants go to
    onnxruntime as arrays, not inside the serialised message: they are neither copied into
    protobuf nor parsed back (most of the cost of building a segment or a probe tail), and
    no message nears protobuf's 2 GiB."""
    data, shared = view_message(model, inputs, outputs, nodes)
    return _ort.session(data, providers, initializers=shared)


def view_message(model: ir.Model, inputs: Sequence[ir.Value], outputs: Sequence[ir.Value],
                 nodes: Sequence[ir.Node]) -> tuple[bytes, dict[str, np.ndarray]]:
    """What :func:`session_from_view` gives onnxruntime: the serialised sub-model without
    its large constants, and those constants' arrays by name (``_ort.session``'s
    ``initializers``).  Built from the graph as it is now: the session may be created
    later, elsewhere (another thread), while the graph changes."""
    shared: dict[str, np.ndarray] = {}
    data = _view_proto(model, inputs, outputs, nodes, shared).SerializeToString()
    return data, shared


class SegmentPass:
    """One graph, run segment by segment over the same batches (see the module docstring).

    ``batches``: the input batches (kept by reference, never copied).  ``providers``: the
    onnxruntime execution providers.  ``budget``: bytes of computed tensors kept in memory
    before the cache spills to disk.
    """

    def __init__(self, model: ir.Model, batches: Sequence[Sample], *, providers: list[str], budget: int,
                 label: str = "graph") -> None:
        self.model = model
        self.graph = model.graph
        self.providers = providers
        self.label = label
        self.n_batches = len(batches)
        self.cache = TensorCache(budget)
        self.done: set[int] = set()  # ids of nodes already run
        self.cone = const_cone(self.graph)  # run inside every segment that reads them, never cached
        self.values = {v.name: v for v in self._all_values()}
        fed = set(batches[0]) if len(batches) else set()  # every batch feeds the same names
        for v in self.graph.inputs:
            if v.name in fed:
                for k in range(len(batches)):
                    self.cache.put(v.name, k, _FromSource(batches, k, v.name), shared=True)
        self.segments = 0  # sub-models run
        self.nodes_run = 0  # nodes in them (each node runs in one segment only)
        self.seconds = 0.0  # running segments, building their sessions included
        self.build_seconds = 0.0

    def _all_values(self) -> Iterable[ir.Value]:
        yield from self.graph.inputs
        for node in self.graph:
            yield from node.outputs

    def __enter__(self) -> "SegmentPass":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.cache.close()

    def value(self, name: str) -> ir.Value:
        v = self.values.get(name)
        if v is None:  # a node added since (the refit's bias Add)
            self.values = {v.name: v for v in self._all_values()}
            v = self.values[name]
        return v

    def _pending(self, targets: Iterable[ir.Value]) -> list[ir.Node]:
        """Nodes not run yet that ``targets`` depend on, in graph order."""
        need: set[int] = set()
        stack = [v for v in targets if v.name not in self.cache]
        asked = {id(v) for v in stack}
        seen: set[int] = set()
        while stack:
            v = stack.pop()
            if id(v) in seen:
                continue
            seen.add(id(v))
            node = v.producer()
            if node is None or id(node) in self.done or id(node) in need or (id(node) in self.cone and id(v) not in asked):
                continue
            need.add(id(node))
            stack.extend(r for r in node_reads(node) if r.name not in self.cache)
        return [n for n in self.graph if id(n) in need]

    def advance(self, names: Sequence[str], later: Sequence[str] = ()) -> dict[str, list[np.ndarray]]:
        """Compute the tensors ``names`` for every batch (running only what has not run) and
        return them, per name one array per batch.  ``later``: tensors a later call will
        ask for; everything else no pending node reads is dropped from the cache."""
        wanted = [self.value(n) for n in dict.fromkeys(names)]
        nodes = self._pending(wanted)
        if nodes:
            for _ in self._batches(nodes, wanted, later, stream=False):
                pass
        out = {n: self.cache.get(n) for n in dict.fromkeys(names)}
        self._release(set(names) | set(later))
        return out

    def stream(self, names: Sequence[str], later: Sequence[str] = (), rest: bool = True) -> Iterator[dict[str, np.ndarray]]:
        """As :meth:`advance`, but yields the tensors ``names`` batch by batch and caches
        only what ``later`` or a node still to run reads: the caller uses each batch's
        tensors and drops them (the refit folds a wave's inputs into its sums this way).
        ``rest=False``: no node runs after this, so only ``later`` is cached."""
        wanted = [self.value(n) for n in dict.fromkeys(names)]
        nodes = self._pending(wanted)
        ready = [n for n in dict.fromkeys(names) if n in self.cache]
        batches = self._batches(nodes, wanted, later, stream=True, rest=rest) if nodes else ({} for _ in range(self.n_batches))
        k = 0
        # Not enumerate(): its reused result tuple would hold the last batch while the next runs.
        for got in batches:
            got.update((n, self.cache.get(n)[k]) for n in ready)
            yield got
            got, k = None, k + 1  # before the next batch runs: one batch's tensors at a time
        self._release(set(later))

    def _batches(self, nodes: list[ir.Node], wanted: list[ir.Value], later: Sequence[str],
                 stream: bool, rest: bool = True) -> Iterator[dict[str, np.ndarray]]:
        """Run ``nodes`` as one segment over every batch, caching what later nodes (if
        ``rest``) or ``later`` read, and, unless ``stream``, the ``wanted`` tensors; yields
        per batch the ``wanted`` tensors it computed."""
        t0 = time.perf_counter()
        for n in nodes:
            self.done.add(id(n))
        nodes = with_cone(self.graph, nodes, self.cone)
        inside = {id(o) for n in nodes for o in n.outputs}
        inputs: dict[str, ir.Value] = {}
        for n in nodes:
            for v in node_reads(n):
                if id(v) not in inside and not _is_const(v):
                    if v.name not in self.cache:
                        raise InputError(f"segment pass: {v.name!r} is neither computed nor fed")
                    inputs[v.name] = v
        asked = {v.name for v in wanted}
        keep = self._live(set(later) | (set() if stream else asked)) if rest else set(later)
        outputs = [o for n in nodes for o in n.outputs
                   if o.name and (o.name in keep or o.name in asked) and (id(n) not in self.cone or o.name in asked)]
        t1 = time.perf_counter()
        sess = session_from_view(self.model, list(inputs.values()), outputs, nodes, self.providers)
        self.build_seconds += time.perf_counter() - t1
        names = [o.name for o in outputs]
        # Inputs nothing after this segment reads go batch by batch, before the batch's
        # outputs are stored: the next frontier then takes the old one's room in the budget
        # instead of spilling while the old one is still held.
        spent = [name for name in inputs if name not in keep and name not in asked]
        self.seconds += time.perf_counter() - t0
        for k in range(self.n_batches):
            t0 = time.perf_counter()
            feed = {name: self.cache.get(name)[k] for name in inputs}
            try:
                got = sess.run(names, feed)
            except Exception as exc:
                raise InputError(f"onnxruntime failed on a segment of the {self.label}: "
                                 f"{' '.join(str(exc).split())[:300]}") from exc
            for name in spent:
                self.cache.release(name, k)
            out = {}
            arena = _ort.in_shared_arena(self.providers)
            for name, arr in zip(names, got):
                if name in keep:
                    self.cache.put(name, k, arr, arena=arena)
                if stream and name in asked:
                    out[name] = arr
            del got, feed
            arr = None  # nothing of this batch is held here while the next one runs
            self.seconds += time.perf_counter() - t0
            yield out
            out = None
        self.segments += 1
        self.nodes_run += len(nodes)

    def _live(self, extra: set[str]) -> set[str]:
        """Names a node not run yet reads, plus ``extra``."""
        live = set(extra)
        for node in self.graph:
            if id(node) not in self.done:
                live.update(v.name for v in node_reads(node))
        return live

    def _release(self, keep: set[str]) -> None:
        live = self._live(keep)
        for name in [n for n in self.cache.arrays if n not in live]:
            self.cache.drop(name)


class BatchStore:
    """Input batches kept for replay (the refit and the allocation read the calibration
    batches again): in memory up to ``budget`` bytes, the rest on disk (read back a batch at a time).
    Read once from the source, whatever number of passes follow."""

    def __init__(self, budget: int) -> None:
        self.cache = TensorCache(budget, prefix="onnxprune-batches-")
        self.names: list[str] = []
        self.count = 0
        self.sizes: list[int] = []  # samples per batch
        self.rows: Any = None  # what calibration recorded of the original for the refit (reconstruct.RowsRecord)

    def append(self, batch: Sample) -> None:
        if not self.names:
            self.names = list(batch)
        for name in self.names:
            self.cache.put(name, self.count, batch[name])
        self.sizes.append(samples_in(batch))
        self.count += 1

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k: int) -> Sample:
        return {name: self.cache.get(name)[k] for name in self.names}

    def __iter__(self):
        return (self[k] for k in range(self.count))

    @property
    def samples(self) -> int:
        return sum(self.sizes)

    def close(self) -> None:
        self.cache.close()
        if self.rows is not None:
            self.rows.close()

    def __enter__(self) -> "BatchStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
