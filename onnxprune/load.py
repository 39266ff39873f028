"""Load stage (and the atomic save): refuse what cannot be pruned safely, in one line.

Checks, in order: the file exists and parses as ONNX; external-data paths stay inside
the model's folder and exist; the default-domain opset is 11 or newer; no quantized op
is present; onnx's checker accepts the model.  Then the model is loaded with onnx-ir
(external tensors stay lazy), exporter idioms are folded (constant-only index arithmetic,
static shape reads: see ``fold.prepare_graph``) and onnx shape inference fills in
intermediate shapes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from .canonical import fold_attention_idioms
from .fold import prepare_graph
from .shapes import supplement_shapes
from . import _temps
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
    _temps.phase("load")  # onnx's checker and parsers are native code: a crash is named
    if not p.exists():
        raise InputError(f"input model not found: {p}")
    if not p.is_file():
        raise InputError(f"input model is not a file: {p}")
    data = p.read_bytes()  # read once: parsed here, and by the checker from these bytes
    try:
        proto = onnx.load_model_from_string(data)
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
    try:  # external data is checked against the model's folder, so by path there
        onnx.checker.check_model(str(p) if external else data)
    except Exception as exc:
        raise InputError(f"{p} is not a valid ONNX model: {_one_line(exc)}") from exc
    del data
    try:  # ir.load(p) would parse the file a third time
        model = ir.serde.deserialize_model(proto)
        ir.external_data.set_base_dir(model.graph, p.parent)
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
    export: Shape → Gather → Div → Slice) gains one block per round (torchvision's
    shufflenet_v2: benchmarks/RESULTS.md, "Structural coverage").  The model computes the
    same values.
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


_case_insensitive: dict[tuple[int, int], bool] = {}


def case_insensitive(folder: Path) -> bool:
    """Whether ``folder``'s filesystem folds case (macOS, Windows, vfat, ext4 casefold):
    a probe file's case-swapped name names the same file.  Probed once per folder; a
    folder that cannot be probed (missing, not writable) counts as case-sensitive."""
    try:
        st = folder.stat()
    except OSError:
        return False
    key = (st.st_dev, st.st_ino)
    if key not in _case_insensitive:
        with deferred():  # a signal between the calls would leave the probe behind
            try:
                fd, probe = tempfile.mkstemp(prefix=_temps.prefix(), dir=folder)
            except OSError:
                return False
            try:
                os.close(fd)
                swapped = Path(probe).with_name(Path(probe).name.swapcase())
                _case_insensitive[key] = swapped.exists() and os.path.samefile(probe, swapped)
            finally:
                os.unlink(probe)
    return _case_insensitive[key]


def same_path(a: Path, b: Path, fold: Callable[[Path], bool] | None = None) -> bool:
    """Whether two paths name one file: by inode where both exist (hardlinks, and any
    spelling a case-folding filesystem accepts), else resolved; two paths that do not exist
    yet in one folder compare case-folded where ``fold(folder)`` says the filesystem folds
    case (default: :func:`case_insensitive`)."""
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    ra, rb = a.resolve(), b.resolve()
    if ra == rb:
        return True
    if ra.name.casefold() != rb.name.casefold():
        return False
    if not (ra.parent.is_dir() and rb.parent.is_dir() and os.path.samefile(ra.parent, rb.parent)):
        return False
    return (fold or case_insensitive)(ra.parent)


_same = same_path


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` would be written inside ``folder`` (or is it): an ancestor of it is
    ``folder`` resolved, or the same directory by inode (a bind mount, another spelling)."""
    if not folder.is_dir():
        return False
    p = path.resolve()
    for ancestor in (p, *p.parents):
        if ancestor.is_dir() and os.path.samefile(ancestor, folder):
            return True
    return False


# The output's data file: NAME.<16 hex digits of the data's sha256>.data beside it.
_DATA_DIGITS = 16


