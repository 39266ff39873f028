"""A calibration folder every Ray worker can read (``--ray`` with ``--calib FOLDER``): the
driver reads only headers and deals recipes; each worker reads its own batches.  Also: SIGTERM
during a Ray run (one line, exit 143, no process or file left).

The recipes (batch cuts, the held-out split, ``--max-samples``) rebuild exactly the
batches the driver would read (no Ray); on a real local runtime the prune selects and
writes what one process does while the workers read the files, a worker that cannot see
the folder's files makes the driver read them instead, and a bad file read by a worker is
one line and exit 2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import ray

from builders import save
from onnxprune.calibrate import split_held_out
from onnxprune.data import Preprocess, batches, source_items
from onnxprune.shared_data import LazyBatch, index_folder, lazy_batches, read
from test_ray import _api_prune, _same
from test_segments import MODELS, _batches

ROOT = Path(__file__).resolve().parent.parent


def _write_folder(folder: Path, data: list[dict[str, np.ndarray]]) -> Path:
    """The samples as files of uneven sizes: single samples (no batch axis) and batches of
    2 and 3 samples, as .npz, in name order."""
    folder.mkdir()
    rows = [{k: v[i] for k, v in b.items()} for b in data for i in range(next(iter(b.values())).shape[0])]
    k = i = 0
    while i < len(rows):
        size = (1, 3, 2)[k % 3]
        part = rows[i:i + size]
        arrays = {n: (part[0][n] if size == 1 else np.stack([r[n] for r in part])) for n in part[0]}
        np.savez(folder / f"{k:04}.npz", **arrays)
        i, k = i + len(part), k + 1
    return folder


def _specs(proto):
    import onnxruntime as ort

    from onnxprune.data import input_specs

    return input_specs(ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]))


@pytest.mark.parametrize("batch_size,max_samples,hold_out", [(2, None, 7), (4, 23, 0), (3, 31, 40)])
def test_recipes_rebuild_the_batches_the_driver_reads(tmp_path, batch_size, max_samples, hold_out):
    proto = MODELS["residual_concat"]()
    folder = _write_folder(tmp_path / "calib", _batches(proto, n=8, seed=1))  # 40 samples in 20 files
    specs = _specs(proto)
    index = index_folder(folder, specs, Preprocess())
    assert index.total == 40 and len(index.names) == 20
    held_want, held_got = [], []
    want = list(split_held_out(batches(source_items(str(folder), specs)(), specs, batch_size, max_samples),
                               hold_out, False, held_want))
    got = list(split_held_out(lazy_batches(index, batch_size, max_samples), hold_out, False, held_got))
    assert all(isinstance(b, LazyBatch) for b in got + held_got)
    for w, g in zip(want + held_want, got + held_got, strict=True):
        arrays = read(index, g)
        assert arrays.keys() == w.keys()
        for name in w:
            assert arrays[name].dtype == w[name].dtype
            np.testing.assert_array_equal(arrays[name], w[name])


@pytest.fixture(scope="module")
def runtime():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_workers_read_their_own_batches_and_write_what_one_process_does(tmp_path, runtime):
    proto = MODELS["residual_concat"]()
    path = save(proto, tmp_path / "m.onnx")
    folder = str(_write_folder(tmp_path / "calib", _batches(proto, n=20, seed=3)))  # 100 samples, 50 files
    one = _api_prune(path, folder)
    for workers in (1, 2):
        got = _api_prune(path, folder, ray="local", workers=workers)
        report = _api_prune.last.distributed
        assert report["calibration_data"] == f"read by the workers from {os.path.abspath(folder)}"
        assert "take" not in report["bytes_sent"]  # no array went through the object store
        assert report["bytes_sent"]["read"] < 2_000  # the recipes: sample positions
        _same(got, one, f"{workers} workers reading the folder")


def test_a_worker_that_cannot_see_the_files_leaves_the_reading_to_the_driver(tmp_path, runtime):
    from dataclasses import replace

    from onnxprune.distributed import RayPool

    proto = MODELS["residual_concat"]()
    folder = _write_folder(tmp_path / "calib", _batches(proto, n=2, seed=2))
    index = index_folder(folder, _specs(proto), Preprocess())
    pool = RayPool("local", 2)
    try:
        assert pool.use_folder(index) and pool.data_note.startswith("read by the workers")
        pool2 = RayPool("local", 2)
        try:
            missing = replace(index, names=index.names + ("9999.npz",), sizes=index.sizes + (10,))
            assert not pool2.use_folder(missing)
            assert pool2.folder is None
            assert pool2.data_note.startswith("read by the driver: worker 0 cannot read") and "9999.npz" in pool2.data_note
            changed = replace(index, sizes=(index.sizes[0] + 1,) + index.sizes[1:])
            assert not pool2.use_folder(changed) and "differ" in pool2.data_note
        finally:
            pool2.close()
    finally:
        pool.close()


def test_a_bad_file_read_by_a_worker_is_one_line_and_exit_2(tmp_path):
    proto = MODELS["residual_concat"]()
    path = save(proto, tmp_path / "m.onnx")
    folder = _write_folder(tmp_path / "calib", _batches(proto, n=8, seed=4))
    bad = folder / "0013.npz"
    with np.load(bad) as z:
        arrays = {k: z[k].copy() for k in z.files}
    first = next(iter(arrays))
    arrays[first].flat[0] = np.nan
    np.savez(bad, **arrays)
    tmp = Path(tempfile.mkdtemp(prefix="opr-", dir="/tmp"))  # Ray's socket paths: 107 bytes at most
    run = subprocess.run([sys.executable, "-m", "onnxprune", str(path), str(tmp_path / "o.onnx"), "--calib", str(folder),
                          "--ratio", "0.3", "-q", "--batch-size", "2", "--ray", "--workers", "2"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600, env=dict(os.environ, TMPDIR=str(tmp)))
    shutil.rmtree(tmp, ignore_errors=True)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2, run.stderr
    assert len(lines) == 1 and "0013.npz" in lines[0] and "NaN" in lines[0], run.stderr
    assert not (tmp_path / "o.onnx").exists()


def _processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains ``text`` (Linux /proc)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def _descendants(roots: set[int]) -> set[int]:
    """``roots`` and every process below them."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    out, grew = set(roots), True
    while grew:
        more = {p for p, pp in parent.items() if pp in out} - out
        out |= more
        grew = bool(more)
    return out


