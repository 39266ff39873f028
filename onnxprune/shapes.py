"""Shapes onnx's inference leaves unknown, filled in from onnxruntime's symbolic shape
inference (transformer shapes assembled at run time)."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import onnx_ir as ir

from ._graph import _generated

_SMALL_INIT = 1024  # larger initializers travel to the symbolic pass as typed inputs only


def _symbolic_shape_inference():
    """onnxruntime's ``SymbolicShapeInference`` class, loaded from its file alone: the
    ``onnxruntime.tools`` package imports torch whenever torch is installed, seconds of
    start-up for one class that needs only onnx and numpy."""
    import importlib.util
    import sys

    name = "onnxprune._ort_symbolic_shape_infer"
    if name not in sys.modules:
        spec = importlib.util.find_spec("onnxruntime")
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(list(spec.submodule_search_locations)[0]) / "tools" / "symbolic_shape_infer.py"
        if not path.is_file():
            return None
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception:  # noqa: BLE001 - a build without the tools' dependencies
            return None
        sys.modules[name] = module
    return getattr(sys.modules[name], "SymbolicShapeInference", None)


def _symbolic_infer(cls, proto):
    """``SymbolicShapeInference.infer_shapes(proto, auto_merge=True)`` without its file write.

    When the inference is incomplete, onnxruntime's ``infer_shapes`` saves the model as
    ``sym_shape_infer_temp.onnx`` (+ data) into the current directory, following any
    symlink planted there, before it raises.  Its steps are run here instead, returning
    None where it would save; if onnxruntime's internals ever change, the public call
    runs with the current directory switched to a private temporary folder.
    """
    steps = ("_preprocess", "_infer_impl", "_update_output_from_vi")
    if not all(hasattr(cls, step) for step in steps):
        return _in_private_cwd(lambda: cls.infer_shapes(proto, auto_merge=True, guess_output_rank=False))
    engine = cls(2**31 - 1, True, False, 0)  # int_max, auto_merge, guess_output_rank, verbose
    engine._preprocess(proto)
    complete = False
    while engine.run_:
        complete = engine._infer_impl()
    engine._update_output_from_vi()
    return engine.out_mp_ if complete else None


def _in_private_cwd(call):
    """Run ``call`` with the current directory in a fresh temporary folder (removed after)."""
    import os
    import tempfile

    here = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="onnxprune-cwd-") as d:
        os.chdir(d)
        try:
            return call()
        finally:
            os.chdir(here)


def supplement_shapes(model: ir.Model) -> int:
    """Fill the dims onnx's shape inference left unknown from onnxruntime's symbolic
    shape inference; returns the number of values whose shape got more specific.

    onnx's inference loses track of a transformer's shapes at the first Reshape whose
    shape is assembled at run time (``Shape → Gather → Concat``): every attention tensor
    ends up ``[unk, unk, unk, unk]``.  onnxruntime's symbolic pass computes through that
    arithmetic (``[batch, seq, 12, 32]``).  Only dims onnx left unknown are taken; a value
    whose static dims disagree between the two keeps onnx's shape.  Anything the symbolic
    pass cannot handle leaves the shapes as they were: it only ever adds knowledge.
    """
    graph = model.graph
    unknown = [
        v for node in graph for v in node.outputs
        if v.shape is None or any(not isinstance(d, int) and _generated(d) for d in v.shape)
    ]
    if not unknown:
        return 0
    SymbolicShapeInference = _symbolic_shape_inference()
    if SymbolicShapeInference is None:  # onnxruntime missing or built without its tools
        return 0
    proto = _structure_proto(model)
    try:
        logging.getLogger("onnxruntime.tools.symbolic_shape_infer").setLevel(logging.CRITICAL)
        with contextlib.redirect_stdout(io.StringIO()):
            inferred = _symbolic_infer(SymbolicShapeInference, proto)
    except Exception:
        return 0
    if inferred is None:
        return 0
    found: dict[str, list[int | str | None]] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            found[vi.name] = [
                d.dim_value if d.HasField("dim_value") else _ort_symbol(d.dim_param)
                for d in t.shape.dim
            ]
    changed = 0
    for value in unknown:
        sym = found.get(value.name)
        if sym is None or (value.shape is not None and len(sym) != len(value.shape)):
            continue
        old = list(value.shape) if value.shape is not None else [None] * len(sym)
        merged: list = []
        for a, b in zip(old, sym):
            if isinstance(a, int):
                if isinstance(b, int) and b != a:
                    break  # the two passes disagree: trust neither more than onnx
                merged.append(a)
            elif b is not None and _generated(a):  # a dim onnx named is never overridden
                merged.append(b)
            else:
                merged.append(a)
        else:
            if merged != old:
                value.shape = ir.Shape(merged)
                changed += 1
    return changed


def _ort_symbol(name: str) -> str | None:
    # onnxruntime numbers its own placeholders like onnx does: keep the two apart.
    if not name:
        return None
    return f"ort_{name}" if name.startswith("unk__") else name


def _structure_proto(model: ir.Model):
    """The graph as a ModelProto without its weights: large initializers become typed
    graph inputs, so the symbolic pass sees their shapes without a copy of their data."""
    import onnx

    graph = model.graph
    g = onnx.GraphProto(name=graph.name or "main")
    g.node.extend(ir.serde.serialize_node(node) for node in graph)
    g.input.extend(ir.serde.serialize_value(v) for v in graph.inputs)
    g.output.extend(ir.serde.serialize_value(v) for v in graph.outputs)
    inputs = {v.name for v in graph.inputs}
    for name, value in graph.initializers.items():
        tensor = value.const_value
        if tensor is None or name in inputs:
            continue
        if tensor.size <= _SMALL_INIT:
            g.initializer.append(ir.serde.serialize_tensor(tensor))
        else:
            g.input.append(onnx.helper.make_tensor_value_info(name, int(tensor.dtype), list(tensor.shape)))
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    proto = onnx.helper.make_model(g, opset_imports=opsets)
    proto.ir_version = model.ir_version
    return proto