def data_name(output_name: str, digest: str) -> str:
    """The output's data file name for data whose sha256 is ``digest``.

    Content-addressed rather than unique per write: the same inputs and seed give the same
    bytes, so the same name, and the model that embeds the name stays byte-identical; two
    writers with different data get different names, so a model can only ever point at
    its own data (the model is renamed into place last)."""
    return f"{output_name}.{digest[:_DATA_DIGITS]}.data"


def is_output_data(output_path: str | os.PathLike, candidate: str | os.PathLike,
                   fold: Callable[[Path], bool] | None = None) -> bool:
    """Whether ``candidate`` (as named, or the file it links to) is or would be a data file
    of the output: beside it, named ``NAME.<hex>.data`` (or ``NAME.data``, the name before
    content addressing)."""
    out = Path(output_path)
    folder = out.parent.resolve()
    if not folder.is_dir():
        return False
    c = Path(candidate)
    for spelling in {c.parent.resolve() / c.name, c.resolve()}:
        if not (spelling.parent.is_dir() and os.path.samefile(spelling.parent, folder)):
            continue
        name, stem = spelling.name, out.name
        if (fold or case_insensitive)(folder):
            name, stem = name.casefold(), stem.casefold()
        if name == f"{stem}.data":
            return True
        if name.startswith(stem + ".") and name.endswith(".data"):
            middle = name[len(stem) + 1:-len(".data")]
            if len(middle) == _DATA_DIGITS and all(ch in "0123456789abcdef" for ch in middle):
                return True
    return False


def output_data_files(output_path: str | os.PathLike) -> list[Path]:
    """The content-addressed data files of the output that exist beside it now."""
    out = Path(output_path)
    folder = out.parent.resolve()
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    candidates = [n for n in names if n.startswith(out.name + ".") and n.endswith(".data") and n != f"{out.name}.data"]
    return [folder / n for n in candidates if is_output_data(out, folder / n, fold=lambda _: False)]


# input_files' answers by the model file's identity: the checks ask before the run and
# the save again after it, and each answer parses the whole message (weights included
# when they are inline: hundreds of MB).
_input_files: dict[tuple, list[Path]] = {}