def _alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (zombies count as gone)."""
    alive = set()
    for p in pids:
        try:
            if (Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z":
                alive.add(p)
        except OSError:
            pass
    return alive


@pytest.mark.parametrize("delay", [1.0, 10.0])
def test_sigterm_during_a_ray_run_is_one_line_and_leaves_no_process_or_file(tmp_path, delay):
    """SIGTERM ``delay`` seconds after the local runtime's raylet appeared (on a loaded
    machine ray.init is still starting the node then: Ray's own handler stands; later the
    workers calibrate or refit): one line, exit 143, no output, the temp folder (Ray's
    session folder inside it) empty, and no process of that runtime left."""
    import signal
    import time

    out = tmp_path / "out"
    out.mkdir()
    tmp = Path(tempfile.mkdtemp(prefix="opr-", dir="/tmp"))
    try:
        proc = subprocess.Popen([sys.executable, "-m", "onnxprune", "models/mnist_cnn.onnx", str(out / "o.onnx"), "--calib",
                                 "models/data/calib", "--target-macs", "0.5", "-q", "--batch-size", "4", "--ray",
                                 "--workers", "2"], cwd=ROOT, env=dict(os.environ, TMPDIR=str(tmp)),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # Not a timing assert: wait for the runtime (its raylet runs with the session folder
        # under TMPDIR), however long that takes, then let the workers start calibrating.
        while proc.poll() is None and not [p for p in _processes_mentioning(str(tmp)) if p != proc.pid
                                           and "raylet" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]:
            time.sleep(0.05)
        time.sleep(delay)
        if proc.poll() is not None:
            pytest.skip("the prune ended before the signal")  # a fast machine: nothing to test at this delay
        runtime = _descendants(set(_processes_mentioning(str(tmp))) - {proc.pid})  # raylet, gcs, the workers
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
        lines = [line for line in err.splitlines() if line.strip()]
        if proc.returncode == 0:  # the signal came as the run exited, its work done: the output is whole
            assert lines == [] and [p.name for p in out.iterdir()] == ["o.onnx"], err
        else:
            assert proc.returncode == 143 and len(lines) == 1 and "terminated" in lines[0], err
            assert list(out.iterdir()) == []
        left = _alive(runtime)
        for _ in range(100):  # Ray's processes may take a moment to go after shutdown
            if not left:
                break
            time.sleep(0.1)
            left = _alive(runtime)
        assert left == set(), left
        assert list(tmp.iterdir()) == []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_batches_cut_from_one_many_sample_file_read_it_once(tmp_path):
    """A folder of one 40-sample .npz read in batches of 4 with the ``last`` cache: the
    file is gone after the first batch, and the other nine still come, equal to the
    driver's batches."""
    proto = MODELS["residual_concat"]()
    folder = tmp_path / "calib"
    folder.mkdir()
    parts = _batches(proto, n=8, seed=6)
    np.savez(folder / "all.npz", **{k: np.concatenate([b[k] for b in parts]) for k in parts[0]})
    specs = _specs(proto)
    index = index_folder(folder, specs, Preprocess())
    assert index.counts == (40,)
    want = list(batches(source_items(str(folder), specs)(), specs, 4))
    last: dict = {}
    got = []
    for k, recipe in enumerate(lazy_batches(index, 4)):
        got.append(read(index, recipe, last))
        if k == 0:
            (folder / "all.npz").unlink()
    assert len(got) == 10
    for w, g in zip(want, got, strict=True):
        for name in w:
            np.testing.assert_array_equal(g[name], w[name])


