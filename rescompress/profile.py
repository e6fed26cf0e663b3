"""Parameter and MAC counts for a module at a given input shape.

MACs are counted with forward hooks on Conv/Linear layers (multiply-accumulates of the weights; BN,
ReLU, pooling and adds are not counted), which is the convention torchvision's model docs use
(resnet50: 4.09 GMACs at 224x224).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_folded_params(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Parameters once BatchNorm is folded (what an exported file holds), so an unfolded torch model counts
    as its ONNX export does (``benchmark`` tables compare the two side by side).

    ``input_shape`` is one (C, H, W) or (N, C, H, W) input for the fold's shape check. A module the fold cannot
    take (TorchScript, dilated) counts as it is.
    """
    from rescompress.errors import RescompressError
    from rescompress.folding import count_batchnorm, fold_batchnorm

    if count_batchnorm(module) == 0:
        return count_params(module)
    try:
        return count_params(fold_batchnorm(module, input_shape=tuple(input_shape)).model)
    except RescompressError:  # the fold refuses TorchScript, dilation, training mode
        return count_params(module)


# Weight and bias inputs of the ONNX ops that hold a layer's parameters.
# BatchNormalization counts its scale and bias, as torch counts a BatchNorm's weight and bias (its running
# statistics are buffers, not parameters).
_ONNX_PARAM_INPUTS = {"Conv": (1, 2), "Gemm": (1, 2), "MatMul": (1,), "ConvInteger": (1,), "MatMulInteger": (1,),
                      "QLinearConv": (3, 8), "QLinearMatMul": (3,), "QGemm": (3, 6), "BatchNormalization": (1, 2)}


def count_onnx_params(graph, kernels: dict[str, int] | None = None) -> int:
    """Weight and bias elements of an ONNX graph's Conv/Gemm/MatMul layers (and their integer forms) and of
    its BatchNormalization nodes.

    A weight behind a DequantizeLinear counts as the tensor it dequantizes; scales, zero points and other
    constants are not parameters. Each layer counts its own weights, also where an exporter stored equal
    tensors once, so an FP32 file and the INT8 files made from it count the same (as the torch model does).
    ``kernels`` maps a Conv node to its weights per output channel where the stored weight also holds zero taps
    (the ONNX Runtime file's space-to-depth stem: ``quantization.stem.stem_kernels``).
    """
    kernels = kernels or {}
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    total = 0
    for node in graph.node:
        for i in _ONNX_PARAM_INPUTS.get(node.op_type, ()):
            name = node.input[i] if i < len(node.input) else ""
            for _ in range(4):  # through DequantizeLinear / QuantizeLinear / Identity to the initializer
                p = producer.get(name)
                if name in inits or p is None or p.op_type not in ("DequantizeLinear", "QuantizeLinear", "Identity"):
                    break
                name = p.input[0]
            if name in inits:
                dims = inits[name].dims
                total += dims[0] * kernels[node.name] if i == 1 and node.name in kernels else math.prod(dims)
    return total


@torch.no_grad()
def count_macs(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass at ``input_shape`` (batch included, usually 1)."""
    total = 0

    def conv_hook(m: nn.Conv2d, _inp, out: torch.Tensor) -> None:
        nonlocal total
        kernel = m.weight.shape[1] * m.weight.shape[2] * m.weight.shape[3]  # (in/groups) * kh * kw
        total += out.numel() * kernel

    def linear_hook(m: nn.Linear, _inp, out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel() * m.in_features

    handles = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = module.training
    module.eval()
    try:
        param = next(module.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        module(torch.zeros(input_shape, device=device))
    finally:
        module.train(was_training)
        for h in handles:
            h.remove()
    return int(total)
