"""Coupled channel groups from Torch-Pruning's ``DependencyGraph``, plus an exact MAC model over them.

Torch-Pruning traces the model once and knows which channels must move together: a residual stage's
stem conv, every block's last conv, the downsample conv, their BatchNorms and the next stage's inputs
form one group; each block's inner convs form their own. This module turns its groups into plain
:class:`ChannelGroup` records (which layers lose output and input channels when the group shrinks) and
keeps the classifier's outputs and the network input out of every group. Because a conv's MACs scale
with its kept output and input fractions, :class:`MacModel` predicts the MACs of any width plan without
touching the model, which is what makes the MAC-target search cheap.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from rescompress.errors import RescompressError

log = logging.getLogger(__name__)


class PruningGraphError(RescompressError):
    """The model cannot be traced into channel groups (not a supported convolutional network)."""


@dataclass
class ChannelGroup:
    """One set of channels that must be pruned together.

    ``root`` is the module whose output channels index the group; ``out_layers`` lose output channels and
    ``in_layers`` lose input channels when the group shrinks (``in_scale`` is how many input features of
    that layer one group channel feeds, e.g. H*W after a flatten).
    """

    index: int
    root: nn.Module
    root_name: str
    width: int
    out_layers: tuple[str, ...]
    in_layers: tuple[str, ...]
    in_scale: dict[str, int]
    tp_group: object  # torch_pruning Group with full indices, for importance

    @property
    def name(self) -> str:
        return self.root_name

    def to_dict(self) -> dict:
        return {"root": self.root_name, "width": self.width, "out_layers": list(self.out_layers),
                "in_layers": list(self.in_layers)}


def classifier_layers(model: nn.Module) -> list[nn.Module]:
    """Linear layers: their outputs are class scores and are never pruned."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def _is_grouped(m: nn.Module) -> bool:
    # Grouped (ResNeXt) convs need whole groups removed at once; depthwise ones prune like BN.
    return isinstance(m, nn.Conv2d) and m.groups > 1 and not (m.groups == m.in_channels == m.out_channels)


def build_graph(model: nn.Module, example_input: torch.Tensor):
    """Trace ``model`` into a Torch-Pruning ``DependencyGraph`` (raises :class:`PruningGraphError`)."""
    import torch_pruning as tp

    if isinstance(model, torch.jit.ScriptModule):
        raise PruningGraphError(
            "cannot prune a TorchScript archive that does not rebuild as an eager torchvision-style ResNet; "
            "prune the eager model (its state_dict or a rescompress checkpoint) instead"
        )
    was_training = model.training
    model.eval()
    # Torch-Pruning follows grad_fn: a frozen parameter (requires_grad=False, as in transfer learning) would
    # drop its layer from the trace and cut the channel coupling. Freezing is a training setting: trace
    # with every parameter live, then restore it.
    frozen = [p for p in model.parameters() if not p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.enable_grad():
            # The classifier must stay in the trace (its input features shrink with the last stage); it
            # is kept out of the groups instead, in channel_groups. Ignoring it here would cut the graph.
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_input, verbose=False)
    except Exception as exc:
        raise PruningGraphError(
            f"cannot trace the model into channel groups ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
            "structured pruning supports plain convolutional ResNet-style models"
        ) from exc
    finally:
        for p in frozen:
            p.requires_grad_(False)
        model.train(was_training)
    return dg


