"""Activation range equalization: rescale channels so that per-tensor activation grids fit every channel.

An activation is quantized with one scale for the whole tensor, so a channel whose values stay far below
the tensor's maximum gets only a few of the 256 levels, and its rounding noise, relative to its signal,
is large. A positive factor ``s_c`` commutes with ReLU, max and average pooling and addition, so the
channel ``c`` of every tensor between convolutions can be multiplied by ``s_c`` (the producing
convolutions' output channel ``c`` and bias scaled by ``s_c``) and divided back out where it is read (the
consuming convolutions' or classifier's input channel ``c`` scaled by ``1 / s_c``). The FP32 function is
unchanged, the per-channel weight grids of the producers absorb the factor exactly, and the rounding noise
each quantized tensor adds to channel ``c`` reaches the consumers divided by ``s_c``. This is the
activation side of cross-layer equalization (Nagel et al., "Data-Free Quantization", 2019; SmoothQuant,
Xiao et al., 2022, moves activation range into weights for the same reason).

Channels coupled through residual additions must share one factor: a *group* is every tensor connected
through element-wise ops (ReLU, pooling, Add, Flatten of a 1x1 map) between convolutions, e.g. a whole
ResNet stage's residual stream, or the inside of one block. A group is equalized only when every tensor in
it is written by a convolution or by such an op and read only by such an op or by a convolution / Gemm /
MatMul with constant weights; anything else (a graph output, a Concat, a Mul, a non-homogeneous
activation such as Clip or Sigmoid) leaves the group as it is.

The factors come from calibration images: for each channel, the largest share it reaches of its tensor's
maximum (and, separately, of its minimum), over every tensor of the group that is quantized as itself (not
a convolution's output read only by a ReLU, whose negative part no grid holds). ``s_c = share^-alpha``
(``alpha`` in [0, 1], capped at ``max_scale``): with ``alpha = 1`` every channel reaches its tensor's
extreme in at least one tensor and, on the images measured, no quantized tensor's range grows. Channels
never seen away from zero keep ``s = 1``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from rescompress.calibration.collect import _SummaryRun, merge_extremes, per_image_sizes
from rescompress.errors import RescompressError
from rescompress.quantization.placement import GraphIndex

# Element-wise (per channel) ops for which f(s * x) = s * f(x) when s > 0.
PASS_THROUGH = ("Relu", "LeakyRelu", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
                "Identity", "Dropout")
DEFAULT_ALPHA = 1.0
DEFAULT_MAX_SCALE = 16.0
# Images the factors are measured on (at most): the first ones of the calibration pass, spread over the
# calibration sample. A per-channel maximum settles quickly, and their samples are held until the factors
# are known (thinned to a fixed budget), so it does not grow with --num-images.
EQUALIZE_IMAGES = 128


@dataclass(frozen=True)
class ChannelGroup:
    """Activations whose channel ``c`` scales together, and the weights that carry the factor."""

    tensors: tuple[str, ...]
    producers: tuple[str, ...]  # Conv nodes whose output channels write the group
    consumers: tuple[tuple[str, int, int], ...]  # (node, axis of its weight indexing the channels, conv groups)
    channels: int
    # The tensors whose ranges set the factors: all but those read only by a Relu, whose negative part is
    # never quantized (the Relu output's range stands for them, as in calibration)
    observed: tuple[str, ...]


@dataclass(frozen=True)
class Equalization:
    """The factors applied to a model: per group, one positive factor per channel."""

    groups: tuple[ChannelGroup, ...]
    scales: tuple[np.ndarray, ...]
    alpha: float
    images: int

    @property
    def scaled_tensors(self) -> tuple[str, ...]:
        """The activations whose values change (the groups with a factor other than 1)."""
        return tuple(self.factors())

    def apply(self, model: onnx.ModelProto) -> onnx.ModelProto:
        return apply_scales(model, self.groups, self.scales)

    def factors(self) -> dict[str, np.ndarray]:
        """Tensor -> its channels' factors, for every tensor whose values change."""
        return {t: s for g, s in zip(self.groups, self.scales, strict=True) if np.any(s != 1.0) for t in g.tensors}

    def to_dict(self) -> dict:
        """Summary for the report."""
        scaled = [s for s in self.scales if np.any(s != 1.0)]
        flat = np.concatenate(scaled) if scaled else np.ones(1)
        return {
            "alpha": self.alpha, "images": self.images, "groups": len(self.groups), "groups_scaled": len(scaled),
            "channels": int(sum(len(s) for s in scaled)), "median_scale": float(np.median(flat)),
            "max_scale": float(flat.max()),
        }

    def to_plan(self) -> dict:
        """The factors for a plan file, keyed by each group's first tensor."""
        return {"alpha": self.alpha, "images": self.images,
                "scales": {g.tensors[0]: [float(v) for v in s] for g, s in zip(self.groups, self.scales, strict=True)}}


