"""The prune as explicit stages: a frozen configuration checked once, a state the stages
pass along, one timer in the driver, and the CLI building the same configuration as the API."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import onnxprune
from builders import G, random_batches, small_cnn, save
from onnxprune import api, stages
from onnxprune.cli import main
from onnxprune.config import PruneConfig
from onnxprune.data import Preprocess
from onnxprune.methods import MethodOptions


def _net():
    return small_cnn()


def _data(n=3):
    return random_batches(n)


def test_config_is_frozen_and_normalised():
    config = PruneConfig(exclude="c1*")
    assert config.exclude == ("c1*",)  # a lone string is one pattern
    assert PruneConfig(exclude=["a", "b"]).exclude == ("a", "b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.ratio = 0.9  # type: ignore[misc]


@pytest.mark.parametrize("options, needle", [
    (dict(ratio=1.0), "--ratio must be in [0, 1), got 1"),
    (dict(method="nope"), "--method must be one of"),
    (dict(method="wanda"), "give calibration data with --calib"),
    (dict(target_macs=0.5, target_params=0.5), "give --target-macs or --target-params, not both"),
    (dict(steps=0), "--steps must be at least 1, got 0"),
    (dict(max_error=float("nan"), calib=[]), "--max-error must be a finite number"),
    (dict(preprocess=Preprocess(std=(0.0,))), "--std divides the pixels"),
    (dict(method_options=MethodOptions(alpha_fc=1.5)), "--alpha-fc must be in (0, 1]"),
    (dict(exclude=[3]), "--exclude patterns must be strings"),
])
def test_bad_option_fails_at_construction(options, needle):
    with pytest.raises(onnxprune.InputError) as err:
        PruneConfig(**options)
    assert needle in str(err.value)


def test_replace_checks_the_variant():
    config = PruneConfig(calib=[], target_macs=0.5)
    assert dataclasses.replace(config, target_macs=0.25).target == 0.25
    with pytest.raises(onnxprune.InputError, match="not both"):
        dataclasses.replace(config, target_params=0.5)
    with pytest.raises(onnxprune.InputError, match="--ratio"):
        dataclasses.replace(config, ratio=-0.1)


def test_config_checked_once_per_prune(tmp_path, monkeypatch):
    src = save(_net(), tmp_path / "m.onnx")
    calls = []
    real = PruneConfig.__post_init__
    monkeypatch.setattr(PruneConfig, "__post_init__", lambda self: (calls.append(1), real(self))[1])
    onnxprune.prune(src, None, ratio=0.5, latency=False)
    assert len(calls) == 1


def test_driver_runs_the_stages_in_order_and_times_each(tmp_path):
    src = save(_net(), tmp_path / "m.onnx")
    order = []

    class Watch(stages.Stage):
        def __init__(self, inner):
            self.inner, self.name = inner, inner.name

        def wanted(self, state):
            return self.inner.wanted(state)

        def run(self, state):
            order.append(self.name)
            self.inner.run(state)

    config = PruneConfig(method="wanda", calib=_data(), latency=False, eval_samples=8)
    state = api.run_stages(stages.PruneState(src, tmp_path / "o.onnx", config), [Watch(s) for s in stages.PIPELINE])
    names = ["load", "groups", "calibrate", "score", "select", "rewrite", "compensate", "verify"]
    assert order == names + ["report"]
    assert list(state.times) == names + ["report"] and all(t >= 0 for t in state.times.values())
    assert list(state.result.seconds) == names  # the report's own time is not in it
    assert (tmp_path / "o.onnx").exists() and state.result.params_after < state.result.params_before


def test_the_gram_sums_are_let_go_once_the_first_refit_used_them(tmp_path):
    """Nothing after the rewrite reads the lstsq Gram sums, so the refit does not hold them
    (on BERT-base they were the largest statistics); an error curve's points keep them."""
    from onnxprune.calibrate import GramKey

    src = save(_net(), tmp_path / "m.onnx")
    config = PruneConfig(method="wanda", calib=_data(), latency=False, eval_samples=8, target_macs=0.6)
    seen = {}

    class Rewrite(stages.Rewrite):
        def run(self, state):
            seen["before"] = sum(isinstance(k, GramKey) for k in state.stats.extra)
            super().run(state)

    pipeline = [Rewrite() if isinstance(s, stages.Rewrite) else s for s in stages.PIPELINE]
    state = api.run_stages(stages.PruneState(src, tmp_path / "o.onnx", config), pipeline)
    assert seen["before"] > 0
    assert not any(isinstance(k, GramKey) for k in state.stats.extra)
    kept = api.run_stages(stages.PruneState(src, tmp_path / "p.onnx", config, keep_for_sweep=True), pipeline)
    assert sum(isinstance(k, GramKey) for k in kept.stats.extra) == seen["before"]


def test_calibrate_stage_runs_only_with_data(tmp_path):
    src = save(_net(), tmp_path / "m.onnx")
    _, result = onnxprune.prune(src, None, ratio=0.5, latency=False)
    assert "calibrate" not in result.seconds
    assert list(result.seconds) == ["load", "groups", "score", "select", "rewrite", "compensate", "verify"]


def test_method_options_of_the_caller_are_not_changed(tmp_path):
    src = save(_net(), tmp_path / "m.onnx")
    knobs = MethodOptions()
    onnxprune.prune(src, None, method="l1", ratio=0.5, min_keep=3, seed=7, method_options=knobs, latency=False)
    assert (knobs.min_keep, knobs.seed) == (1, 0)


