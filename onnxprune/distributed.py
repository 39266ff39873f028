"""Calibration and the refit on Ray actors (``--ray``).  Each actor (a worker) holds a
shard of the calibration batches from calibration to the end of the refit: whole blocks of
``calibrate.SHARD_BLOCK`` batches, dealt round-robin as the driver reads the source.  It
collects their statistics (:class:`calibrate.Collector`), which the driver merges, then
runs its part of the refit (:class:`reconstruct.RefitShard`): per wave it returns its fold
sums, the driver merges them, the workers compute the held-out errors that choose each
target's fit (one fold's at a time, :func:`reconstruct.fold_errors`: 4 folds × 5 fits of
solves, the bulk of the solving), the driver solves once with the choice and sends the new
weights back.  What crosses the
wire per block or wave is O(sums): the statistics, the fold sums, the solved weights.

The driver does not keep the batches.  With a calibration folder every worker can read
(:meth:`RayPool.use_folder` checks that each sees the driver's files), it sends recipes
(which samples of which files, :mod:`shared_data`) and the worker reads its blocks itself;
otherwise each block it read goes into Ray's object store (which spills to disk past its
memory) and the driver keeps only its reference.  Either way a worker that dies is rebuilt
and fed its blocks again.  A rebuilt worker repeats the calibration of its blocks
(during calibration) or starts its refit from the driver's current graphs, which hold every
weight solved so far (during the refit), up to ``RETRIES`` times per shard; past that the
run fails with one line naming the shard.  Ray's own actor restarts are not used: they
re-run the constructor with the arguments of the start.

The allocation's probes run on the workers too: the probe batches (cut into batches of
``allocate.PROBE_CHUNK`` samples, the same whatever the worker count) are dealt round-robin,
each worker runs the original over its own once (a segment pass) and, per group, the group's
tail (sent serialised) for every probed rung, returning one sum of squared errors per rung.
The driver keeps the held-out batches (verification, which it runs) and the probe samples
(to deal them), reading them from the folder itself when the workers read the rest.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from . import _signals, _spin
from ._graph import model_proto
from ._heap import release_freed_memory
from .calibrate import SHARD_BLOCK, CollectPlan, Collector, Statistics
from .data import Sample, samples_in
from .errors import InputError, OnnxPruneError
from .reconstruct import RefitShard, RefitTarget, ShardSums, fold_errors, on_copies, target_positions
from .shared_data import FolderIndex, LazyBatch, folder_sizes, read

RETRIES = 2  # rebuilds of one shard's worker before the run fails


class ShardError(OnnxPruneError):
    """A shard's worker died more often than RETRIES allows. Exit code 1."""


def connect(address: str, workers: int):
    """(the ray module, initialised; whether this call started it): a local runtime
    (``address == "local"``) with ``workers`` CPUs, or the cluster at ``address``; an
    initialised runtime is reused (and not shut down by onnxprune)."""
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray: pip install 'onnxprune[ray]'") from None
    if ray.is_initialized():
        return ray, False
    if address == "local" and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
    _reachable(address)
    # ray.init replaces the SIGTERM handler with sys.exit(15): the CLI's (one line, exit 143,
    # every temp folder removed) is put back.
    main = threading.current_thread() is threading.main_thread()
    term = signal.getsignal(signal.SIGTERM) if main else None
    try:
        _init(ray, address, workers, term)
    except Exception as exc:  # ConnectionError, RuntimeError, ValueError ... depending on the failure
        where = "a local Ray runtime" if address == "local" else f"the Ray cluster at {address}"
        hint = "" if address == "local" else " (a cluster with token authentication needs its token in RAY_AUTH_TOKEN)"
        raise InputError(f"cannot start or reach {where}: {' '.join(str(exc).split())[:200]}{hint}") from None
    return ray, True


