"""The worker that runs calibration's and the refit's passes one item ahead (_ahead.Ahead):
order, at most two items alive, errors at their item, and nothing running after the block."""

from __future__ import annotations

import threading
import time

import pytest

from onnxprune._ahead import Ahead


class Tracked:
    """An item that counts how many of its kind are alive."""

    alive = 0
    peak = 0
    lock = threading.Lock()

    def __init__(self, k: int) -> None:
        self.k = k
        with Tracked.lock:
            Tracked.alive += 1
            Tracked.peak = max(Tracked.peak, Tracked.alive)

    def __del__(self) -> None:
        with Tracked.lock:
            Tracked.alive -= 1


def test_items_come_in_order_and_the_iterator_runs_in_the_worker():
    threads = set()

    def items():
        for k in range(20):
            threads.add(threading.current_thread().name)
            yield k

    with Ahead(items(), name="test-ahead") as it:
        got = list(it)
    assert got == list(range(20))
    assert threads == {"test-ahead"}


def test_at_most_the_callers_item_and_one_made_ahead_are_alive():
    Tracked.alive = Tracked.peak = 0

    def items():
        for k in range(12):
            yield Tracked(k)

    seen = []
    with Ahead(items()) as it:
        for x in it:
            time.sleep(0.01)  # the worker has time to run as far ahead as it may
            seen.append(x.k)
            x = None
    assert seen == list(range(12))
    assert Tracked.peak == 2


def test_the_next_item_is_made_while_the_caller_uses_this_one():
    def items():
        for k in range(4):
            time.sleep(0.2)  # the "onnxruntime run"
            yield k

    t = time.perf_counter()
    with Ahead(items()) as it:
        for _ in it:
            time.sleep(0.2)  # the "fold"
    # Sequential: 1.6 s; overlapped: 0.2 + 4 × 0.2 = 1.0 s.  A loose bound: this is not a benchmark.
    assert time.perf_counter() - t < 1.45


def test_an_error_of_the_iterator_reaches_the_caller_at_its_item():
    def items():
        yield 1
        yield 2
        raise ValueError("bad batch")

    got = []
    with pytest.raises(ValueError, match="bad batch"):
        with Ahead(items()) as it:
            for x in it:
                got.append(x)
    assert got == [1, 2]


def test_leaving_early_stops_the_worker_and_runs_the_generators_finally_there():
    made, closed_in = [], []

    def items():
        try:
            for k in range(1000):
                made.append(k)
                yield k
        finally:
            closed_in.append(threading.current_thread().name)

    with Ahead(items(), name="test-ahead") as it:
        for x in it:
            if x == 3:
                break
    assert closed_in == ["test-ahead"]  # closed before the with block ended
    assert len(made) <= 6
    assert not any(t.name == "test-ahead" for t in threading.enumerate())


def test_an_error_of_the_caller_stops_the_worker_before_it_propagates():
    state = {"running": False}

    def items():
        for k in range(1000):
            state["running"] = True
            time.sleep(0.05)
            state["running"] = False
            yield k

    with pytest.raises(RuntimeError):
        with Ahead(items(), name="test-ahead") as it:
            for x in it:
                if x == 1:
                    raise RuntimeError("fold failed")
    assert not state["running"]
    assert not any(t.name == "test-ahead" for t in threading.enumerate())


def test_scipy_is_imported_during_calibration_in_a_thread_that_ends_with_it(tmp_path):
    """scipy's solvers (the probes' and the refit's) are imported while calibration runs, in
    a thread of their own, not on the main thread when the first solve needs them; the
    thread does not outlive the stage.  A fresh interpreter, so nothing imported scipy yet."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    script = textwrap.dedent(f"""
        import sys, threading
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        seen = []
        class Watch:
            def find_spec(self, name, path=None, target=None):
                if name == "scipy.linalg":
                    seen.append(threading.current_thread().name)
                return None
        sys.meta_path.insert(0, Watch())
        import numpy as np
        import onnxprune, onnxprune.stages as S
        from builders import save, small_cnn
        assert "scipy.linalg" not in sys.modules
        alive_after = []
        run = S.Calibrate.run
        def after(self, state):
            run(self, state)
            alive_after.extend(t.name for t in threading.enumerate() if t.name == "onnxprune-import")
        S.Calibrate.run = after
        path = save(small_cnn(), {str(tmp_path / 'm.onnx')!r})
        data = [{{"x": np.random.default_rng(i).standard_normal((4, 3, 8, 8)).astype(np.float32)}} for i in range(4)]
        onnxprune.prune(path, {str(tmp_path / 'o.onnx')!r}, method="wanda", calib=data, ratio=0.25)
        print(seen, alive_after)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['onnxprune-import'] []"
