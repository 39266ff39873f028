"""Load stage (and the atomic save): refuse what cannot be pruned safely, in one line.

Checks, in order: the file exists and parses as ONNX; external-data paths stay inside
the model's folder and exist; the default-domain opset is 11 or newer; no quantized op
is present; onnx's checker accepts the model.  Then the model is loaded with onnx-ir
(external tensors stay lazy), exporter idioms are folded (constant-only index arithmetic,
static shape reads: see ``_graph.prepare_graph``) and onnx shape inference fills in
intermediate shapes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from ._graph import fold_attention_idioms, prepare_graph, supplement_shapes
from ._signals import deferred
from .errors import InputError

MIN_OPSET = 11
QUANTIZED_OPS = frozenset(
    {
        "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QuantizeLinear",
        "DequantizeLinear", "DynamicQuantizeLinear", "QLinearAdd", "QLinearMul",
        "QLinearSigmoid", "QLinearLeakyRelu", "QLinearConcat", "QLinearAveragePool",
        "QLinearGlobalAveragePool", "QGemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
        "QAttention", "DynamicQuantizeLSTM", "MatMulNBits",
    }
)
# Keep a margin under protobuf's 2 GiB message limit.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("…" if len(text) > 300 else "")


def _tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for g in attr.graphs:
                yield from _tensors(g)


def _nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _nodes(attr.g)
            for g in attr.graphs:
                yield from _nodes(g)


def _check_external_data(proto: onnx.ModelProto, folder: Path) -> bool:
    """Refuse external-data locations outside ``folder``; True when the model has any."""
    found = False
    root = folder.resolve()
    for tensor in _tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        found = True
        location = {e.key: e.value for e in tensor.external_data}.get("location", "")
        target = (root / location).resolve()
        if os.path.isabs(location) or (target != root and root not in target.parents):
            raise InputError(
                f"external data of tensor '{tensor.name}' points outside the model's folder: '{location}'"
            )
        if not target.is_file():
            raise InputError(f"external data file of tensor '{tensor.name}' not found: '{location}'")
    return found


def load_model(path: str | os.PathLike) -> tuple[ir.Model, bool]:
    """Load and check ``path``; returns the model and whether it uses external data."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"input model not found: {p}")
    if not p.is_file():
        raise InputError(f"input model is not a file: {p}")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise InputError(f"{p} is not an ONNX model (it does not parse: {_one_line(exc)})") from exc
    if proto.ir_version <= 0 or not proto.opset_import or not proto.HasField("graph"):
        raise InputError(f"{p} is not an ONNX model (no graph, IR version or opset)")
    external = _check_external_data(proto, p.parent)
    default = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    if default and default[0] < MIN_OPSET:
        raise InputError(
            f"opset {default[0]} is older than {MIN_OPSET}; convert first with onnx.version_converter"
        )
    for node in _nodes(proto.graph):
        if node.op_type in QUANTIZED_OPS:
            raise InputError(
                f"quantized graph ({node.op_type} node '{node.name}'): onnxprune prunes float graphs; "
                "prune before quantizing"
            )
    try:
        onnx.checker.check_model(str(p))
    except Exception as exc:
        raise InputError(f"{p} is not a valid ONNX model: {_one_line(exc)}") from exc
    del proto
    try:
        model = ir.load(str(p))
    except Exception as exc:
        raise InputError(f"{p} could not be loaded: {_one_line(exc)}") from exc
    normalise(model)
    return model, external


# Rounds of shape inference + folding at load; each is one inference over the graph.
NORMALISE_ROUNDS = 64


def normalise(model: ir.Model) -> None:
    """Fold exporter idioms into constants and infer shapes, so that every later stage
    (the counts, the analysis, the memory planner) sees the same graph with real shapes.

    Constant-only subgraphs fold first: onnx shape inference stops at a Pad whose pads
    are computed.  Static shape reads fold once shapes are inferred, which may in turn
    let inference reach further, until nothing changes.  onnx's data propagation stops at
    a Div, so a chain of blocks that read their own shape (``chunk`` in a TorchScript
    export: Shape → Gather → Div → Slice) gains one block per round: torchvision's
    shufflenet_v2 needs 9 rounds.  The model computes the same values.
    """
    prepare_graph(model.graph)
    for _ in range(NORMALISE_ROUNDS):
        ShapeInferencePass(strict_mode=False, data_prop=True)(model)
        if not prepare_graph(model.graph):
            break
    # After the folding: a shape read is folded only when onnx itself proves it static.
    supplement_shapes(model)
    # The attention idioms may only show once the symbolic shapes are in (a TorchScript
    # ViT's packed projection is reshaped by a shape assembled at run time).
    for _ in range(4):
        if not fold_attention_idioms(model.graph):
            break
        ShapeInferencePass(strict_mode=False, data_prop=True)(model)
        supplement_shapes(model)


