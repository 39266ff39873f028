"""Calibration and the refit on a real local Ray runtime (no mock): 1, 2 and 4 workers
select and write what one process does (1e-6 relative) on a small CNN with a residual
stream and on an attention block; a worker killed (SIGKILL to its process) during the
calibration or the refit is rebuilt and the result is unchanged; a ``ray.data.Dataset``
calibrates like a list of the same samples; the CLI's ``--ray`` runs end to end and leaves
nothing in the temp folder, a cluster that cannot be reached is one line and exit 2, mipp is
refused, and the CLI's SIGTERM handler survives ``ray.init``."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import ray

import onnxprune.reconstruct as rc
from builders import save
from onnxprune.load import load_model
from test_segments import MODELS, _batches, _pruned, _weights

CPU = ["CPUExecutionProvider"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def runtime():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _refit(path, batches, **kw):
    original, _ = load_model(path)
    model, targets = _pruned(path)
    rc.refit_on_pruned(targets, original, model, batches, providers=CPU, memory_budget=1 << 28, block=1, **kw)
    return _weights(model), [(t.mode, t.shrink) for t in targets]


def _same(got, want, label):
    assert got[1] == want[1], label
    for k, w in got[0].items():
        np.testing.assert_allclose(w, want[0][k], rtol=1e-6, atol=1e-6 * float(np.abs(want[0][k]).max()), err_msg=f"{label}: {k}")


@pytest.mark.parametrize("name", ["residual_concat", "attention"])
def test_ray_workers_write_the_weights_of_one_process(tmp_path, runtime, name):
    proto = MODELS[name]()
    path = save(proto, tmp_path / "m.onnx")
    batches = _batches(proto, n=6, seed=7)
    one = _refit(path, batches)
    for shards in (2, 4):
        _same(_refit(path, batches, shards=shards, ray="local"), one, f"{shards} Ray workers")


def _shard_actor(k: int, tries: int):
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if f"-shard-{k}-try-{tries}" in a["name"]]
    return ray.get_actor(names[-1], namespace=next(a["namespace"] for a in ray.util.list_named_actors(all_namespaces=True)
                                                   if a["name"] == names[-1])) if names else None


def test_a_killed_worker_is_rebuilt_and_the_weights_do_not_change(tmp_path, runtime):
    proto = MODELS["residual_concat"]()
    path = save(proto, tmp_path / "m.onnx")
    batches = _batches(proto, n=6, seed=8)
    one = _refit(path, batches)
    seen = {}

    def kill_after_the_first_wave(done: int, total: int) -> None:
        assert total >= 2, "the test needs a wave after the kill"
        if done == 1:
            actor = _shard_actor(1, 0)
            seen["killed"] = ray.get(actor.pid.remote())
            os.kill(seen["killed"], signal.SIGKILL)
        if done == total:
            rebuilt = _shard_actor(1, 1)
            seen["rebuilt"] = rebuilt is not None and ray.get(rebuilt.pid.remote())

    got = _refit(path, batches, shards=2, ray="local", progress=kill_after_the_first_wave)
    assert seen["rebuilt"] and seen["rebuilt"] != seen["killed"]
    _same(got, one, "after a rebuilt worker")


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "onnxprune", *args], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, **(env or {})), timeout=600)


def test_cli_ray_prunes_the_shipped_cnn_like_one_process(tmp_path):
    base = ["models/mnist_cnn.onnx", "--calib", "models/data/calib", "--target-macs", "0.5", "-q", "--batch-size", "16"]
    plain = _cli(base[0], str(tmp_path / "plain.onnx"), *base[1:])
    assert plain.returncode == 0, plain.stderr
    # A short temp folder: Ray's sockets live in its session folder (AF_UNIX paths: 107 bytes).
    tmp = Path(tempfile.mkdtemp(prefix="opr-", dir="/tmp"))
    try:
        distributed = _cli(base[0], str(tmp_path / "ray.onnx"), *base[1:], "--ray", "--workers", "2",
                           env={"TMPDIR": str(tmp)})
        assert distributed.returncode == 0, distributed.stderr
        assert distributed.stderr.strip() == ""
        assert list(tmp.iterdir()) == []  # the local runtime's session folder went with the run's temp folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    same_weights(tmp_path / "ray.onnx", tmp_path / "plain.onnx")


def same_weights(got: Path, want: Path) -> None:
    """The two written models hold the same initializers, to 1e-6 relative."""
    wa, wb = _weights(load_model(want)[0]), _weights(load_model(got)[0])
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(wb[k], wa[k], rtol=1e-6, atol=1e-6 * float(np.abs(wa[k]).max()), err_msg=k)


def test_an_unreachable_cluster_is_one_line_and_exit_2(tmp_path):
    run = _cli("models/mnist_cnn.onnx", str(tmp_path / "o.onnx"), "--calib", "models/data/calib", "--ratio", "0.3",
               "-q", "--ray", "127.0.0.1:9")
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2, run.stderr
    assert len(lines) == 1 and "127.0.0.1:9" in lines[0], run.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_starting_ray_keeps_the_clis_sigterm_handler():
    """ray.init installs its own SIGTERM handler (sys.exit(15): no line, exit 15); the CLI's
    (one line, exit 143) must survive it.  In a fresh process: a real local runtime."""
    code = ("import signal; from onnxprune import _signals; from onnxprune.distributed import connect; "
            "_signals.install(); ray, _ = connect('local', 1); "
            "print(signal.getsignal(signal.SIGTERM) is _signals._handler); ray.shutdown()")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "True"


def _api_prune(path, data, **kw):
    from onnxprune.api import prune

    model, result = prune(path, None, calib=data, batch_size=2, method="wanda", target_macs=0.6, latency=False,
                          eval_samples=10, **kw)
    _api_prune.last = result
    return _weights(model), []


@pytest.mark.parametrize("name", ["residual_concat", "attention"])
def test_calibration_on_ray_workers_selects_and_writes_what_one_process_does(tmp_path, runtime, name):
    """The whole prune with the statistics gathered by 1, 2 and 4 workers (five blocks of
    eight batches dealt round-robin) against one process: the same channels (the weights'
    shapes) and the same weights."""
    proto = MODELS[name]()
    path = save(proto, tmp_path / "m.onnx")
    data = _batches(proto, n=20, seed=3)  # 100 samples: 80 calibrated on in 40 batches of 2, 20 held out
    one = _api_prune(path, data)
    for workers in (1, 2, 4):
        got = _api_prune(path, data, ray="local", workers=workers)
        waited = _api_prune.last.distributed["seconds_waited"]
        assert {"take", "statistics", "probe", "sums", "fold_errors"} <= set(waited), waited  # all of it on the workers
        assert {k: w.shape for k, w in got[0].items()} == {k: w.shape for k, w in one[0].items()}, f"{workers} workers"
        _same(got, one, f"{workers} workers")


def test_a_worker_killed_during_calibration_is_rebuilt_and_the_statistics_do_not_change(tmp_path, runtime):
    from onnxprune.calibrate import calibrate
    from onnxprune.compensate import lstsq_requests
    from onnxprune.consumers import consumer_views
    from onnxprune.distributed import RayPool
    from onnxprune.groups import analyze_groups

    proto = MODELS["residual_concat"]()
    model, _ = load_model(save(proto, tmp_path / "m.onnx"))
    analysis = analyze_groups(model, ())
    tensors = {v.tensor: (v.value, v.axis) for v in consumer_views(analysis)}
    batches = _batches(proto, n=40, seed=4)
    kw = dict(batch_size=5, providers=CPU, memory_budget=1 << 28, progress=False)
    want, _ = calibrate(model, tensors, iter(batches), requests=lstsq_requests(analysis), **kw)
    pool = RayPool("local", 2)
    seen = {}

    def killing():
        for k, b in enumerate(batches):
            if k == 20:  # worker 1 holds block 1 (batches 8-15) by now; block 3 is still to come
                seen["killed"] = ray.get(_shard_actor(1, 0).pid.remote())
                os.kill(seen["killed"], signal.SIGKILL)
            yield b

    try:
        got, _ = calibrate(model, tensors, killing(), requests=lstsq_requests(analysis), pool=pool, **kw)
        assert pool.tries == [0, 1]
    finally:
        pool.close()
    assert got.samples == want.samples == 200
    for name, w in want.tensors.items():
        np.testing.assert_allclose(got.tensors[name].sum, w.sum, rtol=1e-12, err_msg=name)
        np.testing.assert_allclose(got.tensors[name].sumsq, w.sumsq, rtol=1e-12, err_msg=name)
    assert list(got.extra) == list(want.extra)
    for key, g in want.extra.items():
        assert type(got.extra[key]) is type(g), key  # a merged PatchGram is still one
        for a, b in zip(got.extra[key].total(), g.total()):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-9, err_msg=key)


def test_mipp_is_refused_on_ray_in_one_line(tmp_path):
    run = _cli("models/mnist_cnn.onnx", str(tmp_path / "o.onnx"), "--calib", "models/data/calib", "--method", "mipp",
               "-q", "--ray")
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2 and len(lines) == 1 and "mipp" in lines[0], run.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_a_ray_dataset_calibrates_like_the_same_samples_in_a_list(tmp_path, runtime):
    proto = MODELS["residual_concat"]()
    path = save(proto, tmp_path / "m.onnx")
    data = _batches(proto, n=12, seed=5)
    rows = [{name: arr[i] for name, arr in b.items()} for b in data for i in range(next(iter(b.values())).shape[0])]
    dataset = ray.data.from_items(rows)
    _same(_api_prune(path, dataset, ray="local", workers=2), _api_prune(path, data), "a ray.data.Dataset")


def test_probes_on_ray_workers_measure_what_one_process_does(tmp_path, runtime):
    """The allocation's probe batches dealt to 2 workers: every group's measured damages
    equal the one-process ones (sums over the same batches)."""
    from onnxprune.allocate import _sites, _sites_by_group, _Tails
    from onnxprune.calibrate import calibrate
    from onnxprune.compensate import lstsq_requests
    from onnxprune.consumers import consumer_views
    from onnxprune.criteria import score_groups
    from onnxprune.distributed import RayPool
    from onnxprune.groups import analyze_groups
    from onnxprune.select import choose

    proto = MODELS["residual_concat"]()
    model, _ = load_model(save(proto, tmp_path / "m.onnx"))
    analysis = analyze_groups(model, ())
    views = consumer_views(analysis)
    stats, _ = calibrate(model, {v.tensor: (v.value, v.axis) for v in views}, iter(_batches(proto, n=8, seed=6)),
                         batch_size=5, providers=CPU, memory_budget=1 << 28, progress=False, keep=32,
                         requests=lstsq_requests(analysis))
    groups = [g for g in analysis.groups if g.prunable]
    sites_of = _sites_by_group(analysis, groups, _sites(analysis, views, stats, "lstsq"))
    scores = score_groups(analysis, "l1")
    removals = {g.id: [choose([g], scores, {g.id: k}, min_keep=1, round_to=1)[g.id] for k in (1, len(g.classes) // 2)]
                for g in groups if sites_of[g.id]}
    assert removals, "the test needs groups to probe"

    def measured(pool):
        tails = _Tails(analysis, stats.kept, CPU, 1 << 28, [sites_of[gid] for gid in removals], pool)
        try:
            return {gid: tails.damages_fn(sites_of[gid], analysis, "lstsq")(rs) for gid, rs in removals.items()}
        finally:
            tails.close()

    one = measured(None)
    pool = RayPool("local", 2)
    try:
        two = measured(pool)
    finally:
        pool.close()
    assert pool.summary()["probes"]["worker_busy_sum_s"] > 0  # the workers ran them
    for gid in one:
        np.testing.assert_allclose(two[gid], one[gid], rtol=1e-9, err_msg=str(gid))
        assert all(d > 0 for d in one[gid][1:])


def test_workers_left_without_batches_sit_out(tmp_path, runtime):
    """One block of batches (and 2 probe batches) for 4 workers: the idle ones take no
    part in the probes or the refit, and the result is the one process's."""
    proto = MODELS["residual_concat"]()
    path = save(proto, tmp_path / "m.onnx")
    data = _batches(proto, n=4, seed=9)  # 20 samples: 16 calibrated on in 8 batches of 2 (one block)
    _same(_api_prune(path, data, ray="local", workers=4), _api_prune(path, data), "4 workers, 1 block")