def input_files(model_path: str | os.PathLike) -> list[Path]:
    """The model file and every external-data file it names (as far as it parses)."""
    p = Path(model_path)
    try:
        st = p.stat()
        key: tuple | None = (str(p), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        key = None
    if key in _input_files:
        return list(_input_files[key])
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
    if key is not None:
        _input_files[key] = list(files)
    return files


def _data_inputs(reads: dict[str, str | os.PathLike | None] | None) -> list[tuple[str, Path]]:
    """``--calib``/``--eval``/``--labels`` given as paths (the API also takes readers)."""
    return [(flag, Path(v)) for flag, v in (reads or {}).items() if isinstance(v, (str, os.PathLike))]


def _check_not_over_data(flag: str, path: Path, reads: dict[str, str | os.PathLike | None] | None) -> None:
    """Refuse a written path that is a ``--calib``/``--eval``/``--labels`` file or lies
    inside one of their folders."""
    for what, src in _data_inputs(reads):
        if _inside(path, src) if src.is_dir() else _same(path, src):
            where = "inside the" if src.is_dir() else "the"
            raise InputError(f"{flag} {path} is {where} {what} path {src}: onnxprune never writes into its inputs")


def check_output_path(input_path: str | os.PathLike, output_path: str | os.PathLike,
                      reads: dict[str, str | os.PathLike | None] | None = None) -> None:
    """Refuse an output that would overwrite the input, land in or on a data input
    (``reads``: flag -> path), or cannot be written, before any work."""
    src, dst = Path(input_path), Path(output_path)
    if _same(src, dst):
        raise InputError(f"output path is the input model: {dst} (onnxprune never modifies its input)")
    for f in input_files(src)[1:]:
        if _same(f, dst):
            raise InputError(f"output path is the input model's external data file: {dst} (onnxprune never modifies its input)")
    for f in input_files(src):
        if is_output_data(dst, f):
            raise InputError(
                f"the output's data file would be named like {f} ({dst.name}.<hash>.data), which is an input file "
                "(onnxprune never modifies its input): choose another output name"
            )
    _check_not_over_data("the output", dst, reads)
    if dst.is_dir():
        raise InputError(f"output path is a folder: {dst}")
    _check_writable_folder(dst, "output")


def _check_writable_folder(dst: Path, what: str) -> None:
    parent = dst.parent.resolve()  # a link at dst is replaced by the file, never written through
    if not parent.is_dir():
        raise InputError(f"{what} folder does not exist: {parent}")
    with deferred():  # a signal between the two calls would leave the probe behind
        try:
            fd, probe = tempfile.mkstemp(prefix=_temps.prefix(), dir=parent)
        except OSError as exc:
            raise InputError(f"{what} folder is not writable: {parent} ({exc.strerror})") from exc
        os.close(fd)
        os.unlink(probe)


def check_side_outputs(
    input_path: str | os.PathLike, output_path: str | os.PathLike | None,
    extras: list[tuple[str, str | os.PathLike | None]],
    reads: dict[str, str | os.PathLike | None] | None = None,
) -> None:
    """Refuse a report/plot/JSON path that names an input file, the output, the output's
    data file or another of these paths, lies in or on a data input (``reads``: flag ->
    path), or whose folder is missing or not writable: checked before any work, so nothing
    is touched."""
    taken = [(f"the input {'model' if i == 0 else 'external data file'}", f)
             for i, f in enumerate(input_files(input_path))]
    if output_path is not None:
        taken.append(("the output model", Path(output_path)))
    for flag, path in extras:
        if path is None:
            continue
        p = Path(path)
        for what, other in taken:
            if _same(p, other):
                raise InputError(f"{flag} {p} is {what}: choose another path")
        if output_path is not None and is_output_data(output_path, p):
            raise InputError(f"{flag} {p} is named like the output's data file: choose another path")
        _check_not_over_data(flag, p, reads)
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
) -> Path:
    """Write ``model`` to ``output_path`` only after ``validate`` accepts the written file;
    returns where the model file is now.

    The file (and its data file when ``external``, or when the model is too large for one
    protobuf: ``NAME.<hash>.data``, see :func:`data_name`) is written to a temporary folder
    beside the target, validated there, then committed by :func:`_commit`, so a failure
    leaves nothing behind.  Inside :func:`one_commit` naming this output, the validated
    files stay staged (the returned path is in the temp folder) until the block ends.
    Stale temp folders of killed runs beside the target go first.
    """
    out = _target(output_path)
    folder = out.parent
    external = external or model_bytes(model) > EXTERNAL_DATA_THRESHOLD
    _temps.remove_stale(folder)
    tmpdir = None
    try:
        with deferred():  # the folder exists only once the finally below will remove it
            tmpdir = Path(tempfile.mkdtemp(prefix=_temps.prefix(), dir=folder))
            _temps.created(tmpdir)
        _temps.phase("verify")
        # Staged under a fixed .onnx name: onnx and onnx_ir pick the serialisation from the
        # suffix, so an output called "x.json" would be written and checked as JSON text.
        tmp_model = tmpdir / "model.onnx"
        data = None
        if external:
            staged = f"{out.name}.data"
            ir.save(model, tmp_model, external_data=staged)
            data = data_name(out.name, _sha256(tmpdir / staged))
            os.rename(tmpdir / staged, tmpdir / data)
            _relocate(tmp_model, staged, data)
        else:
            ir.save(model, tmp_model)
        validate(tmp_model)
        txn = claimed(out)
        if txn is not None:
            with deferred():  # the transaction removes the folder from now on
                txn.models.append((tmpdir, data, out))
                tmpdir = None
            return tmp_model
        _commit(tmp_model, data, out)
        return out
    finally:
        with deferred():
            if tmpdir is not None:
                shutil.rmtree(tmpdir, ignore_errors=True)