class _Stop(BaseException):
    """Ends the CLI run where it would start pruning (a BaseException: main() reports Exceptions)."""


def _stop_with(seen: list):
    def prune_with(config, *args, **kwargs):
        seen.append(config)
        raise _Stop

    return prune_with


def test_cli_builds_the_same_config_as_the_api(tmp_path, monkeypatch):
    src, out = save(_net(), tmp_path / "m.onnx"), tmp_path / "o.onnx"
    calib = tmp_path / "calib"
    calib.mkdir()
    np.save(calib / "a.npy", _data(1)[0]["x"])
    seen = []
    monkeypatch.setattr(api, "prune_with", _stop_with(seen))
    args = [str(src), str(out), "--method", "flap", "--target-macs", "0.6", "--global", "--min-keep", "2",
            "--round-to", "4", "--exclude", "c1*", "--exclude", "fc", "--calib", str(calib), "--max-samples", "5",
            "--batch-size", "2", "--memory-budget", "64", "--device", "cpu", "--compensate", "bias",
            "--alpha-fc", "0.5", "--z", "2", "--tau", "0.1", "--confidence", "0.9", "--mi-estimator", "mlp",
            "--granularity", "connection", "--resize", "10", "--crop", "8", "--mean", "0.5,0.4,0.3",
            "--std", "0.2", "--scale", "1", "--layout", "NHWC", "--channels", "BGR", "--max-error", "0.5",
            "--force", "--seed", "3", "--steps", "2", "-q"]
    with pytest.raises(_Stop):
        main(args)
    want = PruneConfig(
        method="flap", target_macs=0.6, global_=True, min_keep=2, round_to=4, exclude=["c1*", "fc"], calib=str(calib),
        max_samples=5, batch_size=2, memory_budget_mb=64.0, device="cpu", compensate="bias", max_error=0.5,
        force=True, seed=3, steps=2, progress=False,
        preprocess=Preprocess(resize=10, crop=8, mean=(0.5, 0.4, 0.3), std=(0.2,), scale=1.0, layout="NHWC", channels="BGR"),
        method_options=MethodOptions(alpha_fc=0.5, z=2.0, tau=0.1, confidence=0.9, mi_estimator="mlp", granularity="connection"),
    )
    assert seen == [want]


def test_cli_defaults_are_the_api_defaults(tmp_path, monkeypatch):
    src, out = save(_net(), tmp_path / "m.onnx"), tmp_path / "o.onnx"
    seen = []
    monkeypatch.setattr(api, "prune_with", _stop_with(seen))
    with pytest.raises(_Stop):
        main([str(src), str(out)])
    # The CLI shows progress unless -q and always passes its (default) image options and knobs.
    assert seen == [PruneConfig(progress=True, preprocess=Preprocess(), method_options=MethodOptions())]


class _OnceReader:
    """A CalibrationDataReader without rewind(): it can be read once."""

    def __init__(self, batches):
        self.it = iter(batches)

    def get_next(self):
        return next(self.it, None)


@pytest.mark.parametrize("method, compensate", [("wanda", "lstsq"), ("relief", "bias"), ("l1", "none")])
def test_the_error_curve_shares_one_calibration_and_equals_separate_prunes(tmp_path, method, compensate):
    """``sweep=`` (the CLI's --plot) prunes every point on the run's own calibration: a
    reader that can be read once suffices, and each point is what a prune of its own at
    that target gives (the same MACs removed, error and agreement, exactly)."""
    src = save(_net(), tmp_path / "m.onnx")
    data = _data(12)
    config = PruneConfig(calib=_OnceReader(data), target_macs=0.7, method=method, compensate=compensate,
                         progress=False, latency=False, batch_size=8)
    _, result = api.prune_with(config, src, None, sweep=(0.8, 0.5))
    assert "calibrate" in result.seconds
    separate = api.error_sweep(src, dataclasses.replace(config, calib=data), result, (0.8, 0.5))
    assert len(result.sweep) == 3
    assert result.sweep == separate
    assert result.to_dict()["error_curve"][1]["macs_removed"] == separate[1][0]
    with pytest.raises(onnxprune.InputError, match="no samples"):  # what a prune per point met: the reader is spent
        api.error_sweep(src, config, result, (0.8,))


def test_the_first_refit_leaves_what_the_refit_on_the_pruned_graph_fits_again(tmp_path, monkeypatch):
    """With the kept batches, the refit on the pruned graph fits every target again before
    anything reads it: the first refit (from the statistics) skips their solves, and the
    model written is the same, byte for byte, as with those solves (in ``--steps`` too,
    where a MatMul's earlier bias Add must stay as it is)."""
    import hashlib

    from test_transformer_mlp import mlp

    src = save(mlp("gelu"), tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((8, 5, 16)).astype(np.float32)} for _ in range(4)]
    real, asked = stages.lstsq_refits, []

    def every_consumer(analysis, stats, removed, refit_later=()):
        asked.append(len(list(refit_later)))
        return real(analysis, stats, removed)

    def written(name: str, steps: int) -> str:
        onnxprune.prune(src, tmp_path / name, calib=calib, ratio=0.5, compensate="lstsq", steps=steps, latency=False)
        return hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()

    skipped = [written(f"a{steps}.onnx", steps) for steps in (1, 2)]
    monkeypatch.setattr(stages, "lstsq_refits", every_consumer)
    assert [written(f"b{steps}.onnx", steps) for steps in (1, 2)] == skipped
    assert asked and asked[0] > 0  # there were targets to skip
