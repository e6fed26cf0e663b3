"""Where Q/DQ pairs go, per target, decided from the FP32 ONNX graph alone.

Two rule sets over the same graph (DESIGN decision 3):

* **onnxruntime** — ORT picks an integer kernel only where a node's inputs *and* output are quantized, so
  every Conv/Add/GlobalAveragePool gets Q/DQ on its activation inputs and on its output; when that output
  feeds only a ReLU, the ReLU's output is quantized instead (uint8 with zero point 0: ORT folds the ReLU
  into the quantize). Data-movement ops (MaxPool, Flatten, Reshape) reuse their input's parameters so ORT
  drops the Q/DQ around them. Gemm/MatMul outputs (the logits) stay float.
* **tensorrt** — TensorRT's explicit-quantization rules: Q/DQ on the activation input of every
  Conv/Gemm/MatMul, none on their outputs, and Q/DQ on the residual (identity) input of each Add whose
  other input comes from a Conv, so TensorRT fuses Conv+Add(+ReLU) in INT8.

Weights are quantized per output channel on both targets. Nodes matched by ``exclude`` patterns stay in
float; op types the rules do not know are left float and reported. :func:`prepare_model` first turns
constants written as ``Constant`` or ``Identity`` nodes into initializers and rewrites a ``ReduceMean`` over
both spatial axes (how PyTorch's dynamo exporter writes global average pooling) as ``GlobalAveragePool``, so
files from other exporters get the same placement as the ones this project exports.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

import onnx

from rescompress.errors import RescompressError, UsageError

WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
ORT_OUTPUT_OPS = ("Conv", "Add", "GlobalAveragePool", "AveragePool")
PASS_THROUGH_OPS = ("MaxPool", "Flatten", "Reshape")
FLOAT_OK_OPS = ("Relu", "Identity", "Constant", "Shape", "Gather", "Unsqueeze", "Concat", "Squeeze")
OUTPUT_HEAD_OPS = ("Softmax", "LogSoftmax", "Sigmoid")  # float without a warning when they give a graph output
ALL_CONSUMERS = "*"


@dataclass(frozen=True)
class QuantizedTensor:
    """One Q/DQ pair: on ``name`` with the calibrated parameters of ``calib``, feeding ``consumers``.

    ``consumers`` is ``("*",)`` when every reader of the tensor takes the quantized value (a quantized
    output), else the ``"node_name:input_index"`` edges that do.
    """

    name: str
    calib: str
    consumers: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "calib": self.calib, "consumers": list(self.consumers)}


@dataclass(frozen=True)
class QuantizedWeight:
    node: str
    initializer: str
    input_index: int
    axis: int
    bias: str | None  # bias initializer of the node, if any

    def to_dict(self) -> dict:
        return {"node": self.node, "initializer": self.initializer, "axis": self.axis, "bias": self.bias}


@dataclass(frozen=True)
class Placement:
    target: str
    activations: tuple[QuantizedTensor, ...]
    weights: tuple[QuantizedWeight, ...]
    quantized_nodes: tuple[str, ...]
    float_nodes: tuple[str, ...]  # excluded by pattern or by accuracy fallback
    unsupported: tuple[str, ...]  # "name (OpType)" left float because the rules do not know the op

    def calib_tensors(self) -> set[str]:
        return {q.calib for q in self.activations}

    def to_dict(self) -> dict:
        return {
            "target": self.target,
            "activations": [a.to_dict() for a in self.activations],
            "weights": [w.to_dict() for w in self.weights],
            "quantized_nodes": list(self.quantized_nodes),
            "float_nodes": list(self.float_nodes),
            "unsupported": list(self.unsupported),
        }


class GraphIndex:
    """Producers, consumers and constants of one ONNX graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.model = model
        self.nodes = list(g.node)
        self.by_name = {n.name: n for n in self.nodes}
        self.initializers = {i.name: i for i in g.initializer}
        self.constants = set(self.initializers) | {
            o for n in self.nodes if n.op_type == "Constant" for o in n.output
        }
        self.graph_inputs = [i.name for i in g.input if i.name not in self.initializers]
        self.graph_outputs = {o.name for o in g.output}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for n in self.nodes:
            for o in n.output:
                self.producer[o] = n
            for i, t in enumerate(n.input):
                if t:
                    self.consumers.setdefault(t, []).append((n, i))

    def is_activation(self, tensor: str) -> bool:
        return bool(tensor) and tensor not in self.constants

    def relu_only_inputs(self) -> dict[str, str]:
        """Tensors read by nothing but one Relu (and not graph outputs) -> that Relu's output.

        Such a tensor's range below zero never matters: whatever quantizes it, the Relu zeroes the negative
        part. So it can take its Relu output's range instead of being observed during calibration, which
        would keep ONNX Runtime from fusing the Relu into the producing convolution.
        """
        out = {}
        for t, uses in self.consumers.items():
            only_relu = len(uses) == 1 and uses[0][0].op_type == "Relu"
            if only_relu and t not in self.graph_outputs and self.is_activation(t):
                out[t] = uses[0][0].output[0]
        return out

    def float_activations(self) -> list[str]:
        """Every activation tensor (graph input and node outputs), for a full calibration cache."""
        names = list(self.graph_inputs)
        for n in self.nodes:
            if n.op_type in ("Constant", "Shape", "Gather", "Unsqueeze", "Concat"):
                continue
            names.extend(o for o in n.output if o)
        return names


