"""Turn a FP32 ONNX graph, a :class:`Placement` and a :class:`QuantPlan` into a Q/DQ ONNX model.

Activations get a QuantizeLinear -> DequantizeLinear pair with the plan's per-target parameters and the
chosen consumers read the dequantized tensor. Weights are stored pre-quantized (int8 initializers, a
quarter of the FP32 size) behind a per-channel DequantizeLinear (axis 0 for Conv, the output axis for
Gemm/MatMul). For ONNX Runtime the Conv/Gemm bias becomes int32 with scale ``s_in * s_w`` (what its
QLinearConv takes); TensorRT keeps float biases.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import helper, numpy_helper

from rescompress import __version__
from rescompress.errors import RescompressError
from rescompress.quantization.checker import FLOAT_NODES_KEY
from rescompress.quantization.placement import ALL_CONSUMERS, Placement
from rescompress.quantization.plan import QParams, QuantPlan

_NP_DTYPES = {"uint8": np.uint8, "int8": np.int8}
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def quantize_weight(w: np.ndarray, scales: np.ndarray, axis: int) -> np.ndarray:
    """Symmetric per-channel int8: ``round(w / scale)`` clipped to [-127, 127]."""
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.rint(w.astype(np.float64) / scales.astype(np.float64).reshape(shape))
    return np.clip(q, -127, 127).astype(np.int8)


def _zp_array(p: QParams) -> np.ndarray:
    return np.array(p.zero_point, dtype=_NP_DTYPES[p.dtype])


def emit_qdq(model: onnx.ModelProto, plan: QuantPlan, placement: Placement) -> onnx.ModelProto:
    """Return a new model with the placement's Q/DQ pairs inserted (``model`` is not changed)."""
    target = placement.target
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    new_nodes: dict[str, list[onnx.NodeProto]] = {}  # insert before the first node that reads the tensor
    new_inits: list[onnx.TensorProto] = []
    nodes_by_name = {n.name: n for n in g.node}
    act_scale: dict[tuple[str, int], float] = {}  # (node, input index) -> activation scale (for biases)
    # ONNX Runtime quantizes a float Conv/Gemm's weight itself (per-tensor) when a DequantizeLinear feeds it
    # (its WeightBiasQuantization pass): in its file, a layer kept in float reads the float tensor instead.
    keep_float = set(placement.float_nodes) if target == "onnxruntime" else set()
    keep_float = {n.name for n in g.node if n.name in keep_float and n.op_type in ("Conv", "ConvTranspose", "Gemm")}

    for q in placement.activations:
        p = plan.activation(q.calib).params[target]
        qname, dqname = f"{q.name}_quantized", f"{q.name}_dequantized"
        scale_name, zp_name = f"{q.name}_scale", f"{q.name}_zero_point"
        new_inits += [
            numpy_helper.from_array(np.array(p.scale, dtype=np.float32), scale_name),
            numpy_helper.from_array(_zp_array(p), zp_name),
        ]
        pair = [
            helper.make_node(
                "QuantizeLinear", [q.name, scale_name, zp_name], [qname], name=f"{q.name}_QuantizeLinear"
            ),
            helper.make_node(
                "DequantizeLinear", [qname, scale_name, zp_name], [dqname], name=f"{q.name}_DequantizeLinear"
            ),
        ]
        new_nodes.setdefault(q.name, []).extend(pair)
        edges = None if q.consumers == (ALL_CONSUMERS,) else {
            (e.rsplit(":", 1)[0], int(e.rsplit(":", 1)[1])) for e in q.consumers
        }
        for n in g.node:
            for i, t in enumerate(n.input):
                if t == q.name and (edges is None or (n.name, i) in edges) and n.name not in keep_float:
                    n.input[i] = dqname
                    act_scale[(n.name, i)] = p.scale

    for w in placement.weights:
        node = nodes_by_name[w.node]
        entry = plan.weight(w.initializer)
        if w.initializer not in inits:
            raise RescompressError(f"weight {w.initializer!r} of node {w.node!r} is not an initializer")
        wf = numpy_helper.to_array(inits[w.initializer]).astype(np.float32)
        scales = entry.scales
        if wf.shape[w.axis] != len(scales):
            raise RescompressError(
                f"the plan has {len(scales)} scales for {w.initializer!r} but it has {wf.shape[w.axis]} "
                "channels; recalibrate (drop --plan)"
            )
        base = f"{w.node}_{w.initializer}"
        new_inits += [
            numpy_helper.from_array(quantize_weight(wf, scales, w.axis), f"{base}_quantized"),
            numpy_helper.from_array(scales, f"{base}_scale"),
            numpy_helper.from_array(np.zeros(len(scales), np.int8), f"{base}_zero_point"),
        ]
        dq = helper.make_node(
            "DequantizeLinear", [f"{base}_quantized", f"{base}_scale", f"{base}_zero_point"],
            [f"{base}_dequantized"], name=f"{base}_DequantizeLinear", axis=w.axis,
        )
        new_nodes.setdefault(f"@node:{w.node}", []).append(dq)
        node.input[w.input_index] = f"{base}_dequantized"
        s_in = act_scale.get((w.node, 0))
        if target == "onnxruntime" and w.bias is not None and s_in is not None:
            bf = numpy_helper.to_array(inits[w.bias]).astype(np.float64)
            bscale = (s_in * scales.astype(np.float64)).astype(np.float32)
            bq = np.rint(bf / bscale.astype(np.float64))
            if np.any(bq < INT32_MIN) or np.any(bq > INT32_MAX):
                continue  # an int32 bias would overflow; the float bias stays (ORT still runs it)
            bidx = list(node.input).index(w.bias)
            new_inits += [
                numpy_helper.from_array(bq.astype(np.int32), f"{base}_bias_quantized"),
                numpy_helper.from_array(bscale, f"{base}_bias_scale"),
                numpy_helper.from_array(np.zeros(len(bscale), np.int32), f"{base}_bias_zero_point"),
            ]
            new_nodes[f"@node:{w.node}"].append(helper.make_node(
                "DequantizeLinear",
                [f"{base}_bias_quantized", f"{base}_bias_scale", f"{base}_bias_zero_point"],
                [f"{base}_bias_dequantized"], name=f"{base}_bias_DequantizeLinear", axis=0,
            ))
            node.input[bidx] = f"{base}_bias_dequantized"

    # Rebuild the node list in topological order: each Q/DQ pair right after its tensor's producer
    # (graph inputs: at the front), weight DQs right before their node.
    ordered: list[onnx.NodeProto] = []
    for t in [i.name for i in g.input]:
        ordered.extend(new_nodes.pop(t, []))
    for n in g.node:
        ordered.extend(new_nodes.pop(f"@node:{n.name}", []))
        ordered.append(n)
        for o in n.output:
            ordered.extend(new_nodes.pop(o, []))
    if new_nodes:
        raise RescompressError(f"cannot place Q/DQ on unknown tensors: {', '.join(sorted(new_nodes))[:200]}")
    del g.node[:]
    g.node.extend(ordered)
    used = {t for n in g.node for t in n.input}
    kept = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)
    # Drop stale graph inputs for removed initializers (old exporters list weights as inputs).
    keep_inputs = [i for i in g.input if i.name not in inits or i.name in used]
    del g.input[:]
    g.input.extend(keep_inputs)
    del g.value_info[:]  # shapes of rewired tensors changed name; ORT re-infers
    set_metadata(m, "rescompress.quantization.target", target)
    set_metadata(m, "rescompress.quantization.method", plan.provenance.method)
    set_metadata(m, FLOAT_NODES_KEY, json.dumps(list(placement.float_nodes)))
    set_metadata(m, "rescompress.precision", "int8")
    set_metadata(m, "rescompress.tool_version", __version__)
    return m


def set_metadata(m: onnx.ModelProto, key: str, value: str) -> None:
    for p in m.metadata_props:
        if p.key == key:
            p.value = value
            return
    m.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))


def save_model(model: onnx.ModelProto, path) -> None:
    """Check and write a model atomically."""
    from rescompress.fileio import atomic_path

    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise RescompressError(f"the emitted ONNX model is invalid: {str(exc).splitlines()[0]}") from exc
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
