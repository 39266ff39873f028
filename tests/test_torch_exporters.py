"""Real exporter output: small torch models exported by both torch exporters.

Every model is exported with the TorchScript exporter (``dynamo=False``, opset 17) and
with the dynamo exporter (``dynamo=True``, which writes its weights to ``X.onnx.data``
even for tiny models), with a dynamic batch axis.  For each model × exporter:

- ``analyze`` finds prunable groups, and every group that is not prunable says why;
- ``prune`` writes a valid smaller graph that onnxruntime runs with the original's
  output shapes (dynamo: the output keeps its weights in ``out.onnx.data``);
- the EXACT property: channels whose outgoing weights were zeroed in torch before the
  export are removed and the outputs do not change.

The op types each exporter emits are pinned in ``EMITS`` so that a change in torch's
exporters shows up here rather than in users' hands.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")  # the dynamo exporter needs it
nn, F = torch.nn, torch.nn.functional

import onnxprune  # noqa: E402
from onnxprune._ort import session  # noqa: E402
from onnxprune._graph import const_array  # noqa: E402
from onnxprune.groups import analyze_groups  # noqa: E402
from onnxprune.load import load_model  # noqa: E402

from builders import max_diff, params, remove_exact  # noqa: E402

# ----------------------------------------------------------------------------- models


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + identity)


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = BasicBlock(8, 8)
        self.layer2 = BasicBlock(8, 16, stride=2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _conv_bn_relu6(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU6()
    )


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand = _conv_bn_relu6(cin, hidden)
        self.dw = _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden)
        self.project = nn.Conv2d(hidden, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.bn(self.project(self.dw(self.expand(x))))
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn_relu6(3, 8, 3, 2)
        self.b1 = InvertedResidual(8, 8, 1, 4)
        self.b2 = InvertedResidual(8, 16, 2, 2)
        self.b3 = InvertedResidual(16, 16, 1, 2)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.b3(self.b2(self.b1(self.stem(x))))
        return self.head(x.mean((2, 3)))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, r, 1)
        self.fc2 = nn.Conv2d(r, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.silu(self.fc1(s))))


class MBConv(nn.Module):
    def __init__(self, c: int, hidden: int, act: nn.Module) -> None:
        super().__init__()
        self.expand = nn.Conv2d(c, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.dw = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.se = SqueezeExcite(hidden, 4)
        self.project = nn.Conv2d(hidden, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.act = act

    def forward(self, x):
        y = self.act(self.bn1(self.expand(x)))
        y = self.act(self.bn2(self.dw(y)))
        return x + self.bn3(self.project(self.se(y)))


class EfficientNet(nn.Module):
    """MobileNetV3/EfficientNet-style: MBConv with squeeze-excitation, HardSwish and SiLU."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.Hardswish())
        self.b1 = MBConv(8, 16, nn.Hardswish())
        self.b2 = MBConv(8, 24, nn.SiLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.b2(self.b1(self.stem(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Detector(nn.Module):
    """Inception/FPN-like: concatenated branches, nearest upsampling, split and chunk."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, 1, 1)
        self.c2 = nn.Conv2d(8, 16, 3, 2, 1)
        self.b1 = nn.Conv2d(16, 8, 1)
        self.b2 = nn.Conv2d(16, 8, 3, 1, 1)
        self.lat = nn.Conv2d(8, 16, 1)
        self.fuse = nn.Conv2d(32, 16, 3, 1, 1)
        self.mix = nn.Conv2d(8, 8, 3, 1, 1)
        self.head = nn.Conv2d(24, 6, 1)

    def forward(self, x):
        p1 = F.relu(self.c1(x))  # 8 @ 16x16
        p2 = F.relu(self.c2(p1))  # 16 @ 8x8
        inception = torch.cat([F.relu(self.b1(p2)), F.relu(self.b2(p2))], 1)  # 16 @ 8x8
        up = F.interpolate(inception, scale_factor=2, mode="nearest")  # 16 @ 16x16
        f = F.relu(self.fuse(torch.cat([up, self.lat(p1)], 1)))  # 32 -> 16
        a, b = torch.split(f, [8, 8], dim=1)
        c, d = torch.chunk(a, 2, dim=1)
        return self.head(torch.cat([F.relu(self.mix(b)), d, c, b], 1))  # 24 -> 6


class Classifier(nn.Module):
    """Conv features flattened with ``x.view(x.size(0), -1)`` into a Linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 2, 1)
        self.conv2 = nn.Conv2d(8, 16, 3, 2, 1)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.bn = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        x = x.view(x.size(0), -1)
        return self.fc2(F.relu(self.bn(self.fc1(x))))


class TransformerMLP(nn.Module):
    """[B, T, C]: an embedding, then LayerNorm → Linear → GELU → Linear with a residual."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(12, 16)
        self.ln = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.fc2(F.gelu(self.fc1(self.ln(h))))
        return self.out(h)


# ----------------------------------------------------------------------------- cases


@dataclass
class Exact:
    """Channels ``channels`` of some internal producer whose outgoing weights are zeroed:
    ``consumers`` lists (module path, input columns of that module's weight)."""

    consumers: list[tuple[str, list[int]]]
    channels: list[int]


@dataclass
class Case:
    cls: type
    shape: tuple[int, ...]
    prunable: int  # prunable groups, the same for both exporters
    exact: list[Exact] = field(default_factory=list)
    # BatchNorms left at their initial statistics: their folded Conv biases are all zero,
    # so the TorchScript exporter shares them through Identity nodes.
    fresh_bn: tuple[str, ...] = ()


def _cols(channels: list[int], block: int) -> list[int]:
    return [c * block + i for c in channels for i in range(block)]


CASES = {
    "resnet": Case(
        ResNet, (2, 3, 16, 16), prunable=4,
        exact=[
            Exact([("layer1.conv2", [1, 4, 6])], [1, 4, 6]),
            Exact([("layer2.conv2", [0, 7, 15])], [0, 7, 15]),
        ],
        fresh_bn=("stem.1", "layer1.bn1", "layer1.bn2"),
    ),
    "mobilenetv2": Case(
        MobileNetV2, (2, 3, 32, 32), prunable=5,
        # b1's expand channels pass through the depthwise conv to the projection.
        exact=[Exact([("b1.project", [0, 5, 17, 30])], [0, 5, 17, 30])],
        fresh_bn=("b1.expand.1", "b1.dw.1"),
    ),
    "efficientnet": Case(
        EfficientNet, (2, 3, 16, 16), prunable=5,
        # b1's expand channels reach the SE squeeze and (times the excitation) the projection.
        exact=[Exact([("b1.project", [2, 9, 15]), ("b1.se.fc1", [2, 9, 15])], [2, 9, 15])],
    ),
    "detector": Case(
        Detector, (2, 3, 16, 16), prunable=7,
        exact=[
            # b2 is the second half of the inception concat, upsampled, then the first
            # half of fuse's input: column 8 + k.
            Exact([("fuse", [8 + 3, 8 + 5])], [3, 5]),
            # fuse channel j < 4 is chunk c (head column 12 + j), 4 <= j < 8 is chunk d
            # (head column 8 + j - 4), j >= 8 is split b (mix column j - 8, head 16 + j - 8).
            Exact([("head", [13, 10, 18]), ("mix", [2])], [1, 6, 10]),
        ],
    ),
    "classifier": Case(
        Classifier, (2, 3, 32, 32), prunable=3,
        # conv2 channel k becomes features 16k .. 16k+15 of the flattened 4x4 maps.
        exact=[Exact([("fc1", _cols([2, 9], 16))], [2, 9]), Exact([("fc2", [3, 20])], [3, 20])],
    ),
    "mlp": Case(TransformerMLP, (2, 5, 12), prunable=1, exact=[Exact([("fc2", [0, 7, 31])], [0, 7, 31])]),
}

# What each exporter emits (torch 2.13): ops that must be there (the patterns each model
# exercises) and ops that must not.  TorchScript folds Conv+BN and shares equal
# initializers through Identity nodes; dynamo folds Conv+BN too and emits fused ops.
EMITS = {
    ("resnet", "torchscript"): (
        {"Conv", "Relu", "Add", "GlobalAveragePool", "Flatten", "Gemm", "Identity"}, {"BatchNormalization"}
    ),
    ("resnet", "dynamo"): ({"Conv", "Relu", "Add", "ReduceMean", "Reshape", "Gemm"}, {"BatchNormalization"}),
    ("mobilenetv2", "torchscript"): ({"Conv", "Clip", "Add", "ReduceMean", "Gemm", "Identity", "Constant"}, set()),
    ("mobilenetv2", "dynamo"): ({"Conv", "Clip", "Add", "ReduceMean", "Gemm"}, {"BatchNormalization"}),
    ("efficientnet", "torchscript"): ({"Conv", "HardSwish", "GlobalAveragePool", "Sigmoid", "Mul", "Add"}, set()),
    ("efficientnet", "dynamo"): ({"Conv", "HardSwish", "ReduceMean", "Sigmoid", "Mul", "Add"}, set()),
    # TorchScript computes torch.chunk's bounds at run time: Shape→Gather→Add→Div→Mul→Slice.
    ("detector", "torchscript"): ({"Concat", "Resize", "Split", "Shape", "Gather", "Div", "Slice"}, set()),
    ("detector", "dynamo"): ({"Concat", "Resize", "Split"}, {"Slice", "Shape"}),
    # x.view(x.size(0), -1): TorchScript builds the shape at run time.
    ("classifier", "torchscript"): (
        {"MaxPool", "Shape", "Gather", "Unsqueeze", "Concat", "Reshape", "Gemm", "BatchNormalization"}, set()
    ),
    ("classifier", "dynamo"): ({"MaxPool", "Reshape", "Gemm"}, {"Shape"}),
    # GELU: TorchScript writes the erf formula, dynamo the Gelu op.
    ("mlp", "torchscript"): ({"LayerNormalization", "MatMul", "Add", "Div", "Erf", "Mul"}, {"Gelu"}),
    ("mlp", "dynamo"): ({"LayerNormalization", "MatMul", "Add", "Gelu"}, {"Erf"}),
}

EXPORTERS = ("torchscript", "dynamo")
PARAMS = [(m, e) for m in CASES for e in EXPORTERS]
IDS = [f"{m}-{e}" for m, e in PARAMS]


def _build(name: str) -> nn.Module:
    case = CASES[name]
    torch.manual_seed(0)
    model = case.cls()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for path, mod in model.named_modules():  # non-trivial BN statistics, so folding matters
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)) and path not in case.fresh_bn:
                n = mod.num_features
                mod.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                mod.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                mod.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                mod.bias.copy_(torch.rand(n, generator=gen) - 0.5)
        for ex in case.exact:
            for path, cols in ex.consumers:
                model.get_submodule(path).weight[:, cols] = 0.0
    return model.eval()


def _export(name: str, exporter: str, path: Path) -> Path:
    model = _build(name)
    x = torch.randn(*CASES[name].shape, generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(
                model, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"], output_names=["y"],
                dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
            )
        else:
            torch.onnx.export(
                model, (x,), str(path), dynamo=True, input_names=["x"], output_names=["y"],
                dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
            )
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache: dict[tuple[str, str], Path] = {}

    def get(name: str, exporter: str) -> Path:
        if (name, exporter) not in cache:
            folder = tmp_path_factory.mktemp(f"{name}-{exporter}")
            cache[name, exporter] = _export(name, exporter, folder / f"{name}.onnx")
        return cache[name, exporter]

    return get


def _feed(shape: tuple[int, ...], batch: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {"x": rng.standard_normal((batch, *shape[1:])).astype(np.float32)}


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name, exporter", PARAMS, ids=IDS)
def test_exporter_emits(exported, name, exporter):
    path = exported(name, exporter)
    proto = onnx.load(str(path), load_external_data=False)
    ops = {n.op_type for n in proto.graph.node}
    must, must_not = EMITS[name, exporter]
    assert must <= ops, f"missing {sorted(must - ops)}; emitted {sorted(ops)}"
    assert not (must_not & ops), f"unexpected {sorted(must_not & ops)}"
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value, "batch axis is not dynamic"
    external = [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    data = path.with_name(path.name + ".data")
    if exporter == "dynamo":
        assert external and data.is_file()
    else:
        assert not external and not data.exists()


@pytest.mark.parametrize("name, exporter", PARAMS, ids=IDS)
def test_analyze(exported, name, exporter):
    report = onnxprune.analyze(exported(name, exporter))
    prunable = [g for g in report.groups if g.prunable]
    assert len(prunable) == CASES[name].prunable, [(g.name, g.blocked) for g in report.groups]
    for g in report.groups:
        if not g.prunable:
            assert g.blocked or g.excluded or len(g.classes) <= 1, g.to_dict()
    # The group feeding the graph output is the only one blocked, except the transformer
    # whose hidden dim goes through LayerNorm.
    blocked = [g for g in report.groups if g.blocked]
    if name == "mlp":
        assert len(blocked) == 2
        hidden = next(g for g in blocked if any("LayerNormalization" in r for r in g.blocked))
        assert hidden.n_channels == 16 and len(hidden.producers) == 2  # embed + fc2 (residual)
        assert prunable[0].n_channels == 32  # the MLP intermediate
    else:
        assert len(blocked) == 1 and any("graph output" in r for r in blocked[0].blocked), blocked[0].blocked
    assert 0 < report.prunable_params <= report.params


@pytest.mark.parametrize("name, exporter", PARAMS, ids=IDS)
def test_prune(exported, name, exporter, tmp_path):
    src = exported(name, exporter)
    out = tmp_path / "out.onnx"
    _, result = onnxprune.prune(src, out, method="l1", ratio=0.5)
    assert out.is_file()
    assert result.params_after < result.params_before
    assert params(out) < params(src)
    onnx.checker.check_model(str(out), full_check=True)
    feed = _feed(CASES[name].shape)
    before, after = session(str(src)).run(None, feed), session(str(out)).run(None, feed)
    assert [a.shape for a in before] == [a.shape for a in after]
    assert all(np.isfinite(a).all() for a in after)
    data = sorted(tmp_path.glob("out.onnx.*.data"))  # NAME.<hash>.data
    if exporter == "dynamo":
        assert len(data) == 1, "the dynamo export's external data was not kept"
        lazy = onnx.load(str(out), load_external_data=False)
        assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in lazy.graph.initializer)
        full = onnx.load(str(out))
        assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in full.graph.initializer)
    else:
        assert not data


def _weight_axes(node) -> tuple[int, int]:
    """(input axis, output axis) of a Conv/Gemm/MatMul constant weight."""
    if node.op_type == "Gemm":
        trans_b = node.attributes.get("transB")
        return (1, 0) if trans_b is not None and int(trans_b.value) else (0, 1)
    return (0, 1) if node.op_type == "MatMul" else (1, 0)


def _zeroed_consumer(model, cols: list[int], n_out: int):
    """The Conv/Gemm/MatMul with ``n_out`` outputs whose constant weight is zero exactly
    at input columns ``cols``."""
    hits = []
    for node in model.graph:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
            continue
        w = const_array(node.inputs[1])
        if w is None or w.ndim < 2:
            continue
        axis, out_axis = _weight_axes(node)
        zero = np.all(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1) == 0, axis=1)
        if w.shape[out_axis] == n_out and sorted(np.flatnonzero(zero).tolist()) == sorted(cols):
            hits.append(node)
    assert len(hits) == 1, f"{len(hits)} nodes have zero input columns {cols}"
    return hits[0]


@pytest.mark.parametrize("name, exporter", PARAMS, ids=IDS)
def test_exact_removal(exported, name, exporter, tmp_path):
    """Channels whose outgoing weights were zeroed in torch go; the outputs stay."""
    src = exported(name, exporter)
    proto = onnx.load(str(src))  # pulls in the dynamo export's external data
    for k, ex in enumerate(CASES[name].exact):
        model, _ = load_model(src)
        analysis = analyze_groups(model)
        torch_model = _build(name)
        reads = []  # (zeroed columns, channel class of every input column) per consumer
        for path, cols in ex.consumers:
            node = _zeroed_consumer(model, cols, torch_model.get_submodule(path).weight.shape[0])
            reads.append((cols, analysis.roots[analysis.layouts[node.inputs[0]].atoms]))
        classes = np.unique(np.concatenate([col_classes[cols] for cols, col_classes in reads]))
        # Each consumer reads the removed channels exactly at its zeroed columns, or
        # onnxprune maps channels (concat offsets, chunks, flatten blocks) unlike torch.
        for cols, col_classes in reads:
            assert sorted(np.flatnonzero(np.isin(col_classes, classes)).tolist()) == sorted(cols)
        group = next(g for g in analysis.groups if np.isin(classes, g.classes).all())
        assert group.prunable, group.blocked
        positions = [int(np.flatnonzero(group.classes == c)[0]) for c in classes]
        assert sorted(positions) == sorted(ex.channels)
        producer = group.producers[0].name
        work = tmp_path / str(k)
        work.mkdir()
        reference, pruned, out = remove_exact(work, proto, producer, positions)
        assert max_diff(reference, pruned) <= 1e-4
        assert params(out) < params(work / "in.onnx")
        # The same holds on another batch size (the batch axis stays dynamic).
        feed = _feed(CASES[name].shape, batch=5)
        assert max_diff(session(str(work / "in.onnx")).run(None, feed), session(str(out)).run(None, feed)) <= 1e-4


# ------------------------------------------------ engine regressions seen in exporter output


def _shape_read_model(indices: list[int]) -> onnx.ModelProto:
    """conv → relu → conv → y, and Shape(conv)[indices] → ConstantOfShape → z."""
    from builders import G

    g = G()
    x = g.input("x", ["N", 3, 8, 8])
    y = g.conv(x, 3, 4, name="conv")
    out = g.conv(g.op("Relu", [y]), 4, 2, name="conv2")
    picked = g.op("Gather", [g.op("Shape", [y]), g.const(np.array(indices, dtype=np.int64))], axis=0)
    return g.model([out, g.op("ConstantOfShape", [picked])])


def test_channel_count_read_with_a_dynamic_dim_blocks(tmp_path):
    """Gather(Shape(x), [0, 1]) reads the batch (dynamic, so not foldable) and the channel
    count: the group must be blocked (ShapeOf once checked index % rank-of-the-shape-tensor,
    always 1, and let this through)."""
    path = tmp_path / "m.onnx"
    onnx.save(_shape_read_model([0, 1]), str(path))
    group = next(g for g in onnxprune.analyze(path).groups if g.producers[0].name == "conv")
    assert not group.prunable
    assert any("channel count is read at run time" in r for r in group.blocked), group.blocked


def test_static_channel_count_read_is_folded(tmp_path):
    """Gather(Shape(x), [1]) on a static channel dim is a constant (as TorchScript's
    torch.chunk bounds are): it is folded, and the pruned model still yields the original
    count, so outputs keep their shapes and values."""
    path = tmp_path / "m.onnx"
    onnx.save(_shape_read_model([1]), str(path))
    group = next(g for g in onnxprune.analyze(path).groups if g.producers[0].name == "conv")
    assert group.prunable, group.blocked
    proto = _shape_read_model([1])
    reference, pruned, out = remove_exact(tmp_path, proto, "conv", [1])
    assert pruned[1].shape == reference[1].shape == (4,)
    assert params(out) < params(tmp_path / "in.onnx")


# ------------------------------------------------ a tiny transformer encoder block (issue 5)


class EncoderBlock(nn.Module):
    """BERT-style post-LN encoder block written out as both exporters see a BERT layer:
    Q/K/V Linear → view [B, T, H, d] → transpose → QKᵀ/√d + mask → softmax → ·V →
    transpose → reshape → output Linear, residual, LayerNorm, then a GELU MLP."""

    def __init__(self, c: int = 16, heads: int = 4, hidden: int = 32) -> None:
        super().__init__()
        self.heads, self.d = heads, c // heads
        self.embed = nn.Linear(12, c)
        self.ln0 = nn.LayerNorm(c)
        self.q, self.k, self.v, self.o = (nn.Linear(c, c) for _ in range(4))
        self.ln1 = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, hidden)
        self.fc2 = nn.Linear(hidden, c)
        self.ln2 = nn.LayerNorm(c)

    def forward(self, x):
        h = self.ln0(self.embed(x))
        b, t, c = h.shape
        q, k, v = (m(h).view(b, t, self.heads, self.d).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = torch.softmax(q @ k.transpose(-1, -2) / self.d**0.5, dim=-1)
        h = self.ln1(h + self.o((a @ v).transpose(1, 2).reshape(b, t, c)))
        return self.ln2(h + self.fc2(F.gelu(self.fc1(h))))


@pytest.fixture(scope="module")
def encoder_block(tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(exporter: str) -> Path:
        if exporter not in cache:
            torch.manual_seed(0)
            model = EncoderBlock().eval()
            with torch.no_grad():
                model.fc2.weight[:, [1, 8, 30]] = 0.0  # MLP channels 1, 8, 30 contribute nothing
                model.o.weight[:, 8:12] = 0.0  # and neither does attention head 2
            path = tmp_path_factory.mktemp(f"block-{exporter}") / "block.onnx"
            x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(2))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if exporter == "torchscript":
                    torch.onnx.export(
                        model, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                        output_names=["y"], dynamic_axes={"x": {0: "batch", 1: "seq"}, "y": {0: "batch", 1: "seq"}},
                    )
                else:
                    torch.onnx.export(
                        model, (x,), str(path), dynamo=True, input_names=["x"], output_names=["y"],
                        dynamic_shapes=({0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", max=64)},),
                        verbose=False,
                    )
            cache[exporter] = path
        return cache[exporter]

    return get


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_encoder_block_prunes_heads_and_mlp(encoder_block, exporter, tmp_path):
    """The attention heads (4) and the MLP intermediate (32) are the prunable groups; the
    hidden dim is blocked by LayerNormalization with a reason; l1 at 50% writes a valid
    smaller graph with the original output shapes, and the zero-weight MLP channels and
    the head the output projection ignores go without moving the outputs."""
    src = encoder_block(exporter)
    report = onnxprune.analyze(src)
    prunable = [g for g in report.groups if g.prunable]
    assert sorted(g.n_channels for g in prunable) == [4, 32], [(g.name, g.blocked) for g in report.groups]
    assert all(g.blocked for g in report.groups if not g.prunable)
    assert any("LayerNormalization" in r for g in report.groups for r in g.blocked)
    out = tmp_path / "out.onnx"
    _, result = onnxprune.prune(src, out, method="l1", ratio=0.5)
    assert result.params_after < result.params_before and params(out) < params(src)
    onnx.checker.check_model(str(out), full_check=True)
    feed = {"x": np.random.default_rng(5).standard_normal((3, 7, 12)).astype(np.float32)}
    before, after = session(str(src)).run(None, feed), session(str(out)).run(None, feed)
    assert [a.shape for a in before] == [a.shape for a in after]
    assert all(np.isfinite(a).all() for a in after)
    # Exact: the zeroed channels are the three of fc1's that fc2 never reads, and head 2.
    for cols, n_out, n_channels in (([1, 8, 30], 16, 3), ([8, 9, 10, 11], 16, 1)):
        model, _ = load_model(src)
        analysis = analyze_groups(model)
        consumer = _zeroed_consumer(model, cols, n_out)
        classes = np.unique(analysis.roots[analysis.layouts[consumer.inputs[0]].atoms][cols])
        group = next(g for g in analysis.groups if g.prunable and classes[0] in g.classes)
        positions = [int(np.flatnonzero(group.classes == c)[0]) for c in classes]
        assert len(positions) == n_channels  # a head's 4 columns are one channel
        reference, pruned, small = remove_exact(tmp_path, onnx.load(str(src)), group.producers[0].name, positions)
        assert max_diff(reference, pruned) <= 1e-4
        assert params(small) < params(tmp_path / "in.onnx")


# ------------------------------------ nn.MultiheadAttention (torchvision's ViT, issue 5)


class MHABlock(nn.Module):
    """Pre-LN block around ``nn.MultiheadAttention`` (packed in-projection), as in ViT."""

    def __init__(self, c: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(c)
        self.att = nn.MultiheadAttention(c, heads, batch_first=True)
        self.fc = nn.Linear(c, c)

    def forward(self, x):
        h = self.ln(x)
        a, _ = self.att(h, h, h, need_weights=False)
        return self.fc(torch.relu(x + a))


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_multihead_attention_prunes_heads(exporter, tmp_path):
    """The packed Q/K/V in-projection is split at load, the heads merged into the batch come
    back as a head axis: the 4 heads are one group; the head the output projection ignores
    goes without moving the outputs; l1 at 50% writes a valid smaller graph."""
    torch.manual_seed(0)
    model = MHABlock().eval()
    with torch.no_grad():
        model.att.out_proj.weight[:, 4:8] = 0.0  # head 1 contributes nothing
    x = torch.randn(2, 5, 16)
    src = tmp_path / "mha.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":  # static tokens: this exporter bakes the key length in
            torch.onnx.export(model, (x,), str(src), dynamo=False, opset_version=17, input_names=["x"],
                              output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
        else:
            torch.onnx.export(model, (x,), str(src), dynamo=True, input_names=["x"], output_names=["y"],
                              dynamic_shapes=({0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", max=64)},),
                              verbose=False)
    report = onnxprune.analyze(src)
    heads = [g for g in report.groups if g.prunable]
    assert len(heads) == 1 and heads[0].n_channels == 4, [(g.name, g.blocked) for g in report.groups]
    assert len(heads[0].producers) == 3  # the packed projection, split in three
    model_ir, _ = load_model(src)
    analysis = analyze_groups(model_ir)
    group = next(g for g in analysis.groups if g.prunable)
    out_proj = next(n for n in model_ir.graph if n.op_type in ("Gemm", "MatMul") and group in
                    [g for g in analysis.groups if n in g.consumers])
    cls = analysis.roots[analysis.layouts[out_proj.inputs[0]].atoms][4]
    reference, pruned, small = remove_exact(tmp_path, onnx.load(str(src)), group.producers[0].name,
                                            [int(np.flatnonzero(group.classes == cls)[0])])
    assert max_diff(reference, pruned) <= 1e-5
    assert params(small) < params(tmp_path / "in.onnx")
    out = tmp_path / "out.onnx"
    _, result = onnxprune.prune(src, out, method="l1", ratio=0.5, latency=False)
    assert result.params_after < result.params_before
    feed = {"x": np.random.default_rng(5).standard_normal((3, 5, 16)).astype(np.float32)}
    before, after = session(str(src)).run(None, feed), session(str(out)).run(None, feed)
    assert [a.shape for a in before] == [a.shape for a in after]
