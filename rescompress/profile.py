"""Parameter and MAC counts for a module at a given input shape.

MACs are counted with forward hooks on Conv/Linear layers (multiply-accumulates of the weights; BN,
ReLU, pooling and adds are not counted), which is the convention torchvision's model docs use
(resnet50: 4.09 GMACs at 224x224).
"""

from __future__ import annotations

import torch
from torch import nn


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


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