def _same(a: Path, b: Path) -> bool:
    """Whether two paths name one file: by inode where both exist (hardlinks), else resolved."""
    if a.exists() and b.exists() and os.path.samefile(a, b):
        return True
    return a.resolve() == b.resolve()


def data_path(output_path: str | os.PathLike) -> Path:
    """Where the output's external data goes when it has any: ``NAME.data`` beside it."""
    out = Path(output_path)
    return out.with_name(out.name + ".data")


def input_files(model_path: str | os.PathLike) -> list[Path]:
    """The model file and every external-data file it names (as far as it parses)."""
    p = Path(model_path)
    files = [p]
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception:  # not a model: load_model says so, in one line, later
        return files
    for tensor in _tensors(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = {e.key: e.value for e in tensor.external_data}.get("location", "")
            if location and (p.parent / location) not in files:
                files.append(p.parent / location)
    return files


def check_output_path(input_path: str | os.PathLike, output_path: str | os.PathLike) -> None:
    """Refuse an output that would overwrite the input or cannot be written, before any work."""
    src, dst = Path(input_path), Path(output_path)
    if dst.exists() and src.exists() and os.path.samefile(src, dst) or src.resolve() == dst.resolve():
        raise InputError(f"output path is the input model: {dst} (onnxprune never modifies its input)")
    for f in input_files(src)[1:]:
        if _same(f, dst):
            raise InputError(f"output path is the input model's external data file: {dst} (onnxprune never modifies its input)")
    for f in input_files(src):
        if _same(f, data_path(dst)):
            raise InputError(
                f"the output's data file would be {data_path(dst)}, which is an input file "
                "(onnxprune never modifies its input): choose another output name"
            )
    if dst.is_dir():
        raise InputError(f"output path is a folder: {dst}")
    _check_writable_folder(dst, "output")


def _check_writable_folder(dst: Path, what: str) -> None:
    parent = dst.resolve().parent
    if not parent.is_dir():
        raise InputError(f"{what} folder does not exist: {parent}")
    with deferred():  # a signal between the two calls would leave the probe behind
        try:
            fd, probe = tempfile.mkstemp(prefix=".onnxprune-probe-", dir=parent)
        except OSError as exc:
            raise InputError(f"{what} folder is not writable: {parent} ({exc.strerror})") from exc
        os.close(fd)
        os.unlink(probe)


def check_side_outputs(
    input_path: str | os.PathLike, output_path: str | os.PathLike | None,
    extras: list[tuple[str, str | os.PathLike | None]],
) -> None:
    """Refuse a report/plot/JSON path that names an input file, the output, the output's
    data file or another of these paths, or whose folder is missing or not writable:
    checked before any work, so nothing is touched."""
    taken = [(f"the input {'model' if i == 0 else 'external data file'}", f)
             for i, f in enumerate(input_files(input_path))]
    if output_path is not None:
        taken += [("the output model", Path(output_path)), ("the output's data file", data_path(output_path))]
    for flag, path in extras:
        if path is None:
            continue
        p = Path(path)
        for what, other in taken:
            if _same(p, other):
                raise InputError(f"{flag} {p} is {what}: choose another path")
        if p.is_dir():
            raise InputError(f"{flag} {p} is a folder")
        _check_writable_folder(p, flag)
        taken.append((f"the {flag} path", p))
def model_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save_model(
    model: ir.Model,
    output_path: str | os.PathLike,
    *,
    external: bool,
    validate: Callable[[Path], None],
) -> None:
    """Write ``model`` to ``output_path`` only after ``validate`` accepts the written file.

    The file (and ``NAME.data`` when ``external``, or when the model is too large for one
    protobuf) is written to a temporary folder beside the target, validated there, then
    renamed into place, so a failure leaves nothing behind.
    """
    out = Path(output_path)
    external = external or model_bytes(model) > EXTERNAL_DATA_THRESHOLD
    tmpdir = None
    try:
        with deferred():  # the folder exists only once the finally below will remove it
            tmpdir = Path(tempfile.mkdtemp(prefix=".onnxprune-", dir=out.resolve().parent))
        tmp_model = tmpdir / out.name
        data_name = f"{out.name}.data" if external else None
        ir.save(model, tmp_model, external_data=data_name)
        validate(tmp_model)
        with deferred():  # no signal between the two renames: never new data beside an old model
            if data_name:
                os.replace(tmpdir / data_name, out.resolve().parent / data_name)
            os.replace(tmp_model, out)
    finally:
        with deferred():
            if tmpdir is not None:
                shutil.rmtree(tmpdir, ignore_errors=True)