def _init(ray, address: str, workers: int, term) -> None:
    """``ray.init``, then the SIGTERM handler ``term`` back in place.  If it fails or is
    stopped, what it started of a local runtime is stopped; a SIGTERM while Ray's own
    handler stood (``sys.exit(15)``) is the CLI's stop request, raised by its handler (one
    line, exit 143)."""
    before = set(_descendants(os.getpid())) if address == "local" else set()
    try:
        with _stderr_aside():
            if address == "local":
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
    except BaseException as exc:
        if address == "local":
            # ray.shutdown only knows a node whose start finished; the raylet, the GCS and
            # their agents of one cut short are this process's new children (an API
            # caller's own child processes were there before and are left alone).
            with contextlib.suppress(Exception):
                _shutdown(ray)
            _stop_children(before)
        if isinstance(exc, SystemExit) and exc.code == signal.SIGTERM and callable(term):
            signal.signal(signal.SIGTERM, term)
            term(signal.SIGTERM, None)
        raise
    finally:
        if term is not None:
            signal.signal(signal.SIGTERM, term)


def _shutdown(ray) -> None:
    """``ray.shutdown()``, then this process's SIGINT/SIGTERM handlers in force again: Ray's
    core worker puts back the actions it found at its start, so after a shutdown SIGTERM
    killed the process outright (no line, exit -15, the run's temp folder left) while
    ``signal.getsignal`` still named the CLI's handler."""
    ray.shutdown()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(sig)
            if handler is not None:  # None: set outside Python, nothing to put back
                signal.signal(sig, handler)


def _stop_children(keep: set[int], grace: float = 5.0) -> None:
    """SIGTERM to every process below this one but ``keep``, SIGKILL to those still there
    after ``grace`` seconds (Linux: read from /proc; elsewhere nothing is found)."""
    pids = [p for p in _descendants(os.getpid()) if p not in keep]
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + grace
    while pids and time.monotonic() < end:
        pids = [p for p in pids if _running(p)]
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _descendants(root: int) -> list[int]:
    parent: dict[int, int] = {}
    for d in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
    out, frontier = [], {root}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier}
        out += sorted(frontier)
    return out


