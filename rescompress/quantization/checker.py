"""Structural checker for TensorRT explicit-quantization (Q/DQ) ONNX files.

``check_trt_qdq(model)`` returns the list of rule violations (empty means the file follows the rules
DESIGN decision 3 takes from TensorRT's "Q/DQ layer placement" guidance); ``trt_qdq_findings`` returns the
same with each marked *blocking* (TensorRT cannot import the file as INT8: rules 1, 2, 6, activation scales
that are not per-tensor, weight scales on the wrong axis) or not (an unquantized layer, Q/DQ on a Conv output,
an Add TensorRT cannot fuse: the engine still builds, with those layers in higher precision or unfused):

1. opset >= 13 (per-channel DequantizeLinear);
2. every QuantizeLinear/DequantizeLinear is int8 symmetric: int8 zero point(s) equal to 0, finite
   positive scales;
3. every Conv/Gemm/MatMul (not allowed to stay float) reads its activation through a per-tensor DQ and its
   weight through a per-channel DQ on the output-channel axis;
4. no Q/DQ on a Conv/Gemm output except where the dequantized value only feeds quantized inputs
   (another Conv, or an Add's residual input);
5. every Add fed by a Conv takes that Conv output directly and its other (residual) input through a DQ,
   so TensorRT can fuse Conv+Add in INT8;
6. no integer-kernel ops (QLinearConv, ConvInteger, ...) that TensorRT does not import.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

WEIGHTED = ("Conv", "Gemm", "MatMul")
INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QLinearAdd", "QGemm")
FLOAT_NODES_KEY = "rescompress.quantization.float_nodes"  # metadata: nodes kept float on purpose (JSON list)


@dataclass(frozen=True)
class Finding:
    message: str
    blocking: bool  # False: TensorRT still builds the layer, in higher precision or unfused


def recorded_float_nodes(model: onnx.ModelProto) -> tuple[str, ...]:
    """The nodes ``rescompress quantize`` kept in float on purpose (``--exclude``, ``--max-drop`` fallback),
    as recorded in the file's metadata; empty for files from elsewhere."""
    raw = next((p.value for p in model.metadata_props if p.key == FLOAT_NODES_KEY), None)
    try:
        names = json.loads(raw) if raw else []
    except json.JSONDecodeError:
        return ()
    return tuple(str(n) for n in names) if isinstance(names, list) else ()


def _const_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    vals = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    vals[n.output[0]] = numpy_helper.to_array(a.t)
    return vals


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def check_trt_qdq(model: onnx.ModelProto, allow_float: Collection[str] = ()) -> list[str]:
    """Violations of TensorRT's Q/DQ placement rules; ``allow_float`` names nodes deliberately kept float."""
    return [f.message for f in trt_qdq_findings(model, allow_float)]


def trt_qdq_findings(model: onnx.ModelProto, allow_float: Collection[str] = ()) -> list[Finding]:
    """:func:`check_trt_qdq`'s violations, each marked blocking or not."""
    problems: list[Finding] = []
    g = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        problems.append(Finding(f"opset {opset} < 13: per-channel Q/DQ needs opset 13 or newer", True))
    consts = _const_values(model)
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in g.node:
        for i, t in enumerate(n.input):
            consumers.setdefault(t, []).append((n, i))

    for n in g.node:
        if n.op_type in INTEGER_OPS:
            problems.append(Finding(
                f"{n.name}: {n.op_type} is an ONNX Runtime integer op, not a TensorRT Q/DQ graph", True))
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            problems.extend(Finding(m, True) for m in _check_qdq_params(n, consts))

    def through_dq(t: str) -> onnx.NodeProto | None:
        p = producer.get(t)
        return p if p is not None and p.op_type == "DequantizeLinear" else None

    for n in g.node:
        if n.op_type not in WEIGHTED or n.name in allow_float:
            continue
        dq_act = through_dq(n.input[0])
        if dq_act is None:
            problems.append(Finding(
                f"{n.name}: activation input {n.input[0]!r} is not quantized (no DequantizeLinear)", False))
        elif _scale_size(dq_act, consts) != 1:
            problems.append(Finding(f"{n.name}: activation quantization must be per-tensor", True))
        if len(n.input) > 1:
            dq_w = through_dq(n.input[1])
            if dq_w is None:
                problems.append(Finding(
                    f"{n.name}: weight {n.input[1]!r} is not quantized (no DequantizeLinear)", False))
            else:
                problems.extend(_check_weight_dq(n, dq_w, consts, producer))

    for q in g.node:
        if q.op_type != "QuantizeLinear":
            continue
        src = producer.get(q.input[0])
        if src is None or src.op_type not in WEIGHTED:
            continue
        readers = [c for dq, _ in consumers.get(q.output[0], []) for c in consumers.get(dq.output[0], [])]
        for node, _idx in readers:
            if node.op_type in WEIGHTED:
                continue
            if node.op_type == "Add" and _is_residual_edge(node, q, producer):
                continue
            problems.append(Finding(
                f"{src.name}: Q/DQ on a {src.op_type} output feeding {node.name} ({node.op_type}); "
                "TensorRT wants no Q/DQ on Conv/Gemm outputs", False))

    for n in g.node:
        if n.op_type != "Add" or n.name in allow_float or len(n.input) != 2:
            continue
        if any(t in consts for t in n.input):  # a bias (MatMul + Add, a Conv's bias split out), not a residual
            continue
        kinds = [_input_kind(t, producer) for t in n.input]
        if not any(k in ("conv", "dq(conv)") for k in kinds):
            continue
        if kinds.count("conv") != 1:
            problems.append(Finding(
                f"{n.name}: an Add fed by a Conv must take exactly one Conv output directly "
                f"(inputs are {kinds[0]}, {kinds[1]})", False))
        elif not any(k.startswith("dq") for k in kinds):
            problems.append(Finding(
                f"{n.name}: residual input of the Add is not quantized (Conv+Add cannot fuse in INT8)", False))
    return problems


