"""The public registries: ``register_op`` (ops of any domain) and ``register_criterion``.

The README's section "Extending the op table" is run as written: its python blocks are
executed here on real models, so the example cannot rot.  A registered handler unblocks a
group the unknown op blocked; a ``com.microsoft`` contrib op prunes end to end in
onnxruntime (with Ray too: the analysis runs in the driver); re-registering needs
``replace=True``; a user criterion works from the API and, through an ``onnxprune.plugins``
entry point, from the CLI's ``--method``, writing the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune import methods, ops
from onnxprune._ort import session

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Extending the op table"


def _readme_blocks(lang: str) -> list[str]:
    """The ``lang`` code blocks of the README's section on extending the op table."""
    text = (ROOT / "README.md").read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return re.findall(rf"```{lang}\n(.*?)```", text[start:end], flags=re.S)


@pytest.fixture(autouse=True)
def tables():
    """Each test starts from the built-in tables and leaves them as it found them."""
    saved = dict(ops.OP_TABLE), dict(ops.DOMAIN_TABLE), dict(methods.REGISTRY)
    yield
    for table, old in zip((ops.OP_TABLE, ops.DOMAIN_TABLE, methods.REGISTRY), saved):
        table.clear()
        table.update(old)


def _chain(path: Path, domain: str, op: str, extra: dict[str, np.ndarray] | None = None, c: int = 16) -> Path:
    """Conv(3→c) → domain::op(x, *extra) → Relu → Conv(c→4): the first Conv's group passes
    through the op; the second Conv's output is the graph output."""
    rng = np.random.default_rng(0)
    extra = extra or {}
    inits = [numpy_helper.from_array(rng.standard_normal((c, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.standard_normal((4, c, 3, 3)).astype(np.float32) * 0.2, "w2")]
    inits += [numpy_helper.from_array(v, k) for k, v in extra.items()]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node(op, ["a", *extra], ["b"], name="custom", domain=domain),
        helper.make_node("Relu", ["b"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _scaled(path: Path) -> Path:
    scale = np.linspace(0.5, 2.0, 16).astype(np.float32)
    return _chain(path, "com.example", "ScaleChannels", {"scale": scale})


def _gelu(path: Path) -> Path:
    return _chain(path, "com.microsoft", "Gelu")


def _first(report):
    return next(g for g in report.groups if g.producers[0].name == "conv1")


def test_registering_a_handler_unblocks_the_group_the_unknown_op_blocked(tmp_path):
    path = _chain(tmp_path / "identity2.onnx", "com.example", "Identity2")
    before = _first(onnxprune.analyze(path))
    assert not before.prunable
    assert before.blocked == ["Identity2 'custom': op 'com.example::Identity2' is not in onnxprune's op table"]
    onnxprune.register_op("Identity2", "com.example", onnxprune.Unary())
    after = _first(onnxprune.analyze(path))
    assert after.prunable and after.blocked == []
    assert len(after.classes) == 16


def test_the_readme_example_runs_as_written(tmp_path, monkeypatch, capsys):
    """The op-table block: a custom-domain handler (analysis only) and a contrib op pruned
    end to end; the rewrite slices scale[c] with the channels."""
    _scaled(tmp_path / "scaled.onnx")
    _gelu(tmp_path / "gelu.onnx")
    monkeypatch.chdir(tmp_path)
    code = _readme_blocks("python")[0]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert capsys.readouterr().out.strip() == "[True, False]"
    result = scope["result"]
    assert result.params_after < result.params_before
    # The written model runs in onnxruntime with half of conv1's 16 channels left.
    written = onnx.load(str(tmp_path / "gelu-pruned.onnx"))
    w1 = next(t for t in written.graph.initializer if t.name == "w1")
    assert list(w1.dims) == [8, 3, 3, 3]
    assert [n.domain for n in written.graph.node if n.op_type == "Gelu"] == ["com.microsoft"]
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert session(str(tmp_path / "gelu-pruned.onnx")).run(None, {"x": x})[0].shape == (1, 4, 8, 8)


def test_a_custom_handler_slices_the_per_channel_constant(tmp_path, monkeypatch):
    """The README's ScaleChannels handler records scale[c] as a parameter of the channels:
    removing channels 1 and 5 removes the same entries of scale."""
    from onnxprune.groups import analyze_groups
    from onnxprune.load import load_model
    from onnxprune.rewrite import apply_removal

    monkeypatch.chdir(tmp_path)
    _scaled(tmp_path / "scaled.onnx")
    _gelu(tmp_path / "gelu.onnx")
    exec(compile(_readme_blocks("python")[0], "README.md", "exec"), {})
    model, _ = load_model(tmp_path / "scaled.onnx")
    analysis = analyze_groups(model)
    group = next(g for g in analysis.groups if g.prunable)
    apply_removal(analysis, group.classes[[1, 5]])
    node = next(n for n in model.graph if n.op_type == "ScaleChannels")
    want = np.delete(np.linspace(0.5, 2.0, 16).astype(np.float32), [1, 5])
    np.testing.assert_array_equal(node.inputs[1].const_value.numpy(), want)


def test_an_op_of_a_domain_onnxruntime_does_not_know_is_analyzed_but_not_pruned(tmp_path):
    from onnxprune.errors import InputError

    path = _scaled(tmp_path / "scaled.onnx")
    onnxprune.register_op("ScaleChannels", "com.example", onnxprune.Unary())
    assert _first(onnxprune.analyze(path)).prunable
    with pytest.raises(InputError, match=r"^onnxruntime cannot run the input model: .*"
                                         r"com.example:ScaleChannels\(-1\) is not a registered function/op$"):
        onnxprune.prune(path, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_re_registration_needs_replace(tmp_path):
    from onnxprune.errors import InputError

    handler = onnxprune.Unary()
    onnxprune.register_op("Identity2", "com.example", handler)
    with pytest.raises(InputError, match=r"'com.example::Identity2' already has a handler \(Unary\); pass replace=True"):
        onnxprune.register_op("Identity2", "com.example", onnxprune.Unary())
    assert ops.DOMAIN_TABLE[("com.example", "Identity2")] is handler
    blocker = onnxprune.Block("not today")
    onnxprune.register_op("Identity2", "com.example", blocker, replace=True)
    assert ops.DOMAIN_TABLE[("com.example", "Identity2")] is blocker
    # A built-in op: "ai.onnx" is the default domain, and it can be replaced the same way.
    with pytest.raises(InputError, match=r"'Relu' already has a handler"):
        onnxprune.register_op("Relu", "ai.onnx", onnxprune.Unary())
    onnxprune.register_op("Relu", "", onnxprune.Block("no Relu today"), replace=True)
    path = _gelu(tmp_path / "gelu.onnx")
    onnxprune.register_op("Gelu", "com.microsoft", onnxprune.Unary())
    assert _first(onnxprune.analyze(path)).blocked == ["Relu 'relu': no Relu today"]
    with pytest.raises(InputError, match="handler must be an onnxprune.Handler instance, got the class Unary: pass an instance"):
        onnxprune.register_op("X", "com.example", onnxprune.Unary)
    with pytest.raises(InputError, match="op_type must be a non-empty string"):
        onnxprune.register_op("", "com.example", onnxprune.Unary())


# -- criteria ---------------------------------------------------------------------------

CNN = ROOT / "models" / "mnist_cnn.onnx"
CALIB = ROOT / "models" / "data" / "calib"


def _env(**extra) -> dict:
    env = dict(os.environ, ONNXPRUNE_NO_GUARD="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([*extra.get("PYTHONPATH", "").split(os.pathsep), str(ROOT)]).strip(os.pathsep)
    return env


def _plugin_folder(tmp_path: Path) -> Path:
    """A folder on which ``meansq`` (the README's criterion module) is installed as a
    plug-in: the module and a distribution's metadata with its entry point."""
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "meansq.py").write_text(_readme_blocks("python")[1])
    dist = folder / "meansq_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: meansq-plugin\nVersion: 1.0\n")
    points = tomllib.loads(_readme_blocks("toml")[0])["project"]["entry-points"]["onnxprune.plugins"]
    (dist / "entry_points.txt").write_text("[onnxprune.plugins]\n" + "".join(f"{k} = {v}\n" for k, v in points.items()))
    return folder


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_user_criterion_prunes_from_the_api_and_the_cli_alike(tmp_path, monkeypatch):
    folder = _plugin_folder(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(CNN, work / "cnn.onnx")
    shutil.copytree(CALIB, work / "calib")
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "meansq", raising=False)
    scope: dict = {}
    exec(compile(_readme_blocks("python")[2], "README.md", "exec"), scope)
    crit = methods.REGISTRY["meansq"]
    assert type(crit).__name__ == "MeanSquare"
    result = scope["result"]
    assert result.params_after < result.params_before
    # The CLI, with the plug-in found through its entry point only (no import in the command).
    out = tmp_path / "cli.onnx"
    r = subprocess.run([sys.executable, "-m", "onnxprune", "prune", "cnn.onnx", str(out), "--method", "meansq",
                        "--calib", "calib/", "--ratio", "0.3", "-q"],
                       capture_output=True, text=True, env=_env(PYTHONPATH=str(folder)), timeout=600)
    assert r.returncode == 0, r.stderr
    assert _sha(out) == _sha(work / "cnn-meansq.onnx")
    # Without the plug-in installed, the name is unknown: one line, exit 2.
    r = subprocess.run([sys.executable, "-m", "onnxprune", "prune", "cnn.onnx", str(tmp_path / "no.onnx"),
                        "--method", "meansq", "--calib", "calib/"], capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: --method must be one of l1, l2, random, wanda, flap, activation, relief, relative, mipp, obs, got 'meansq'"
    ]


def test_a_plugin_that_fails_to_import_is_one_line_and_exit_2(tmp_path):
    folder = _plugin_folder(tmp_path)
    (folder / "meansq.py").write_text("raise RuntimeError('the plug-in is broken\\nsecond line')\n")
    r = subprocess.run([sys.executable, "-m", "onnxprune", "analyze", str(CNN)],
                       capture_output=True, text=True, env=_env(PYTHONPATH=str(folder)), timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: plug-in 'meansq' (meansq) failed to load: RuntimeError: the plug-in is broken"
    ]


def test_registered_handlers_need_no_registration_on_ray_workers(tmp_path):
    """The analysis runs in the driver: a prune on two local Ray workers of a model whose
    only way through is a registered contrib op selects and writes what one process does."""
    path = _gelu(tmp_path / "gelu.onnx")
    onnxprune.register_op("Gelu", "com.microsoft", onnxprune.Unary())
    rng = np.random.default_rng(3)
    data = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(24)]
    kw = dict(calib=data, method="wanda", ratio=0.5, latency=False, eval_samples=4, batch_size=4)

    def weights(model):
        return {name: v.const_value.numpy() for name, v in model.graph.initializers.items()}

    one, _ = onnxprune.prune(path, None, **kw)
    two, result = onnxprune.prune(path, None, ray="local", workers=2, **kw)
    assert result.distributed is not None
    want, got = weights(one), weights(two)
    assert sorted(got) == sorted(want)
    assert got["w1"].shape == (8, 3, 3, 3)
    for name, w in want.items():
        np.testing.assert_allclose(got[name], w, rtol=1e-6, atol=1e-6 * float(np.abs(w).max()), err_msg=name)