def prepare_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every node a unique name (placement and emitters address nodes by name); check the opset."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise RescompressError(
            f"the ONNX model uses opset {opset}; per-channel Q/DQ needs opset >= 13 (re-export with opset 17)"
        )
    m = onnx.ModelProto()
    m.CopyFrom(model)
    seen: set[str] = set()
    for i, n in enumerate(m.graph.node):
        if not n.name or n.name in seen:
            n.name = f"{n.op_type}_{i}"
        seen.add(n.name)
    from rescompress.export import constants_to_initializers

    constants_to_initializers(m)
    _spatial_means_to_gap(m)
    return m


def _spatial_means_to_gap(m: onnx.ModelProto) -> None:
    """Rewrite ``ReduceMean`` over both spatial axes of a 4-D tensor as ``GlobalAveragePool`` (in place).

    PyTorch's dynamo exporter writes ``x.mean((2, 3))`` and torchvision's ``AdaptiveAvgPool2d(1)`` that way;
    as a GlobalAveragePool it gets an integer kernel in ORT (QLinearGlobalAveragePool) instead of staying
    float. ``keepdims=0`` becomes GlobalAveragePool + Flatten. The result is the same mean.
    """
    from onnx import helper, numpy_helper

    candidates = [n for n in m.graph.node if n.op_type == "ReduceMean"]
    if not candidates:
        return
    try:
        ranks = {v.name: len(v.type.tensor_type.shape.dim)
                 for v in onnx.shape_inference.infer_shapes(m).graph.value_info if v.type.HasField("tensor_type")}
    except Exception:  # shape inference is a convenience here: without it nothing is rewritten
        return
    ranks.update({v.name: len(v.type.tensor_type.shape.dim) for v in m.graph.input})
    consts = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}  # Constant nodes are gone by now
    new_nodes = []
    for n in m.graph.node:
        if n.op_type != "ReduceMean" or ranks.get(n.input[0]) != 4:
            new_nodes.append(n)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        axes = attrs.get("axes")
        if axes is None and len(n.input) > 1 and n.input[1] in consts:
            axes = consts[n.input[1]].tolist()
        if axes is None or sorted(a % 4 for a in axes) != [2, 3]:
            new_nodes.append(n)
            continue
        if attrs.get("keepdims", 1):
            new_nodes.append(helper.make_node("GlobalAveragePool", [n.input[0]], [n.output[0]], name=n.name))
        else:
            pooled = f"{n.output[0]}_pooled"
            new_nodes.append(helper.make_node("GlobalAveragePool", [n.input[0]], [pooled], name=n.name))
            new_nodes.append(helper.make_node("Flatten", [pooled], [n.output[0]], name=f"{n.name}_flatten", axis=1))
    del m.graph.node[:]
    m.graph.node.extend(new_nodes)


