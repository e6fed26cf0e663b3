"""File size, parameter count and MACs of a model as a runner sees it (torch module or ONNX file).

For torch modules the counts come from :mod:`rescompress.profile` (params as folded: a BatchNorm counts as
the one bias per channel it becomes, as in the exported file). For ONNX files ``params`` is the
number of weight and bias elements of the Conv/Gemm/MatMul layers (``profile.count_onnx_params``: quantized
weights count once, scales and zero points not at all), and MACs are computed from
Conv/ConvInteger/QLinearConv and Gemm/MatMul shapes after ONNX
shape inference with the batch fixed to 1; if any such node has an unknown shape, ``macs`` is ``None``
rather than a partial count.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from rescompress.errors import RescompressError
from rescompress.profile import count_onnx_params
from rescompress.runtimes import runner_info


@dataclass(frozen=True)
class ModelStats:
    file_bytes: int | None
    params: int | None
    macs: int | None  # multiply-accumulates of one image at the measured input size

    def to_dict(self) -> dict:
        return asdict(self)


_CONV_WEIGHT_INPUT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}
_MATMUL_OPS = {"MatMul", "MatMulInteger", "QLinearMatMul"}


def onnx_params_macs(path: Path | str, input_shape: tuple[int, ...]) -> tuple[int, int | None]:
    """(initializer elements, MACs at ``input_shape`` with batch 1) of an ONNX classifier file."""
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise RescompressError(f"cannot read ONNX file {path}: {exc}") from exc
    graph = model.graph
    init_names = {t.name for t in graph.initializer}
    from rescompress.quantization.stem import stem_kernels

    kernels = stem_kernels(model)
    params = count_onnx_params(graph, kernels)
    shape = (1, *tuple(input_shape)[1:])
    for inp in graph.input:
        if inp.name in init_names:
            continue
        dims = inp.type.tensor_type.shape.dim
        if len(dims) == len(shape):
            for d, v in zip(dims, shape, strict=True):
                d.ClearField("dim_param")
                d.dim_value = int(v)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        return params, None
    shapes: dict[str, tuple[int, ...]] = {}
    for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = tuple(d.dim_value for d in dims)
    for t in graph.initializer:
        shapes[t.name] = tuple(t.dims)
    macs = 0
    for node in inferred.graph.node:
        out = shapes.get(node.output[0]) if node.output else None
        if node.op_type in _CONV_WEIGHT_INPUT:
            w = shapes.get(node.input[_CONV_WEIGHT_INPUT[node.op_type]])
            if out is None or w is None:
                return params, None
            # each output: (in/groups) * kh * kw products (a space-to-depth stem's zero taps left out)
            macs += math.prod(out) * kernels.get(node.name, math.prod(w[1:]))
        elif node.op_type == "Gemm":
            a = shapes.get(node.input[0])
            if out is None or a is None:
                return params, None
            trans_a = next((att.i for att in node.attribute if att.name == "transA"), 0)
            macs += math.prod(out) * (a[0] if trans_a else a[-1])
        elif node.op_type in _MATMUL_OPS:
            a = shapes.get(node.input[0])
            if out is None or a is None:
                return params, None
            macs += math.prod(out) * a[-1]
    return params, macs


def runner_stats(runner, input_shape: tuple[int, ...]) -> ModelStats:
    """Size, params and MACs for whatever ``runner`` runs (torch module or model file)."""
    source = Path(runner_info(runner).source)
    file_bytes = source.stat().st_size if source.is_file() else None
    module = getattr(runner, "module", None)
    if module is not None:
        from rescompress.profile import count_folded_params, count_macs

        one = (1, *tuple(input_shape)[1:])
        return ModelStats(file_bytes, count_folded_params(module, one), count_macs(module, one))
    if source.suffix.lower() == ".onnx" and source.is_file():
        params, macs = onnx_params_macs(source, input_shape)
        return ModelStats(file_bytes, params, macs)
    return ModelStats(file_bytes, None, None)
