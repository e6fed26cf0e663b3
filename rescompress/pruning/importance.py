"""Channel importance criteria: each is a small callable ``criterion(group) -> scores`` (higher = keep).

Every criterion scores all channels of one :class:`~rescompress.pruning.groups.ChannelGroup` at once,
looking at every weight coupled to a channel (the producing convs' filters, their BatchNorm scales and
the consuming layers' input slices), so a residual channel is judged by all the blocks that share it.
Per-layer scores are averaged over the group's layers. Scores are comparable within a group; global
ranking divides them by the group's mean (see ``targets.plan_keep``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

import torch
from torch import nn

from rescompress.errors import RescompressError, UsageError
from rescompress.pruning.finetune import as_two_class
from rescompress.pruning.groups import ChannelGroup

CRITERIA: tuple[str, ...] = ("l1", "l2", "bn", "taylor", "random")


class Importance(Protocol):
    name: str

    def __call__(self, group: ChannelGroup) -> torch.Tensor: ...


def _members(group: ChannelGroup):
    """(layer, kind, idxs, root_idxs) for every weighted layer of the group; kind is 'out' | 'in' | 'bn'."""
    dg = group.tp_group._DG
    for item in group.tp_group:
        layer = item.dep.target.module
        if not isinstance(layer, nn.Module):
            continue
        root_idxs = item.root_idxs
        if any(r is None for r in root_idxs):
            continue
        if isinstance(layer, nn.BatchNorm2d):
            if layer.affine:
                yield layer, "bn", item.idxs, root_idxs
        elif isinstance(layer, nn.Conv2d | nn.Linear):
            if dg.is_out_channel_pruning_fn(item.dep.handler):
                yield layer, "out", item.idxs, root_idxs
            elif dg.is_in_channel_pruning_fn(item.dep.handler):
                yield layer, "in", item.idxs, root_idxs


def _per_channel(layer: nn.Module, kind: str, idxs, tensor_of: Callable[[nn.Parameter], torch.Tensor]) -> torch.Tensor:
    """Rows of ``tensor_of(weight)`` belonging to the group's channels, flattened per channel."""
    w = tensor_of(layer.weight)
    if kind == "bn":
        return w[idxs].unsqueeze(1)
    if kind == "out":
        return w[idxs].flatten(1)
    if isinstance(layer, nn.Conv2d) and layer.groups > 1:  # depthwise: input channel i is filter i
        return w[idxs].flatten(1)
    return w.transpose(0, 1)[idxs].flatten(1)


def _reduce(group: ChannelGroup, per_layer: Iterable[tuple[torch.Tensor, list[int]]]) -> torch.Tensor:
    """Average per-layer channel scores into one score per group channel (scattered by root index)."""
    total = torch.zeros(group.width, dtype=torch.float64)
    count = torch.zeros(group.width, dtype=torch.float64)
    for scores, root_idxs in per_layer:
        idx = torch.as_tensor(root_idxs, dtype=torch.long)
        total.scatter_add_(0, idx, scores.detach().to("cpu", torch.float64))
        count.scatter_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))
    if not bool((count > 0).any()):
        raise RescompressError(f"no weighted layer found in the channel group of {group.root_name}")
    return (total / count.clamp_min(1)).to(torch.float32)


class MagnitudeImportance:
    """Group Lp norm: each layer's Lp norm of the weights touching a channel, averaged over the group."""

    def __init__(self, p: int = 1) -> None:
        self.p = p
        self.name = f"l{p}"

    @torch.no_grad()
    def __call__(self, group: ChannelGroup) -> torch.Tensor:
        parts = []
        for layer, kind, idxs, root_idxs in _members(group):
            rows = _per_channel(layer, kind, idxs, lambda w: w.detach())
            parts.append((rows.abs().pow(self.p).sum(1).pow(1.0 / self.p), root_idxs))
        return _reduce(group, parts)


class BNScaleImportance:
    """|gamma| of the group's BatchNorms (network slimming); falls back to L1 where a group has no BN."""

    name = "bn"

    @torch.no_grad()
    def __call__(self, group: ChannelGroup) -> torch.Tensor:
        parts = [
            (layer.weight.detach()[idxs].abs(), root_idxs)
            for layer, kind, idxs, root_idxs in _members(group) if kind == "bn"
        ]
        return _reduce(group, parts) if parts else MagnitudeImportance(1)(group)


class TaylorImportance:
    """First-order Taylor estimate of the loss change when a channel is removed: |sum(w * dL/dw)|.

    Needs gradients: call :meth:`accumulate` with a few batches first. With labels the loss is cross
    entropy; without labels it is cross entropy against the model's own predictions, whose gradient still
    says which channels the current outputs depend on.
    """

    name = "taylor"

    def __init__(self) -> None:
        self._ready = False

    def accumulate(self, model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Sum gradients over ``batches`` into ``.grad``; returns the number of images seen."""
        was_training = model.training
        model.eval()  # BN uses running statistics: the gradient of the model that will be pruned
        model.zero_grad(set_to_none=True)
        device = next(model.parameters()).device
        seen = 0
        with torch.enable_grad():
            for x, y in batches:
                x, y = x.to(device), y.to(device)
                logits = as_two_class(model(x))
                target = torch.where(y >= 0, y, logits.argmax(1))
                nn.functional.cross_entropy(logits, target, reduction="sum").backward()
                seen += len(x)
        model.train(was_training)
        if seen == 0:
            raise RescompressError("the taylor criterion got no images to compute gradients on")
        self._ready = True
        return seen

    @torch.no_grad()
    def __call__(self, group: ChannelGroup) -> torch.Tensor:
        if not self._ready:
            raise RescompressError("the taylor criterion needs data: pass fine-tuning or calibration images")
        parts = []
        for layer, kind, idxs, root_idxs in _members(group):
            if layer.weight.grad is None:
                continue
            w = _per_channel(layer, kind, idxs, lambda p: p.detach())
            g = _per_channel(layer, kind, idxs, lambda p: p.grad.detach())
            parts.append(((w * g).sum(1).abs(), root_idxs))
        return _reduce(group, parts)


class RandomImportance:
    """Uniform random scores, seeded per group: the baseline every criterion must beat."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def __call__(self, group: ChannelGroup) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + group.index)
        return torch.rand(group.width, generator=gen)


def make_importance(name: str, seed: int = 0) -> Importance:
    """The criterion called ``name`` (one of :data:`CRITERIA`)."""
    if name == "l1":
        return MagnitudeImportance(1)
    if name == "l2":
        return MagnitudeImportance(2)
    if name == "bn":
        return BNScaleImportance()
    if name == "taylor":
        return TaylorImportance()
    if name == "random":
        return RandomImportance(seed)
    raise UsageError(f"unknown pruning criterion {name!r}; choose one of: {', '.join(CRITERIA)}")