def _target(path: str | os.PathLike) -> Path:
    """Where a written path lands: its folder resolved, its own name kept (a link there is
    replaced by the file, never written through)."""
    p = Path(path)
    return p.parent.resolve() / p.name


class Commit:
    """The outputs of one run, staged and validated, to be renamed into place together."""

    def __init__(self, paths: list[str | os.PathLike | None]) -> None:
        self.targets = {_target(p) for p in paths if p is not None}
        self.models: list[tuple[Path, str | None, Path]] = []  # (temp folder, data file name, target)
        self.files: list[tuple[Path, Path]] = []  # (temp file, target)

    def commit(self) -> None:
        """Rename every staged file into place, with no signal in between: the side files
        first, the model last (its data file before it)."""
        with deferred():
            for tmp, target in self.files:
                os.replace(tmp, target)
            for tmpdir, data, out in self.models:
                _commit(tmpdir / "model.onnx", data, out)

    def discard(self) -> None:
        """Remove whatever is still staged."""
        with deferred():
            for tmp, _ in self.files:
                tmp.unlink(missing_ok=True)
            for tmpdir, _, _ in self.models:
                shutil.rmtree(tmpdir, ignore_errors=True)


_transactions: list[Commit] = []


def claimed(target: Path) -> Commit | None:
    """The open :func:`one_commit` that holds ``target`` back, if any."""
    return next((t for t in reversed(_transactions) if target in t.targets), None)


@contextlib.contextmanager
def one_commit(*paths: str | os.PathLike | None) -> Iterator[Commit]:
    """Hold back the writes of ``paths`` (the output model, ``--report``, ``--plot``) made
    inside the block (by :func:`save_model` and ``report.atomic_write``): each is staged and
    validated beside its target, and all are renamed into place when the block ends without
    an error.  An error or a signal in the block (the plot's sweep, the report) leaves
    nothing written."""
    txn = Commit(list(paths))
    _transactions.append(txn)
    try:
        yield txn
        _transactions.remove(txn)
        txn.commit()
    finally:
        if txn in _transactions:
            _transactions.remove(txn)
        txn.discard()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _relocate(model_file: Path, old: str, new: str) -> None:
    """Point the external tensors of ``model_file`` at ``new`` instead of ``old``."""
    proto = onnx.load(str(model_file), load_external_data=False)
    for tensor in _tensors(proto.graph):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    model_file.write_bytes(proto.SerializeToString())


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``folder`` itself (no lock file is created): the
    commits of concurrent onnxprune writers into one folder run one after the other.
    Yields False where the folder cannot be locked (no ``fcntl``, some network
    filesystems)."""
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            locked = True
        except OSError:
            locked = False
        yield locked
    finally:
        os.close(fd)  # closing releases the lock


def _commit(tmp_model: Path, data: str | None, out: Path) -> None:
    """Move a validated model (and its data file) into place: the data file first, the
    model last, so a reader of ``out`` never gets a model without its data or with another
    write's data.  Under the folder lock (concurrent onnxprune writers commit one at a
    time), the data files of earlier writes of this output are removed once the new model
    is in place: nothing refers to them any more.  Without the lock they are left."""
    folder = out.parent
    with _folder_lock(folder) as locked, deferred():  # no signal between the renames
        if data:
            os.replace(tmp_model.parent / data, folder / data)
        os.replace(tmp_model, out)
        if locked:
            for old in output_data_files(out):
                if old.name != data and (old.is_symlink() or old.is_file()):  # a folder so named is not ours
                    try:
                        old.unlink()
                    except OSError:  # the new model is in place: a leftover file must not fail the run
                        pass