def measure(
    model: onnx.ModelProto, shapes: dict, batches: Iterable, threads: int | None = None,
    alpha: float = DEFAULT_ALPHA, max_scale: float = DEFAULT_MAX_SCALE, unquantized: Iterable[str] | None = None,
) -> Equalization:
    """Find ``model``'s channel groups and their factors on ``batches`` (one pass, per-channel extremes)."""
    groups = tuple(channel_groups(model, shapes, unquantized))
    if not groups:
        return Equalization((), (), alpha, 0)
    extremes, images = channel_extremes(model, groups, batches, shapes, threads)
    return from_extremes(groups, extremes, images, alpha, max_scale)


def from_extremes(
    groups: Iterable[ChannelGroup], extremes: dict[str, tuple[np.ndarray, np.ndarray]], images: int,
    alpha: float = DEFAULT_ALPHA, max_scale: float = DEFAULT_MAX_SCALE,
) -> Equalization:
    """The factors of ``groups`` from their observed tensors' per-channel (min, max) over ``images`` images."""
    groups = tuple(groups)
    return Equalization(groups, tuple(group_scales(g, extremes, alpha, max_scale) for g in groups), alpha, images)


def from_plan(model: onnx.ModelProto, shapes: dict, entry: dict) -> Equalization:
    """The factors a plan recorded, matched to ``model``'s groups (refused when they do not fit)."""
    by_first = {g.tensors[0]: g for g in channel_groups(model, shapes)}
    groups, scales = [], []
    for first, values in entry["scales"].items():
        g = by_first.get(first)
        if g is None or len(values) != g.channels:
            raise RescompressError(f"the plan's channel equalization does not fit this model (group {first!r}); "
                                   "recalibrate without --plan")
        s = np.asarray(values, np.float64)
        if not np.all(np.isfinite(s)) or np.any(s <= 0):
            raise RescompressError(f"the plan's channel equalization holds a factor that is not positive ({first!r})")
        groups.append(g)
        scales.append(s)
    return Equalization(tuple(groups), tuple(scales), float(entry["alpha"]), int(entry["images"]))


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _flattens_channels(node: onnx.NodeProto, shapes: dict) -> bool:
    """Flatten/Reshape of an [N, C, 1, 1] tensor to [N, C]: the channel axis stays axis 1."""
    src, dst = shapes.get(node.input[0]), shapes.get(node.output[0])
    if not src or not dst or len(dst) != 2 or len(src) < 2:
        return False
    if node.op_type == "Flatten" and _attr(node, "axis", 1) != 1:
        return False
    return src[1] is not None and dst[1] == src[1] and all(d == 1 for d in src[2:])


def channel_groups(
    model: onnx.ModelProto, shapes: dict, unquantized: Iterable[str] | None = None
) -> list[ChannelGroup]:
    """Every group of channel-coupled activations that can be equalized (see the module docstring).

    ``unquantized``: tensors no grid holds, which set no factor (default: those read only by a Relu; the
    quantize pipeline passes the ones its placements leave to their Relu output's range).
    """
    idx = GraphIndex(model)
    uf = _UnionFind()
    joining: set[str] = set()  # nodes whose activation inputs and outputs share the group
    for n in idx.nodes:
        acts = [t for t in n.input if idx.is_activation(t)]
        if n.op_type in PASS_THROUGH or (n.op_type in ("Flatten", "Reshape") and _flattens_channels(n, shapes)):
            ins = acts[:1]
        elif n.op_type == "Add" and len(n.input) == 2 and len(acts) == 2 and shapes.get(acts[0]) == shapes.get(acts[1]):
            ins = acts
        else:
            continue
        joining.add(n.name)
        for t in [*ins, n.output[0]]:
            uf.union(t, n.output[0])
    members: dict[str, list[str]] = {}
    for n in idx.nodes:  # in graph order: a group's first tensor is its earliest
        if n.op_type == "Conv" or n.name in joining:
            for t in [*(t for t in n.input[:2] if n.name in joining and idx.is_activation(t)), n.output[0]]:
                group = members.setdefault(uf.find(t), [])
                if t not in group:
                    group.append(t)
    def own_weight(node: onnx.NodeProto, i: int) -> bool:  # a constant no other input reads
        return len(node.input) > i and node.input[i] in idx.initializers and len(idx.consumers[node.input[i]]) == 1

    skip = set(idx.relu_only_inputs() if unquantized is None else unquantized)
    groups = []
    for tensors in members.values():
        producers, consumers, ok = [], [], True
        for t in tensors:
            p = idx.producer.get(t)
            if p is None or t in idx.graph_outputs or len(p.output) != 1:
                ok = False
                break
            if p.op_type != "Conv" and p.name not in joining:
                ok = False
            elif p.op_type == "Conv":
                ok = ok and own_weight(p, 1) and (len(p.input) < 3 or own_weight(p, 2))
                producers.append(p.name)
            for c, i in idx.consumers.get(t, []):
                if c.name in joining:
                    continue
                if c.op_type == "Conv" and i == 0 and own_weight(c, 1):
                    consumers.append((c.name, 1, int(_attr(c, "group", 1))))
                elif c.op_type in ("Gemm", "MatMul") and len(shapes.get(t) or ()) != 2:
                    ok = False  # (the channel must be the contracted axis: MatMul contracts the last one)
                elif c.op_type == "Gemm" and i == 0 and not _attr(c, "transA", 0) and own_weight(c, 1):
                    consumers.append((c.name, 1 if _attr(c, "transB", 0) else 0, 1))
                elif (c.op_type == "MatMul" and i == 0 and own_weight(c, 1)
                      and len(idx.initializers[c.input[1]].dims) == 2):
                    consumers.append((c.name, 0, 1))
                else:
                    ok = False
        if not ok or not producers or not consumers or any(
                len(shapes.get(t) or ()) < 2 or shapes[t][1] is None for t in tensors):
            continue  # (the channel axis of every tensor, and its size, must be known)
        widths = {int(idx.initializers[idx.by_name[p].input[1]].dims[0]) for p in producers}
        widths |= {int(idx.initializers[idx.by_name[c].input[1]].dims[a]) * k for c, a, k in consumers}
        if len(widths) != 1:
            continue
        observed = tuple(t for t in tensors if t not in skip)
        groups.append(ChannelGroup(tuple(tensors), tuple(producers), tuple(consumers), widths.pop(), observed))
    return groups