def test_the_clis_stop_handlers_are_in_force_after_its_ray_runtime_shuts_down(tmp_path):
    """``ray.shutdown()`` puts back the signal actions Ray's core worker found at its start:
    SIGTERM was then the default action at the OS level (a SIGTERM late in a Ray run, during
    verification or the save, killed the process with no line and left its temp folder),
    while ``signal.getsignal`` still named the handler.  The pool's close re-installs them.
    The probe sets both handlers itself: a suite started as a background job of a
    non-interactive shell hands its children SIGINT ignored, and Python then installs none."""
    probe = textwrap.dedent("""
        import signal
        from pathlib import Path
        from onnxprune.distributed import RayPool

        def caught(signum):
            status = Path("/proc/self/status").read_text()
            mask = next(int(l.split()[1], 16) for l in status.splitlines() if l.startswith("SigCgt:"))
            return bool(mask >> (signum - 1) & 1)

        signal.signal(signal.SIGTERM, lambda *a: None)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        pool = RayPool("local", 1)
        pool.close()
        print(caught(signal.SIGTERM), caught(signal.SIGINT))
    """)
    tmp = Path(tempfile.mkdtemp(prefix="opr-", dir="/tmp"))  # short: Ray's sockets live under it
    try:
        run = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                             timeout=600, env=dict(os.environ, TMPDIR=str(tmp)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["True", "True"], run.stdout


def test_padded_sequences_in_a_folder_are_read_by_the_driver_and_write_what_one_process_does(tmp_path, runtime):
    """Sorting a block's samples by length takes their arrays: with a mask input the driver
    reads the folder (no recipes), and the workers' result is one process's."""
    from test_padding import _join, _padded

    proto = MODELS["attention"]()
    path = save(proto, tmp_path / "m.onnx")
    folder = str(_write_folder(tmp_path / "calib", [_join(_padded(5, seed=k)) for k in range(20)]))  # 100 samples
    one = _api_prune(path, folder)
    assert _api_prune.last.calibration["padding_cut_by"] == "mask"
    got = _api_prune(path, folder, ray="local", workers=2)
    assert _api_prune.last.distributed["calibration_data"] == "read by the driver: its padded sequences are sorted by length"
    assert _api_prune.last.calibration["padding_cut_by"] == "mask"
    _same(got, one, "2 Ray workers, padded sequences")