def matches(node: onnx.NodeProto, patterns: Iterable[str], constants: Iterable[str] = ()) -> bool:
    """A node matches a glob if its name, one of its outputs or one of its weights (constants) does.

    Activation inputs do not count: ``/conv1/*`` must not also catch the ReLU that reads conv1's output.
    """
    consts = set(constants)
    names = [node.name, *node.output, *(t for t in node.input if t in consts)]
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names if n)


def check_patterns(model: onnx.ModelProto, patterns: Iterable[str]) -> None:
    """Refuse an ``--exclude`` glob that matches no node: a typo would otherwise exclude nothing, silently."""
    idx = GraphIndex(model)
    for p in patterns:
        if not any(matches(n, (p,), idx.constants) for n in idx.nodes):
            examples = ", ".join(repr(n.name) for n in idx.nodes if n.op_type in WEIGHTED_OPS)
            raise UsageError(f"--exclude {p!r} matches no node; names look like {examples[:160]}... "
                             "(globs: '/conv1/*', '*layer4*')")


def _weight_axis(node: onnx.NodeProto) -> int:
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul":
        return 1
    return 0


def _weight_of(idx: GraphIndex, node: onnx.NodeProto) -> QuantizedWeight | None:
    if len(node.input) < 2 or node.input[1] not in idx.initializers:
        return None
    if not idx.is_activation(node.input[0]):
        return None
    bias = node.input[2] if len(node.input) > 2 and node.input[2] in idx.initializers else None
    if node.op_type == "Gemm":
        trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
        if trans_a:
            return None
    return QuantizedWeight(node.name, node.input[1], 1, _weight_axis(node), bias)


class _Builder:
    def __init__(self) -> None:
        self.tensors: dict[str, tuple[str, set[str]]] = {}  # name -> (calib, consumer edges or {"*"})

    def output(self, name: str, calib: str) -> None:
        self.tensors[name] = (calib, {ALL_CONSUMERS})

    def edge(self, name: str, node: str, index: int) -> None:
        calib, edges = self.tensors.setdefault(name, (name, set()))
        if ALL_CONSUMERS not in edges:
            edges.add(f"{node}:{index}")

    def result(self) -> tuple[QuantizedTensor, ...]:
        out = []
        for name, (calib, edges) in self.tensors.items():
            consumers = (ALL_CONSUMERS,) if ALL_CONSUMERS in edges else tuple(sorted(edges))
            out.append(QuantizedTensor(name, calib, consumers))
        return tuple(out)


def place(model: onnx.ModelProto, target: str, exclude: Iterable[str] = ()) -> Placement:
    """Decide the Q/DQ placement of ``target`` ("onnxruntime" | "tensorrt") on a prepared model."""
    if target not in ("onnxruntime", "tensorrt"):
        raise UsageError(f"unknown target {target!r}; choose onnxruntime or tensorrt")
    idx = GraphIndex(model)
    patterns = tuple(exclude)
    excluded = [n.name for n in idx.nodes if patterns and matches(n, patterns, idx.constants)]
    excluded_set = set(excluded)
    return (_place_ort if target == "onnxruntime" else _place_trt)(idx, excluded_set, tuple(excluded))


def _unsupported(idx: GraphIndex, known: tuple[str, ...]) -> tuple[str, ...]:
    """Nodes left in float that are worth reporting: not a known op, not a float-by-design one, and not the
    probability head (Softmax and the like) some models end with, which belongs in float like the logits."""
    return tuple(
        f"{n.name} ({n.op_type})" for n in idx.nodes
        if n.op_type not in known + FLOAT_OK_OPS
        and not (n.op_type in OUTPUT_HEAD_OPS and all(o in idx.graph_outputs for o in n.output))
    )