def channel_groups(model: nn.Module, dg) -> list[ChannelGroup]:
    """The prunable channel groups of ``model`` (classifier outputs and grouped convs excluded)."""
    names = {m: n for n, m in model.named_modules()}
    ignored = classifier_layers(model)
    groups: list[ChannelGroup] = []
    for g in dg.get_all_groups(ignored_layers=ignored, root_module_types=(nn.Conv2d, nn.Linear)):
        root_item = g[0]
        root = root_item.dep.target.module
        width = len(root_item.idxs)
        out_layers, in_layers, in_scale, skip = [], [], {}, False
        for item in g:
            layer = item.dep.target.module
            if not isinstance(layer, nn.Module) or layer not in names:
                continue  # elementwise ops (add, relu) carry no weights
            if _is_grouped(layer):
                skip = True
                break
            if dg.is_out_channel_pruning_fn(item.dep.handler):
                out_layers.append(names[layer])
            elif dg.is_in_channel_pruning_fn(item.dep.handler):
                in_layers.append(names[layer])
                in_scale[names[layer]] = max(1, len(item.idxs) // width)
        if skip:
            log.info("skipping the group of %s: it feeds a grouped convolution", names.get(root))
            continue
        groups.append(ChannelGroup(len(groups), root, names[root], width, tuple(out_layers), tuple(in_layers),
                                   in_scale, g))
    if not groups:
        raise PruningGraphError("the model has no prunable channel groups (no Conv2d outside the classifier)")
    return groups


@dataclass(frozen=True)
class LayerMacs:
    macs: int
    out_channels: int
    in_channels: int
    depthwise: bool


class MacModel:
    """MACs of the model for any per-group kept width, from one traced forward pass.

    A conv's MACs are proportional to its output channels times its input channels per group, so a width
    plan's MACs follow from each layer's base MACs and the kept fractions of the groups it belongs to.
    Layers that are in no group (e.g. the classifier outputs) keep their width.
    """

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], input_shape: tuple[int, ...]) -> None:
        self.layers = _layer_macs(model, input_shape)
        self.out_group: dict[str, int] = {}
        self.in_groups: dict[str, list[int]] = {}
        for g in groups:
            for name in g.out_layers:
                self.out_group[name] = g.index
            for name in g.in_layers:
                self.in_groups.setdefault(name, []).append(g.index)
        self.widths = {g.index: g.width for g in groups}
        self.in_scale = {(name, g.index): g.in_scale.get(name, 1) for g in groups for name in g.in_layers}

    @property
    def total(self) -> int:
        return sum(layer.macs for layer in self.layers.values())

    def macs(self, keep: dict[int, int]) -> int:
        """Predicted MACs when group ``i`` keeps ``keep[i]`` channels (missing groups keep all)."""
        total = 0.0
        for name, layer in self.layers.items():
            out = layer.out_channels
            gi = self.out_group.get(name)
            if gi is not None:
                out = keep.get(gi, self.widths[gi])
            if layer.depthwise:
                total += layer.macs * out / layer.out_channels
                continue
            cin = layer.in_channels
            for gi in self.in_groups.get(name, ()):
                removed = self.widths[gi] - keep.get(gi, self.widths[gi])
                cin -= removed * self.in_scale[(name, gi)]
            total += layer.macs * (out / layer.out_channels) * (cin / layer.in_channels)
        return int(round(total))


@torch.no_grad()
def _layer_macs(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, LayerMacs]:
    found: dict[str, LayerMacs] = {}
    handles = []

    def hook(name: str):
        def fn(m: nn.Module, _inp, out: torch.Tensor) -> None:
            if isinstance(m, nn.Conv2d):
                per_out = out.numel() // out.shape[1] * m.weight.shape[1] * m.weight.shape[2] * m.weight.shape[3]
                dw = m.groups > 1 and m.groups == m.in_channels == m.out_channels
                found[name] = LayerMacs(per_out * m.out_channels, m.out_channels, m.in_channels, dw)
            else:
                found[name] = LayerMacs(out.numel() * m.in_features, m.out_features, m.in_features, False)
        return fn

    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            handles.append(m.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        model(torch.zeros(input_shape, device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return found


def prune_groups(dg, groups: list[ChannelGroup], remove: dict[int, list[int]]) -> None:
    """Remove channels ``remove[i]`` (indices into group ``i``'s root) from every coupled layer, in place."""
    for g in groups:
        idxs = sorted(remove.get(g.index, ()))
        if not idxs:
            continue
        if len(idxs) >= g.width:
            raise RescompressError(f"refusing to remove all {g.width} channels of {g.root_name}")
        pruner = dg.get_pruner_of_module(g.root)
        dg.get_pruning_group(g.root, pruner.prune_out_channels, idxs).prune()
