"""One item computed ahead: an iterator run in a worker thread while the caller uses the
item before.

A prune alternates between onnxruntime, which does not keep every core busy on a small
graph, and numpy folds of its outputs, much of which run on one core.  Both release the GIL,
so the next batch's run overlaps this batch's fold.  On 2 cores that bought little, since the
prune keeps them mostly busy already (benchmarks/RESULTS.md, "Cost").  The caller sees the
items in their order, so every sum is taken in the same order and the output is
byte-identical.

At most two items are alive at once (the one in use and the one made ahead): a caller that
budgets memory per item budgets half of it for each.  The worker touches only what the
iterator touches; it stops at the next item once the caller leaves (an exception, a
signal's :class:`~onnxprune._signals.Interrupted`, a ``break``), and leaving waits for it
(a stop signal meanwhile is held till then), so nothing the iterator holds (a session, a
temp file) outlives the ``with`` block.
"""

from __future__ import annotations

import contextlib
import importlib
import queue
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

from ._signals import deferred

T = TypeVar("T")

_END = object()


class _Failed:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Ahead(Generic[T]):
    """``with Ahead(items) as it: for x in it: ...``: ``items`` iterated in a worker thread,
    one item ahead of the caller.  An exception the iterator raises is raised to the caller,
    at the item where it happened."""

    def __init__(self, items: Iterable[T], name: str = "onnxprune-ahead") -> None:
        self._items = items
        self._ready: queue.Queue = queue.Queue()
        self._slots = threading.Semaphore(2)  # the caller's item and the one made ahead
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._taken = False

    def __enter__(self) -> Ahead[T]:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def close(self) -> None:
        """Stop the worker at its next item and wait for it."""
        self._stop.set()
        self._slots.release()  # a worker waiting for a slot wakes and sees the stop
        if self._thread.ident is not None:
            # A stop signal during the wait would unwind the caller's temp folders while the
            # worker may still write into one: it is held until the worker is gone.
            with deferred():
                self._thread.join()

    def _work(self) -> None:
        it = iter(self._items)
        try:
            while True:
                self._slots.acquire()
                if self._stop.is_set():
                    return
                try:
                    item = next(it)
                except StopIteration:
                    self._ready.put(_END)
                    return
                self._ready.put(item)
                item = None
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            self._ready.put(_Failed(exc))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()  # a generator's finally clauses run here, in the thread that ran it

    def __iter__(self) -> Iterator[T]:
        while True:
            if self._taken:
                self._slots.release()  # the caller is done with the item before
            got = self._ready.get()
            self._taken = True
            if got is _END:
                return
            if isinstance(got, _Failed):
                raise got.exc
            yield got
            got = None


@contextlib.contextmanager
def imported_ahead(*names: str) -> Iterator[None]:
    """Import the modules ``names`` in a thread while the block runs: a later stage needs
    them (scipy's, for the solves) and would wait for the import on the main thread, while
    the block leaves a core idle at times.  The thread is joined when the block ends, so it
    never outlives it; a module that fails to import is left to its first real import."""
    missing = [n for n in names if n not in sys.modules]
    if not missing:
        yield
        return

    def work() -> None:
        for name in missing:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - raised again, in context, where it is used
                pass

    thread = threading.Thread(target=work, name="onnxprune-import", daemon=True)
    thread.start()
    try:
        yield
    finally:
        with deferred():  # as in Ahead.close
            thread.join()