def _input_kind(t: str, producer: dict[str, onnx.NodeProto]) -> str:
    p = producer.get(t)
    if p is None:
        return "graph input"
    if p.op_type in WEIGHTED:
        return "conv"
    if p.op_type == "DequantizeLinear":
        q = producer.get(p.input[0])
        src = producer.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
        return "dq(conv)" if src is not None and src.op_type in WEIGHTED else "dq"
    return p.op_type


def _is_residual_edge(add: onnx.NodeProto, q: onnx.NodeProto, producer: dict[str, onnx.NodeProto]) -> bool:
    """The Add reads this Q/DQ on one input and a Conv output directly on the other."""
    kinds = [_input_kind(t, producer) for t in add.input]
    return kinds.count("conv") == 1 and "dq(conv)" in kinds


def _scale_size(node: onnx.NodeProto, consts: dict[str, np.ndarray]) -> int | None:
    s = consts.get(node.input[1])
    return None if s is None else int(s.size)


def _check_qdq_params(n: onnx.NodeProto, consts: dict[str, np.ndarray]) -> list[str]:
    out = []
    scale = consts.get(n.input[1]) if len(n.input) > 1 else None
    if scale is None:
        out.append(f"{n.name}: scale is not a constant")
    elif not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
        out.append(f"{n.name}: scale must be finite and positive")
    zp = consts.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
    if zp is None:
        if n.op_type == "QuantizeLinear":
            out.append(f"{n.name}: no zero point (defaults to uint8); TensorRT needs int8 with zero point 0")
    elif zp.dtype != np.int8:
        out.append(f"{n.name}: zero point is {zp.dtype}; TensorRT needs int8")
    elif np.any(zp != 0):
        out.append(f"{n.name}: zero point must be 0 (symmetric quantization)")
    return out


def _check_weight_dq(
    node: onnx.NodeProto, dq: onnx.NodeProto, consts: dict[str, np.ndarray], producer: dict[str, onnx.NodeProto]
) -> list[Finding]:
    w = consts.get(dq.input[0])
    if w is None:  # float weight through Q -> DQ
        q = producer.get(dq.input[0])
        w = consts.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
    if w is None:
        return [Finding(f"{node.name}: weight is not a constant", True)]
    if node.op_type == "Gemm":
        expected_axis = 0 if _attr(node, "transB", 0) else 1
    elif node.op_type == "MatMul":
        expected_axis = 1
    else:
        expected_axis = 0
    axis = _attr(dq, "axis", 1)
    size = _scale_size(dq, consts)
    if size == 1 and w.shape[expected_axis] != 1:
        # TensorRT runs per-tensor weights too, with less accuracy.
        return [Finding(f"{node.name}: weight quantization must be per-channel (axis {expected_axis})", False)]
    if axis % w.ndim != expected_axis or size != w.shape[expected_axis]:
        return [Finding(
            f"{node.name}: weight DequantizeLinear must be per-channel on axis {expected_axis} "
            f"({w.shape[expected_axis]} scales), got axis {axis} with {size} scales", True)]
    return []