def _running(pid: int) -> bool:
    """Alive and not a zombie (a child that exited is reaped only by its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@contextlib.contextmanager
def _stderr_aside():
    """File descriptor 2 into an anonymous file while Ray starts: its C++ core logs every
    failed connection attempt there (a wrong token: a line a second), and a failure is one
    line, ours."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a ``host:port`` (or ``ray://host:port``) nothing listens on: Ray itself
    keeps retrying for minutes."""
    if address in ("local", "auto"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"--ray takes host:port (or ray://host:port), got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise InputError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from None


class _Worker:
    """The actor: a shard of the calibration batches, by their number in the stream; the
    collect step over them; then a RefitShard on its own copies of the graphs."""

    def __init__(self) -> None:
        self.batches: dict[int, Sample] = {}
        self.first: dict[int, int] = {}  # each batch's first sample, numbered in the stream
        self.collector: Collector | None = None
        self.shard: RefitShard | None = None
        self.folder: FolderIndex | None = None  # the shared calibration folder, when this worker reads it
        self.last_file: dict = {}  # the last file it read (shared_data.read)
        self.busy: dict[str, float] = {}  # seconds of work per method, for the pool's summary

    def _timed(self, method: str, t0: float) -> None:
        self.busy[method] = self.busy.get(method, 0.0) + time.perf_counter() - t0

    def collect_start(self, model: bytes, plan: CollectPlan, providers: list[str]) -> None:
        self.collector = Collector(model, plan, providers)

    def take(self, numbers: list[int], firsts: list[int], batches: list[Sample], collect: bool) -> None:
        """Keep one block of batches; with ``collect``, fold its statistics in."""
        t0 = time.perf_counter()
        for b, f, x in zip(numbers, firsts, batches):
            self.batches[b], self.first[b] = x, f
            if collect:
                self.collector.collect(x, b)
        if collect:
            self.collector.block_end()
        self._timed("take", t0)

    def folder_sizes(self, folder: str, names: tuple[str, ...]) -> tuple[int, ...] | str:
        return folder_sizes(folder, names)

    def open_folder(self, index: FolderIndex) -> None:
        self.folder = index

    def read(self, numbers: list[int], firsts: list[int], batches: list[LazyBatch], collect: bool) -> None:
        """Read one block of batches from the shared folder, then as :meth:`take`."""
        t0 = time.perf_counter()
        arrays = [read(self.folder, b, self.last_file) for b in batches]
        self._timed("read", t0)
        self.take(numbers, firsts, arrays, collect)

    def statistics(self) -> Statistics:
        stats, self.collector = self.collector.result(), None
        return stats

    def refit_start(self, specs: list[RefitTarget], positions: list[int], original: bytes, pruned: bytes,
                    providers: list[str], budget: int, block: int) -> None:
        t0 = time.perf_counter()
        targets, o, p = on_copies(specs, positions, original, pruned)
        index = sorted(self.batches)
        self.shard = RefitShard(targets, o, p, self.batches, index, [self.first[b] for b in index],
                                providers=providers, budget=budget, private=True, block=block)
        self._timed("refit_start", t0)

    def shifts(self) -> list | None:
        return self.shard.shifts()

    def sums(self, wave: list[int], later: list[int], shifts: list) -> list[ShardSums]:
        t0 = time.perf_counter()
        try:
            return self.shard.sums(wave, later, shifts)
        finally:
            self._timed("sums", t0)

    def apply(self, writes: list) -> None:
        t0 = time.perf_counter()
        self.shard.apply(writes)
        self._timed("apply", t0)

    def timings(self) -> dict[str, float]:
        return dict(self.busy)

    def probe_start(self, model: bytes, chunks: list[Sample], providers: list[str], budget: int, cuts: list[str]) -> float:
        """Hold some of the allocation's probe batches, the original's tensors at the
        tails' ``cuts`` and its outputs on them; returns the outputs' summed squares."""
        from .allocate import ProbeFeeds  # the allocation's own pieces, on this worker's batches

        t0 = time.perf_counter()
        original = ir.from_proto(onnx.ModelProto.FromString(model))
        self.probe_pass = ProbeFeeds(original, chunks, providers, budget, cuts)
        self.y0 = self.probe_pass.y0
        self.probe_providers = providers
        self._timed("probe", t0)
        return self.probe_pass.scale

    def probe(self, frontier: list[str], tail: bytes, outputs: list[str], params: list[dict]) -> list[float]:
        """Σ‖y − y₀‖² over this worker's probe batches, per parameter set."""
        from .allocate import squared_errors

        t0 = time.perf_counter()
        cached = self.probe_pass.get(frontier)
        feeds = [{n: cached[n][b] for n in frontier} for b in range(len(self.y0))]
        try:
            return squared_errors(tail, self.probe_providers, outputs, self.y0, feeds, params)
        finally:
            self._timed("probe", t0)

    def probe_end(self) -> None:
        if getattr(self, "probe_pass", None) is not None:
            self.probe_pass.close()
            self.probe_pass = self.y0 = None
            release_freed_memory()  # the driver does it between stages; a worker here, its feeds gone

    def fold_errors(self, spec: RefitTarget, total: dict, folds: list[dict], grid: list) -> list[list[float]]:
        t0 = time.perf_counter()
        try:
            return fold_errors(spec, total, folds, grid)
        finally:
            self._timed("fold_errors", t0)

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        self.probe_end()
        if self.shard is not None:
            self.shard.close()