def channel_extremes(
    model: onnx.ModelProto, groups: Iterable[ChannelGroup], batches: Iterable, shapes: dict,
    threads: int | None = None,
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int]:
    """Per-channel (min, max) of every observed group tensor over ``batches``; and the number of images seen.

    A pass of its own, for checks; ``quantize`` gets the same extremes from its calibration pass
    (:class:`~rescompress.calibration.collect.Rescale`). Only reductions leave ONNX Runtime.
    """
    names = [t for grp in groups for t in grp.observed]
    sizes = per_image_sizes(model, names, shapes)
    run = None
    extremes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    images = 0
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        x = np.asarray(x, np.float32)
        if run is None:
            run = _SummaryRun(model, names, sizes, shapes, len(x), 1, names, threads)
        res = run.run(x)
        images += len(x)
        for t in names:
            merge_extremes(extremes, t, res[t][3], res[t][4])
    if not images:
        raise RescompressError("no images to measure channel ranges on")
    return extremes, images


def group_scales(
    group: ChannelGroup, extremes: dict[str, tuple[np.ndarray, np.ndarray]], alpha: float = DEFAULT_ALPHA,
    max_scale: float = DEFAULT_MAX_SCALE,
) -> np.ndarray:
    """One factor per channel of ``group`` (see the module docstring)."""
    share = np.zeros(group.channels)
    for t in group.observed:
        lo, hi = (np.asarray(v, np.float64) for v in extremes[t])
        if hi.max() > 0:
            share = np.maximum(share, np.clip(hi, 0, None) / hi.max())
        if lo.min() < 0:
            share = np.maximum(share, np.clip(lo, None, 0) / lo.min())
    scales = np.ones(group.channels)
    seen = share > 0
    scales[seen] = np.minimum(share[seen] ** -alpha, max_scale)
    return scales


def apply_scales(
    model: onnx.ModelProto, groups: Iterable[ChannelGroup], scales: Iterable[np.ndarray]
) -> onnx.ModelProto:
    """A copy of ``model`` with each group's channel ``c`` multiplied by its factor (same FP32 function)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name: i for i in m.graph.initializer}
    nodes = {n.name: n for n in m.graph.node}
    arrays: dict[str, np.ndarray] = {}

    def arr(name: str) -> np.ndarray:
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(inits[name]).astype(np.float64)
        return arrays[name]

    def along(a: np.ndarray, s: np.ndarray, axis: int) -> np.ndarray:
        shape = [1] * a.ndim
        shape[axis] = len(s)
        return a * s.reshape(shape)

    for grp, s in zip(groups, scales, strict=True):
        s = np.asarray(s, np.float64)
        if np.all(s == 1.0):
            continue
        for p in grp.producers:
            node = nodes[p]
            arrays[node.input[1]] = along(arr(node.input[1]), s, 0)
            if len(node.input) > 2 and node.input[2]:
                arrays[node.input[2]] = arr(node.input[2]) * s
        for c, axis, k in grp.consumers:
            w = nodes[c].input[1]
            if k == 1:
                arrays[w] = along(arr(w), 1.0 / s, axis)
            else:  # grouped conv: output channel o reads input channels of its group only
                a = arr(w)
                per = s.reshape(k, -1)[np.arange(a.shape[0]) // (a.shape[0] // k)]  # [O, C / k]
                arrays[w] = a / per.reshape(*per.shape, *([1] * (a.ndim - 2)))
    for name, a in arrays.items():
        init = inits[name]
        init.CopyFrom(numpy_helper.from_array(a.astype(helper.tensor_dtype_to_np_dtype(init.data_type)), name))
    return m
