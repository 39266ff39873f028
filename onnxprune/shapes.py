"""Shapes onnx's inference leaves unknown, filled in from onnxruntime's symbolic shape
inference (transformer shapes assembled at run time)."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import onnx_ir as ir

from ._graph import _generated, const_array

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
    filled = _flattening_reshapes(graph)
    unknown = _unknown(graph)
    if unknown and filled:
        # What reads a filled Reshape learns its dims from onnx's inference, run again with
        # the dims it invented forgotten (it keeps a dim already there, even its own unk__).
        from onnx_ir.passes.common import ShapeInferencePass

        for v in unknown:
            v.shape = None
        ShapeInferencePass(strict_mode=False, data_prop=True)(model)
        unknown = _unknown(graph)
    if not unknown:
        return filled
    SymbolicShapeInference = _symbolic_shape_inference()
    if SymbolicShapeInference is None:  # onnxruntime missing or built without its tools
        return filled
    proto = _structure_proto(model)
    try:
        logging.getLogger("onnxruntime.tools.symbolic_shape_infer").setLevel(logging.CRITICAL)
        with contextlib.redirect_stdout(io.StringIO()):
            inferred = _symbolic_infer(SymbolicShapeInference, proto)
    except Exception:
        return filled
    if inferred is None:
        return filled
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
    return filled + changed


def _unknown(graph: ir.Graph) -> list[ir.Value]:
    """The node outputs with a dim no one named (or no shape)."""
    return [v for node in graph for v in node.outputs
            if v.shape is None or any(not isinstance(d, int) and _generated(d) for d in v.shape)]


def _flattening_reshapes(graph: ir.Graph) -> int:
    """Fill the dims onnx leaves unknown behind a Reshape whose target onnxprune can read
    (:func:`_shape_value`: a constant, or the ``[Shape(x)[0], -1]`` exporters assemble), as
    a CNN's flatten before its classifier, ``[batch, 1280, 1, 1] → [batch, 1280]``: a -1 is
    the one symbolic dim the other dims do not account for.  onnx's inference does not
    divide symbols; this is the case a CNN needs, and it saves loading the symbolic pass
    (sympy) for it.  Returns the number of values whose shape got more specific."""
    changed = 0
    for node in graph:
        if node.op_type != "Reshape" or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        out, x = node.outputs[0], node.inputs[0]
        if x.shape is None or out.shape is None or not any(_generated(d) for d in out.shape):
            continue
        target = _shape_value(node.inputs[1])
        if target is None:
            continue
        dims = _reshaped(list(x.shape), target, node.attributes.get_int("allowzero", 0))
        if dims is None or len(dims) != len(out.shape):
            continue
        merged = [d if _generated(o) else o for o, d in zip(out.shape, dims)]  # a dim onnx named stays
        if any(isinstance(o, int) and o != d for o, d in zip(out.shape, dims)):
            continue  # onnx says otherwise: keep its shape
        out.shape = ir.Shape(merged)
        changed += 1
    return changed


def _shape_value(v: ir.Value, depth: int = 8) -> list | None:
    """The value of a 1-D shape tensor as dims (ints and symbolic dims): a constant, or
    ``Concat`` of ``Unsqueeze(Gather(Shape(x), i))`` and constants, as exporters assemble a
    flatten's shape; None for anything else."""
    arr = const_array(v)
    if arr is not None:
        return [int(t) for t in arr.reshape(-1)] if arr.ndim <= 1 and arr.dtype.kind in "iu" else None
    node = v.producer()
    if node is None or depth == 0 or node.domain not in ("", "ai.onnx"):
        return None
    op = node.op_type
    if op == "Shape":
        shape = node.inputs[0].shape
        if shape is None:
            return None
        start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", len(shape))
        return list(shape)[start:end]
    if op == "Concat":
        parts = [_shape_value(i, depth - 1) if i is not None else None for i in node.inputs]
        return None if any(p is None for p in parts) else [d for p in parts for d in p]
    if op in ("Unsqueeze", "Squeeze", "Cast") and node.inputs[0] is not None:
        return _shape_value(node.inputs[0], depth - 1)  # a 0-D or 1-D shape value keeps its elements
    if op == "Gather" and node.attributes.get_int("axis", 0) == 0 and len(node.inputs) == 2:
        data, idx = _shape_value(node.inputs[0], depth - 1), const_array(node.inputs[1])
        if data is None or idx is None:
            return None
        picked = idx.reshape(-1)
        if any(not -len(data) <= int(i) < len(data) for i in picked):
            return None
        return [data[int(i)] for i in picked]
    return None


def _reshaped(src: list, target: list[int], allowzero: int) -> list | None:
    """The dims of a Reshape of dims ``src`` to ``target``, or None where a -1 stands for
    more than one symbolic dim, or a dim of ``src`` is unknown."""
    if any(_generated(d) for d in src):
        return None
    dims = [src[i] if t == 0 and not allowzero and i < len(src) else t for i, t in enumerate(target)]
    if dims.count(-1) > 1:
        return None
    syms = [getattr(d, "value", d) for d in src if not isinstance(d, int)]
    ints = 1
    for d in src:
        ints *= d if isinstance(d, int) else 1
    for d in dims:
        if d == -1:
            continue
        if isinstance(d, int):
            if d <= 0 or ints % d:
                return None
            ints //= d
        elif getattr(d, "value", d) in syms:
            syms.remove(getattr(d, "value", d))
        else:
            return None
    if -1 not in dims:
        return dims if not syms and ints == 1 else None
    if not syms:
        rest = ints
    elif len(syms) == 1 and ints == 1:
        rest = syms[0]
    else:
        return None
    return [rest if d == -1 else d for d in dims]


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