class RayPool:
    """The workers of one run, from calibration to the end of the refit.

    As ``calibrate(pool=)``'s sink (:meth:`collecting`, :meth:`collect`,
    :meth:`block_end`, :meth:`result`) it deals blocks of batches to the workers and
    merges their statistics; as ``refit_on_pruned``'s batches (``len``, ``sizes``,
    :meth:`refit`) it runs the refit's shards on the batches the workers hold."""

    IN_FLIGHT = 2  # blocks sent to one worker and not yet folded in, before the driver waits

    def __init__(self, address: str, workers: int, block: int = SHARD_BLOCK) -> None:
        self._before = set(_descendants(os.getpid()))  # a local runtime's processes are the new ones
        self.ray, self.started = connect(address, workers)
        self.block = block
        self.run = uuid.uuid4().hex[:8]
        self.tries = [0] * workers
        # Per worker, its blocks: (numbers, firsts, what to call with them: "take" with an
        # object-store reference, or "read" with the recipes of a shared folder's batches).
        self.blocks: list[list[tuple[list[int], list[int], str, object]]] = [[] for _ in range(workers)]
        self.folder: FolderIndex | None = None  # the workers read the calibration batches from it
        self.data_note = "read by the driver and dealt through Ray's object store"
        self.calls: list[list] = [[] for _ in range(workers)]
        self.sizes: list[int] = []  # samples per batch, by number
        self._pending: list[tuple[int, int, Sample]] = []
        self._collect: tuple | None = None  # collect_start's arguments while calibrating
        self._refit: tuple | None = None  # (specs, positions, original, pruned graph, providers, budget, block)
        self._probe: tuple | None = None  # probe_start's arguments (the batches per worker) while probing
        self.closed = False
        # For summary(): seconds the driver waited on workers and bytes each way, per call
        # kind; the workers' own busy seconds (fetched at close); phase boundaries.
        self.waited: dict[str, float] = {}
        self.sent: dict[str, int] = {}
        self.received: dict[str, int] = {}
        self.busy: list[dict[str, float]] = []
        self.marks: dict[str, float] = {}
        self.waves = 0
        self.actors = [self._start(k) for k in range(workers)]
        self.members = list(range(workers))  # the workers the current phase's calls go to

    def _start(self, k: int):
        # The driver's BLAS threading: the float32 products of the sums are summed in another
        # order with another thread count (Ray starts workers with OMP_NUM_THREADS=1), which
        # moves refitted weights measurably (benchmarks/RESULTS.md, "Design measurements").
        # The driver's OpenBLAS thread timeout, or the one a worker of ours should have (_spin).
        env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(os.cpu_count() or 1),
               **_spin.settle(dict(os.environ))}
        actor = self.ray.remote(_Worker).options(name=f"onnxprune-{self.run}-shard-{k}-try-{self.tries[k]}",
                                                 runtime_env={"env_vars": env})
        return actor.remote()

    # -- the batches ------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.sizes)

    def put(self, k: int, numbers: list[int], firsts: list[int], batches: list[Sample | LazyBatch], collect: bool) -> None:
        """Send one block to worker ``k``: arrays through the object store (the driver
        keeps the reference), recipes of a shared folder's batches as they are."""
        t0 = time.perf_counter()
        lazy = isinstance(batches[0], LazyBatch)
        payload = batches if lazy else self.ray.put(batches)
        self._count(self.waited, "put", time.perf_counter() - t0)
        self._count(self.sent, "read" if lazy else "take", _nbytes(batches))
        how = "read" if lazy else "take"
        self.blocks[k].append((numbers, firsts, how, payload))
        self.calls[k].append(getattr(self.actors[k], how).remote(numbers, firsts, payload, collect))
        while len(self.calls[k]) > self.IN_FLIGHT:
            self._settle(k, self.calls[k].pop(0))

    def _settle(self, k: int, ref) -> None:
        t0 = time.perf_counter()
        try:
            self._get(ref)
        except self.ray.exceptions.RayActorError as exc:
            self._restore(k, exc)  # the restored worker took every block again
        self._count(self.waited, "take", time.perf_counter() - t0)

    def _get(self, ref):
        """``ray.get``; a worker's own failure on the data (one line, exit 2) is raised as
        itself, without Ray's traceback around it."""
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, OnnxPruneError):
                raise exc.cause from None
            raise

    def use_folder(self, index: FolderIndex) -> bool:
        """Whether every worker sees the calibration folder as the driver does (the same
        files, the same sizes): then each reads its own batches from it (:meth:`put` gets
        recipes); else the driver reads and deals them, and :attr:`data_note` says why."""
        sizes = self._each("folder_sizes", index.folder, index.names)
        for k, got in enumerate(sizes):
            if got != index.sizes:
                why = got if isinstance(got, str) else "its files differ from the driver's"
                self.data_note = f"read by the driver: worker {k} cannot read {index.folder} ({why})"
                return False
        self.folder = index
        self.data_note = f"read by the workers from {index.folder}"
        self._each("open_folder", index)
        return True

    @staticmethod
    def _count(table: dict, key: str, amount: float) -> None:
        table[key] = table.get(key, 0) + amount

    # -- calibration --------------------------------------------------------------------
    def collecting(self, path: Path, plan: CollectPlan, providers: list[str]) -> "RayPool":
        """Start every worker's collect step on the instrumented graph at ``path``."""
        self.marks["calibrate"] = time.perf_counter()
        model = onnx.load(str(path)).SerializeToString()
        self._count(self.sent, "collect_start", len(model) * len(self.actors))
        self._collect = (self.ray.put(model), plan, providers)
        self._each("collect_start", *self._collect)
        return self

    def collect(self, batch: Sample, number: int) -> None:
        """Batch ``number`` of the stream: sent with its block at :meth:`block_end`."""
        self._pending.append((number, sum(self.sizes), batch))
        self.sizes.append(samples_in(batch))

    def block_end(self) -> None:
        if not self._pending:
            return
        numbers, firsts, batches = (list(t) for t in zip(*self._pending))
        self._pending = []
        self.put((numbers[0] // self.block) % len(self.actors), numbers, firsts, batches, collect=True)

    def result(self) -> Statistics:
        """Every worker's statistics, merged in worker order (float64 sums)."""
        self.block_end()
        for k in range(len(self.actors)):
            while self.calls[k]:
                self._settle(k, self.calls[k].pop(0))
        parts = self._each("statistics")
        self._count(self.received, "statistics", sum(_nbytes(p) for p in parts))
        self._collect = None
        self.marks["calibrated"] = time.perf_counter()
        stats = parts[0]
        for p in parts[1:]:
            stats = stats.merge(p)
        return stats

    # -- the allocation's probes -------------------------------------------------------
    def probe_start(self, model: bytes, chunks: list[Sample], providers: list[str], budget: int, cuts: list[str]) -> float:
        """Deal the probe batches round-robin (a worker without one gets none), each worker
        computing the original's tensors at ``cuts`` on its own; returns the summed squares
        of the original's outputs on them."""
        self.marks["probes"] = time.perf_counter()
        ref = self.ray.put(model)
        mine = [chunks[k :: len(self.actors)] for k in range(len(self.actors))]
        self._probe = (ref, mine, providers, budget // max(len(self.actors), 1), cuts)
        self.members = [k for k in range(len(self.actors)) if mine[k]]  # fewer batches than workers: the rest wait
        self._count(self.sent, "probe_start", len(model) * len(self.actors) + _nbytes(chunks))
        return sum(self._each_own("probe_start", lambda k: (ref, mine[k], providers, self._probe[3], cuts)))

    def probe(self, frontier: list[str], tail: bytes, outputs: list[str], params: list[dict]) -> list[float]:
        """Per parameter set, Σ‖y − y₀‖² over all probe batches (the workers' sums added)."""
        self._count(self.sent, "probe", (len(tail) + _nbytes(params)) * len(self.members))
        parts = self._each("probe", frontier, tail, outputs, params)
        return [sum(p[i] for p in parts) for i in range(len(params))]

    def probe_end(self) -> None:
        self._each("probe_end")
        self._probe = None
        self.members = list(range(len(self.actors)))
        self.marks["probed"] = time.perf_counter()

    # -- the refit ----------------------------------------------------------------------
    def refit(self, targets: list[RefitTarget], original: ir.Model, pruned: ir.Model, *, providers: list[str],
              budget: int, block: int) -> "RayPool":
        """Start every worker's refit shard; returns the pool, with ``LocalShards``'s calls."""
        # The driver's nodes stay here: a spec is a target without its node (the worker's own copy supplies it).
        self.marks["refit"] = time.perf_counter()
        specs = [replace(t, node=None, _w32=None) for t in targets]
        original_ref = self.ray.put(model_proto(original).SerializeToString())
        self.members = [k for k in range(len(self.actors)) if self.blocks[k]]  # a worker without batches has no shard
        self._refit = (specs, target_positions(targets, pruned), original_ref, pruned, providers,
                       budget // max(len(self.members), 1), block)
        self._each("refit_start", *self._refit_args())
        return self

    def _refit_args(self) -> tuple:
        specs, positions, original, pruned, providers, budget, block = self._refit
        # Serialised now: a rebuilt worker starts from the weights solved so far.
        proto = model_proto(pruned).SerializeToString()
        self._count(self.sent, "refit_start", len(proto))
        return specs, positions, original, proto, providers, budget, block

    def shifts(self) -> list:
        return self._each("shifts")

    def sums(self, wave: list[int], later: list[int], shifts: list) -> list[list[ShardSums]]:
        self.waves += 1
        self._count(self.sent, "sums", _nbytes(shifts) * len(self.members))
        parts = self._each("sums", wave, later, shifts)
        self._count(self.received, "sums", _nbytes(parts))
        self.marks["summed"] = time.perf_counter()
        self.marks["fold_wait"] = self.waited.get("fold_errors", 0.0)
        return parts

    def fold_errors(self, target: RefitTarget, total: dict, folds: list[dict], grid: list) -> list[list[float]]:
        """``reconstruct.fold_errors`` with the folds dealt round-robin to the workers (each
        fold's errors are returned, and added in fold order by the caller)."""
        spec = replace(target, node=None, _w32=None, sums=[], _pending=[])
        total_ref = self.ray.put(total)
        mine = {k: folds[j :: len(self.members)] for j, k in enumerate(self.members)}
        self._count(self.sent, "fold_errors", (_nbytes(total) + _nbytes(spec)) * len(self.members) + _nbytes(folds))
        parts = dict(zip(self.members, self._each_own("fold_errors", lambda k: (spec, total_ref, mine[k], grid))))
        order = {k: iter(parts[k]) for k in self.members}
        return [next(order[self.members[j % len(self.members)]]) for j in range(len(folds))]

    def apply(self, writes: list) -> None:
        # Between the sums and this call the driver merged and solved (waiting on the fold
        # errors aside): its serial part.
        gap = time.perf_counter() - self.marks.pop("summed", time.perf_counter())
        self._count(self.waited, "driver merge+solve", gap - (self.waited.get("fold_errors", 0.0) - self.marks.pop("fold_wait", 0.0)))
        self._count(self.sent, "apply", _nbytes(writes) * len(self.members))
        self._each("apply", writes)

    # -- failures -------------------------------------------------------------------------
    # Calls whose result the caller needs: repeated on a rebuilt worker.  The rest are
    # repeated by the rebuild itself (_restore brings a worker to its predecessor's state).
    REPEATED = ("statistics", "shifts", "sums", "probe", "probe_start", "fold_errors")

    def _each(self, method: str, *args) -> list:
        """``method(*args)`` on every worker of the phase."""
        return self._each_own(method, lambda k: args)

    def _each_own(self, method: str, args_of: Callable[[int], tuple]) -> list:
        """``method(*args_of(k))`` on every worker k of the phase; a worker that died is
        rebuilt and catches up."""
        t0 = time.perf_counter()
        refs = [getattr(self.actors[k], method).remote(*args_of(k)) for k in self.members]
        out = []
        for k, ref in zip(self.members, refs):
            while True:
                try:
                    out.append(self._get(ref))
                    break
                except self.ray.exceptions.RayActorError as exc:
                    self._restore(k, exc, during=method)
                    ref = getattr(self.actors[k], method).remote(*args_of(k)) if method in self.REPEATED \
                        else self.ray.put(None)
        self._count(self.waited, method, time.perf_counter() - t0)
        return out

    def _restore(self, k: int, exc: Exception, during: str = "") -> None:
        """A new worker ``k`` in the state its predecessor had before the failed call
        (``during``, when that call is repeated by the caller)."""
        self.tries[k] += 1
        numbers = sorted(b for ns, _, _, _ in self.blocks[k] for b in ns)
        if self.tries[k] > RETRIES:
            held = f"batches {numbers[0]}-{numbers[-1]}" if numbers else "no batches"
            raise ShardError(f"shard {k} ({held}) lost its Ray worker {self.tries[k]} times: "
                             f"{' '.join(str(exc).split())[:160]}") from None
        a = self.actors[k] = self._start(k)
        if self.folder is not None:
            a.open_folder.remote(self.folder)
        if self._collect is not None:
            a.collect_start.remote(*self._collect)
        # Actor calls from one caller run in order: no waiting between them.
        self.calls[k] = []
        for ns, fs, how, payload in self.blocks[k]:
            getattr(a, how).remote(ns, fs, payload, self._collect is not None)
        if self._probe is not None and during != "probe_start":  # else the caller repeats that call itself
            ref, mine, providers, budget, cuts = self._probe
            a.probe_start.remote(ref, mine[k], providers, budget, cuts)
        if self._refit is not None and k in self.members:
            a.refit_start.remote(*self._refit_args())

    def close(self) -> None:
        """Stop the workers (and a runtime this pool started); safe to call again."""
        if self.closed:
            return
        self.closed = True
        self.marks["closed"] = time.perf_counter()
        try:  # a stop request in here (the end of a run) must not skip the shutdown below
            for a in self.actors:
                try:
                    self.busy.append(self.ray.get(a.timings.remote()))
                    self.ray.get(a.close.remote())
                except Exception:  # a dead worker has nothing left to close
                    pass
                self.ray.kill(a)
        finally:
            self.blocks = [[] for _ in self.actors]
            if self.started:  # its session folder lives in the run's temp folder: stop writing there before it goes
                with _signals.deferred():
                    _shutdown(self.ray)
                    # ray.shutdown returns while the raylet, the GCS and their agents still
                    # exit and write their logs: a folder removed then can be refilled behind rmtree.
                    _stop_children(self._before)


    def summary(self) -> dict:
        """Where the distributed run's time and bytes went: per phase, its wall time, the
        seconds the driver waited on the workers, the driver's own serial work (reading and
        dealing the data; merging and solving), the workers' busy seconds (sum and max over
        workers), and the bytes sent each way (``--report``, ``benchmarks/shards.py``)."""
        m = self.marks
        busy = lambda *keys: [sum(b.get(k, 0.0) for k in keys) for b in self.busy] or [0.0]  # noqa: E731
        out: dict = {"workers": len(self.actors), "rebuilt": sum(self.tries), "waves": self.waves,
                     "calibration_data": self.data_note,
                     "seconds_waited": {k: round(v, 4) for k, v in self.waited.items()},
                     "bytes_sent": dict(self.sent), "bytes_received": dict(self.received)}
        if "calibrated" in m:
            wall = m["calibrated"] - m["calibrate"]
            waited = sum(self.waited.get(k, 0.0) for k in ("collect_start", "take", "statistics", "put"))
            work = busy("read", "take")
            out["calibrate"] = {"wall_s": round(wall, 4), "driver_read_s": round(wall - waited, 4),
                                "driver_put_s": round(self.waited.get("put", 0.0), 4),
                                "worker_busy_sum_s": round(sum(work), 4), "worker_busy_max_s": round(max(work), 4)}
        if "probed" in m:
            work = busy("probe")
            out["probes"] = {"wall_s": round(m["probed"] - m["probes"], 4),
                             "worker_busy_sum_s": round(sum(work), 4), "worker_busy_max_s": round(max(work), 4)}
        if "refit" in m:
            wall = m.get("closed", time.perf_counter()) - m["refit"]
            work = busy("refit_start", "sums", "apply", "fold_errors")
            out["refit"] = {"wall_s": round(wall, 4), "driver_merge_solve_s": round(self.waited.get("driver merge+solve", 0.0), 4),
                            "worker_busy_sum_s": round(sum(work), 4), "worker_busy_max_s": round(max(work), 4)}
        return out


def _nbytes(obj) -> int:
    """Array bytes inside ``obj`` (dicts, lists, tuples, objects' attributes): what a call carries."""
    seen: set[int] = set()

    def walk(x) -> int:
        if id(x) in seen:
            return 0
        seen.add(id(x))
        if isinstance(x, np.ndarray):
            return x.nbytes
        if isinstance(x, dict):
            return sum(walk(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(walk(v) for v in x)
        if hasattr(x, "__dict__"):
            return walk(vars(x))
        return 0

    return walk(obj)


def ray_shards(address: str, targets: list[RefitTarget], original: ir.Model, pruned: ir.Model,
               batches: Sequence[Sample], ranges: list[range], starts: Sequence[int], *, providers: list[str],
               budget: int, block: int) -> RayPool:
    """The refit's shards on a new pool, one worker per range of batches (held by the caller)."""
    pool = RayPool(address, len(ranges), block)
    try:
        for k, r in enumerate(ranges):
            for lo in range(r.start, r.stop, block):
                numbers = list(range(lo, min(lo + block, r.stop)))
                pool.put(k, numbers, [int(starts[b]) for b in numbers], [batches[b] for b in numbers], collect=False)
        return pool.refit(targets, original, pruned, providers=providers, budget=budget, block=block)
    except BaseException:
        pool.close()
        raise
