"""The refit's shards on Ray actors (``--ray``): each actor holds a run of whole blocks of
the calibration batches and its own copies of the original and the pruned graph
(:class:`reconstruct.RefitShard`); per wave it returns its fold sums, the driver merges them,
solves, and sends the new weights back (:func:`reconstruct.refit_on_pruned`).  What
crosses the wire per wave is O(sums): the target's F×F and O×F fold sums and the solved
weights, never tensors of samples.

A worker that dies is rebuilt from the driver's current graphs (which hold every weight
solved so far) and replays the wave it was in, up to ``RETRIES`` times per shard; past that
the run fails with one line naming the shard.  Ray's own actor restarts are not used: they
re-run the constructor with the graphs of the start, before any wave was written.

Only the refit is distributed so far: calibration and the allocation's probes run on the
driver, which therefore still reads every sample (issue 18 lists what remains).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import uuid
from dataclasses import replace
from typing import Sequence

import onnx_ir as ir

from .data import Sample
from .errors import InputError, OnnxPruneError
from .reconstruct import RefitShard, RefitTarget, ShardSums, on_copies, target_positions

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
        if address == "local":
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
    except Exception as exc:  # ConnectionError, RuntimeError, ValueError ... depending on the failure
        where = "a local Ray runtime" if address == "local" else f"the Ray cluster at {address}"
        raise InputError(f"cannot start or reach {where}: {' '.join(str(exc).split())[:200]}") from None
    finally:
        if term is not None:
            signal.signal(signal.SIGTERM, term)
    return ray, True


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


class _Numbered:
    """A worker's batches under their global numbers (the first is number ``start``)."""

    def __init__(self, batches: list[Sample], start: int) -> None:
        self.batches, self.start = batches, start

    def __getitem__(self, b: int) -> Sample:
        return self.batches[b - self.start]


class _Worker:
    """The actor: one RefitShard on its own copies of the graphs (sent serialised)."""

    def __init__(self, specs: list[RefitTarget], positions: list[int], original: bytes, pruned: bytes,
                 batches: list[Sample], index: range, first_samples: list[int], providers: list[str], budget: int,
                 block: int) -> None:
        targets, o, p = on_copies(specs, positions, original, pruned)
        self.shard = RefitShard(targets, o, p, _Numbered(batches, index.start), index, first_samples,
                                providers=providers, budget=budget, private=True, block=block)

    def advance(self, wave: list[int], later: list[int]) -> list | None:
        return self.shard.advance(wave, later)

    def sums(self, wave: list[int], shifts: list) -> list[ShardSums]:
        return self.shard.sums(wave, shifts)

    def apply(self, writes: list) -> None:
        self.shard.apply(writes)

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        self.shard.close()


class RayShards:
    """The refit's shards as Ray actors, with the same calls as ``reconstruct.LocalShards``."""

    def __init__(self, address: str, targets: list[RefitTarget], original: ir.Model, pruned: ir.Model,
                 batches: Sequence[Sample], ranges: list[range], starts: Sequence[int], *, providers: list[str],
                 budget: int, block: int, workers: int | None = None) -> None:
        self.ray, self.started = connect(address, workers or len(ranges))
        self.pruned = pruned
        self.ranges, self.starts = ranges, starts
        self.positions = target_positions(targets, pruned)
        # The driver's nodes stay here: a spec is a target without its node (the worker's own copy supplies it).
        self.specs = [replace(t, node=None, _w32=None) for t in targets]
        self.original = self.ray.put(ir.to_proto(original).SerializeToString())
        self.batches = [self.ray.put([batches[b] for b in r]) for r in ranges]
        self.providers, self.budget, self.block = providers, budget // max(len(ranges), 1), block
        self.run = uuid.uuid4().hex[:8]
        self.tries = [0] * len(ranges)
        self.actors = [self._start(k) for k in range(len(ranges))]
        self._wave: tuple[list[int], list[int]] | None = None

    def _start(self, k: int):
        """Shard ``k``'s worker, from the driver's graphs as they are now."""
        # The driver's BLAS threading: the float32 products of the sums are summed in another
        # order with another thread count (Ray starts workers with OMP_NUM_THREADS=1), which
        # moved refitted weights by 3e-5 relative on the shipped CNN.
        threads = os.environ.get("OMP_NUM_THREADS") or str(os.cpu_count() or 1)
        actor = self.ray.remote(_Worker).options(name=f"onnxprune-{self.run}-shard-{k}-try-{self.tries[k]}",
                                                 runtime_env={"env_vars": {"OMP_NUM_THREADS": threads}})
        pruned = ir.to_proto(self.pruned).SerializeToString()
        r = self.ranges[k]
        return actor.remote(self.specs, self.positions, self.original, pruned, self.batches[k], r,
                            [int(self.starts[b]) for b in r], self.providers, self.budget, self.block)

    def _each(self, method: str, *args) -> list:
        """``method(*args)`` on every worker; a worker that died is rebuilt and catches up."""
        refs = [getattr(a, method).remote(*args) for a in self.actors]
        out = []
        for k, ref in enumerate(refs):
            while True:
                try:
                    out.append(self.ray.get(ref))
                    break
                except self.ray.exceptions.RayActorError as exc:
                    ref = self._rebuild(k, method, args, exc)
        return out

    def _rebuild(self, k: int, method: str, args: tuple, exc: Exception):
        self.tries[k] += 1
        r = self.ranges[k]
        if self.tries[k] > RETRIES:
            raise ShardError(f"shard {k} (batches {r.start}-{r.stop - 1}) lost its Ray worker {self.tries[k]} times: "
                             f"{' '.join(str(exc).split())[:160]}") from None
        self.actors[k] = self._start(k)
        if method == "apply":  # the rebuilt worker's graph already holds these weights
            return self.ray.put(None)
        if method == "sums" and self._wave is not None:
            self.ray.get(self.actors[k].advance.remote(*self._wave))
        return getattr(self.actors[k], method).remote(*args)

    def advance(self, wave: list[int], later: list[int]) -> list:
        self._wave = (wave, later)
        return self._each("advance", wave, later)

    def sums(self, wave: list[int], shifts: list) -> list[list[ShardSums]]:
        return self._each("sums", wave, shifts)

    def apply(self, writes: list) -> None:
        self._each("apply", writes)

    def close(self) -> None:
        for a in self.actors:
            try:
                self.ray.get(a.close.remote())
            except Exception:  # a dead worker has nothing left to close
                pass
            self.ray.kill(a)
        if self.started:  # its session folder lives in the run's temp folder: stop writing there before it goes
            self.ray.shutdown()