def _place_ort(idx: GraphIndex, excluded: set[str], excluded_list: tuple[str, ...]) -> Placement:
    b = _Builder()
    weights: list[QuantizedWeight] = []
    quantized: list[str] = []
    out_q: dict[str, str] = {}  # tensor quantized as an output -> its calib tensor
    for n in idx.nodes:
        if n.name in excluded:
            continue
        op = n.op_type
        if op in WEIGHTED_OPS:
            w = _weight_of(idx, n)
            if w is None:
                continue
            weights.append(w)
            b.edge(n.input[0], n.name, 0)
            quantized.append(n.name)
            if op == "Conv":
                _quantize_output(idx, b, n, excluded, out_q)
        elif op == "Add":
            ins = [t for t in n.input if t]
            if len(ins) != 2 or not all(idx.is_activation(t) for t in ins):
                continue
            for i, t in enumerate(n.input):
                b.edge(t, n.name, i)
            quantized.append(n.name)
            _quantize_output(idx, b, n, excluded, out_q)
        elif op in ("GlobalAveragePool", "AveragePool"):
            b.edge(n.input[0], n.name, 0)
            quantized.append(n.name)
            _quantize_output(idx, b, n, excluded, out_q)
        elif op in PASS_THROUGH_OPS:
            src = n.input[0]
            if src in out_q and n.output[0] not in idx.graph_outputs:
                # Same parameters on both sides: ORT then runs the op directly on uint8.
                b.edge(src, n.name, 0)
                out_q[n.output[0]] = out_q[src]
                b.output(n.output[0], out_q[src])
                quantized.append(n.name)
    unsupported = _unsupported(idx, WEIGHTED_OPS + ORT_OUTPUT_OPS + PASS_THROUGH_OPS)
    return Placement("onnxruntime", b.result(), tuple(weights), tuple(quantized), excluded_list, unsupported)


def _quantize_output(
    idx: GraphIndex, b: _Builder, node: onnx.NodeProto, excluded: set[str], out_q: dict[str, str]
) -> None:
    out = node.output[0]
    readers = idx.consumers.get(out, [])
    if len(readers) == 1 and readers[0][0].op_type == "Relu" and out not in idx.graph_outputs:
        relu = readers[0][0]
        if relu.name not in excluded:
            out = relu.output[0]
    if out in idx.graph_outputs:
        return
    b.output(out, out)
    out_q[out] = out


def _from_conv(idx: GraphIndex, tensor: str) -> bool:
    p = idx.producer.get(tensor)
    return p is not None and p.op_type in ("Conv", "Gemm", "MatMul")


def _place_trt(idx: GraphIndex, excluded: set[str], excluded_list: tuple[str, ...]) -> Placement:
    b = _Builder()
    weights: list[QuantizedWeight] = []
    quantized: list[str] = []
    for n in idx.nodes:
        if n.name in excluded:
            continue
        if n.op_type in WEIGHTED_OPS:
            w = _weight_of(idx, n)
            if w is None:
                continue
            weights.append(w)
            b.edge(n.input[0], n.name, 0)
            quantized.append(n.name)
        elif n.op_type == "Add":
            ins = list(n.input)
            if len(ins) != 2 or not all(idx.is_activation(t) for t in ins):
                continue
            from_conv = [_from_conv(idx, t) for t in ins]
            if not any(from_conv):
                continue
            # Both from convs (a downsample block): the second input is the shortcut in torchvision's
            # ``out += identity``; quantize it so the first conv fuses with the Add.
            residual = 1 if all(from_conv) else from_conv.index(False)
            b.edge(ins[residual], n.name, residual)
            quantized.append(n.name)
    unsupported = _unsupported(
        idx, WEIGHTED_OPS + ("Add", "GlobalAveragePool", "AveragePool") + PASS_THROUGH_OPS
    )
    return Placement("tensorrt", b.result(), tuple(weights), tuple(quantized), excluded_list, unsupported)
