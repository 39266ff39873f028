"""A tiny graph builder for tests: real ONNX models in a few lines, no torch needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxprune._ort import session
from onnxprune.groups import Group, analyze_groups
from onnxprune.load import load_model, save_model
from onnxprune.rewrite import apply_removal
from onnxprune.verify import check_pruned, random_feed


class G:
    """Collects nodes and constants; ``model()`` returns a checked ModelProto."""

    def __init__(self, opset: int = 17, seed: int = 0, constant_nodes: bool = False) -> None:
        self.opset = opset
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.constant_nodes = constant_nodes
        self.n = 0

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def input(self, name: str, shape: list, dtype=TensorProto.FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def const(self, arr, name: str | None = None) -> str:
        arr = np.asarray(arr)
        name = name or self.name("c")
        tensor = numpy_helper.from_array(arr, name)
        if self.constant_nodes:
            self.nodes.append(helper.make_node("Constant", [], [name], value=tensor, name=f"{name}_const"))
        else:
            self.inits.append(tensor)
        return name

    def w(self, *shape, scale: float = 0.5) -> np.ndarray:
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)

    def op(self, op: str, inputs: list[str], n_out: int = 1, name: str | None = None, **attrs) -> str | list[str]:
        name = name or self.name(op.lower())
        outs = [f"{name}_out{i}" if n_out > 1 else f"{name}_out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs if n_out > 1 else outs[0]

    def conv(self, x: str, cin: int, cout: int, k: int = 3, group: int = 1, bias: bool = True,
             name: str | None = None, weight: np.ndarray | None = None, **attrs) -> str:
        w = weight if weight is not None else self.w(cout, cin // group, k, k)
        ins = [x, self.const(w)] + ([self.const(self.w(cout))] if bias else [])
        attrs.setdefault("pads", [k // 2] * 4)
        return self.op("Conv", ins, name=name, group=group, kernel_shape=[k, k], **attrs)

    def bn(self, x: str, c: int, name: str | None = None) -> str:
        return self.op(
            "BatchNormalization",
            [x, self.const(1 + 0.1 * self.w(c)), self.const(self.w(c)), self.const(self.w(c)),
             self.const(np.abs(self.w(c)) + 0.5)],
            name=name,
        )

    def gemm(self, x: str, k: int, n: int, trans_b: int = 1, name: str | None = None,
             weight: np.ndarray | None = None) -> str:
        w = weight if weight is not None else (self.w(n, k) if trans_b else self.w(k, n))
        return self.op("Gemm", [x, self.const(w), self.const(self.w(n))], name=name, transB=trans_b)

    def model(self, outputs: list[str]) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "test", self.inputs,
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
            initializer=self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 8
        model = onnx.shape_inference.infer_shapes(model)
        onnx.checker.check_model(model, full_check=True)
        return model


def save(proto: onnx.ModelProto, path: Path) -> Path:
    onnx.save(proto, str(path))
    return path


def run(path: Path, feed: dict) -> list[np.ndarray]:
    return session(str(path)).run(None, feed)


def group_by_producer(groups: list[Group], producer: str) -> Group:
    return next(g for g in groups if any(p.name == producer for p in g.producers))


def remove_exact(tmp_path: Path, proto: onnx.ModelProto, producer: str, channels: list[int]):
    """Remove ``channels`` (positions in the group's class order) of the group made by
    ``producer``; return (original outputs, pruned outputs, pruned path)."""
    src = save(proto, tmp_path / "in.onnx")
    model, _ = load_model(src)
    analysis = analyze_groups(model)
    group = group_by_producer(analysis.groups, producer)
    assert group.prunable, group.blocked
    sess = session(str(src))
    feed = random_feed(sess, seed=1)
    reference = sess.run(None, feed)
    apply_removal(analysis, group.classes[channels])
    out = tmp_path / "out.onnx"
    save_model(model, out, external=False, validate=lambda p: check_pruned(p, feed, reference))
    return reference, run(out, feed), out


def params(path: Path) -> int:
    m = onnx.load(str(path))
    n = sum(int(np.prod(t.dims)) for t in m.graph.initializer)
    for node in m.graph.node:
        for a in node.attribute:
            if a.name == "value" and a.HasField("t"):
                n += int(np.prod(a.t.dims))
    return n


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def calibrated(path: Path, data: list[dict], method: str, opts=None, batch_size: int = 8):
    """(analysis, views, stats) of ``path`` calibrated on ``data`` with ``method``'s own
    requests, as ``prune`` gathers them."""
    from onnxprune.calibrate import calibrate
    from onnxprune.consumers import consumer_views
    from onnxprune.data import batches, input_specs, source_items
    from onnxprune.methods import REGISTRY, MethodOptions

    model, _ = load_model(path)
    analysis = analyze_groups(model)
    views = consumer_views(analysis)
    specs = input_specs(session(str(path)))
    stats, _ = calibrate(
        model, {v.tensor: (v.value, v.axis) for v in views}, batches(source_items(data, specs)(), specs, batch_size),
        batch_size=batch_size, providers=["CPUExecutionProvider"], memory_budget=2**30, progress=False,
        requests=REGISTRY[method].requests(analysis, views, opts or MethodOptions()),
    )
    return analysis, views, stats


def small_cnn() -> onnx.ModelProto:
    """Two 3×3 Convs, global pooling and a Gemm: the small net the stage and step tests prune."""
    g = G()
    x = g.input("x", ["N", 3, 8, 8])
    a = g.op("Relu", [g.conv(x, 3, 16, name="c1")])
    b = g.op("Relu", [g.conv(a, 16, 16, name="c2")])
    return g.model([g.gemm(g.op("Flatten", [g.op("GlobalAveragePool", [b])]), 16, 4, name="fc")])


def random_batches(n: int) -> list[dict[str, np.ndarray]]:
    """``n`` seeded batches of 8 inputs for :func:`small_cnn`."""
    return [{"x": np.random.default_rng(i).standard_normal((8, 3, 8, 8)).astype(np.float32)} for i in range(n)]
