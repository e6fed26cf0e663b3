"""BatchNorm folding: fold an inference-mode BatchNorm into the convolution (or linear layer) that feeds it.

Two layers, as in ``torch.nn.utils.fusion``: :func:`fold_conv_bn_weights` is the tensor-level formula
``w' = w * g / sqrt(var + eps)``, ``b' = (b - mean) * g / sqrt(var + eps) + beta``, computed in float64 and
cast back; :func:`fold_batchnorm` finds foldable pairs on a ``torch.fx`` trace of the model (the BN must
consume the conv's output directly and be its only user), folds them in a deep copy, and puts
``nn.Identity`` in place of each folded BN so module names (``layer1.0.conv1``) and the model's class stay
as they were. The returned :class:`FoldReport` lists what was folded, what was left and why, and how far
the folded model's logits moved on a probe batch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from rescompress.errors import RescompressError

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# torchvision's FrozenBatchNorm2d (fixed statistics and affine, as in detection backbones) folds the same way.
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, FrozenBatchNorm2d)
# Which BatchNorm follows which producer: the channel axis is 1 for all of them when ranks match.
_BN_FOR_CONV = {
    nn.Conv1d: (nn.BatchNorm1d,), nn.Conv2d: (nn.BatchNorm2d, FrozenBatchNorm2d), nn.Conv3d: (nn.BatchNorm3d,),
}
DEFAULT_PROBE_BATCH = 8
FOLD_RTOL = 1e-5
# The folded model may be this many times further from the exact logits than the float32 original is.
FOLD_NOISE_FACTOR = 2.0
DEFAULT_PROBE_SIZE = 64


class FoldError(RescompressError):
    """The model cannot be folded as asked (training mode, BN without running stats, untraceable)."""


@torch.no_grad()
def fold_conv_bn_weights(
    conv_w: torch.Tensor,
    conv_b: torch.Tensor | None,
    bn_rm: torch.Tensor,
    bn_rv: torch.Tensor,
    bn_eps: float,
    bn_w: torch.Tensor | None,
    bn_b: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias of a conv (or linear) layer with the following inference-mode BN folded in.

    ``conv_w`` has output channels on axis 0 (Conv1d/2d/3d of any ``groups``, or Linear). ``conv_b`` may be
    ``None`` (no bias); ``bn_w``/``bn_b`` may be ``None`` (``affine=False``). The arithmetic runs in float64
    so the only rounding is the final cast to ``conv_w``'s dtype.
    """
    out_ch = conv_w.shape[0]
    for name, t in (("running_mean", bn_rm), ("running_var", bn_rv)):
        if t is None:
            raise FoldError("BatchNorm has no running statistics (track_running_stats=False); cannot fold")
        if t.numel() != out_ch:
            raise FoldError(f"BatchNorm {name} has {t.numel()} channels but the layer has {out_ch} outputs")
    f64 = torch.float64
    gamma = bn_w.to(f64) if bn_w is not None else torch.ones(out_ch, dtype=f64)
    beta = bn_b.to(f64) if bn_b is not None else torch.zeros(out_ch, dtype=f64)
    bias = conv_b.to(f64) if conv_b is not None else torch.zeros(out_ch, dtype=f64)
    scale = gamma / torch.sqrt(bn_rv.to(f64) + float(bn_eps))
    w = conv_w.to(f64) * scale.reshape((-1,) + (1,) * (conv_w.dim() - 1))
    b = (bias - bn_rm.to(f64)) * scale + beta
    dtype = conv_w.dtype
    return w.to(dtype), b.to(conv_b.dtype if conv_b is not None else dtype)


def fold_linear_bn_weights(
    linear_w: torch.Tensor,
    linear_b: torch.Tensor | None,
    bn_rm: torch.Tensor,
    bn_rv: torch.Tensor,
    bn_eps: float,
    bn_w: torch.Tensor | None,
    bn_b: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear -> BatchNorm1d on 2-D activations: the same formula (output features are axis 0)."""
    return fold_conv_bn_weights(linear_w, linear_b, bn_rm, bn_rv, bn_eps, bn_w, bn_b)


@dataclass(frozen=True)
class FoldReport:
    """What :func:`fold_batchnorm` did and how much the logits moved on the probe batch.

    ``max_rel_diff`` is ``max|folded - original| / max|original|`` over the whole logit tensor (relative
    to the logit scale, so near-zero logits do not blow it up). ``top1_agreement`` is in percent. Past
    ``FOLD_RTOL`` (deep models at large inputs get there through float32 rounding alone: torchvision
    resnet50 at 224x224 moves 2e-5 from its exact float64 logits unfolded) both models are also compared
    with a float64 run of the original: ``original_fp64_rel_error`` and ``folded_fp64_rel_error``.
    """

    folded: tuple[tuple[str, str], ...]
    left: tuple[tuple[str, str], ...]
    max_abs_diff: float
    max_rel_diff: float
    top1_agreement: float
    probe_shape: tuple[int, ...]
    original_fp64_rel_error: float | None = None
    folded_fp64_rel_error: float | None = None

    @property
    def within_tolerance(self) -> bool:
        """Full top-1 agreement, and a logit difference within ``FOLD_RTOL`` or float32 rounding noise."""
        if self.top1_agreement < 100.0:
            return False
        if self.max_rel_diff <= FOLD_RTOL:
            return True
        if self.original_fp64_rel_error is None or self.folded_fp64_rel_error is None:
            return False
        return self.folded_fp64_rel_error <= FOLD_NOISE_FACTOR * self.original_fp64_rel_error

    def to_dict(self) -> dict:
        return {
            "folded": [{"layer": c, "bn": b} for c, b in self.folded],
            "left": [{"bn": b, "reason": r} for b, r in self.left],
            "num_folded": len(self.folded),
            "num_left": len(self.left),
            "max_abs_diff": self.max_abs_diff,
            "max_rel_diff": self.max_rel_diff,
            "top1_agreement": self.top1_agreement,
            "probe_shape": list(self.probe_shape),
            "original_fp64_rel_error": self.original_fp64_rel_error,
            "folded_fp64_rel_error": self.folded_fp64_rel_error,
            "within_tolerance": self.within_tolerance,
        }


@dataclass(frozen=True)
class FoldResult:
    model: nn.Module
    report: FoldReport

    def to_dict(self) -> dict:
        return self.report.to_dict()


def fold_batchnorm(
    model: nn.Module,
    probe: torch.Tensor | None = None,
    *,
    input_shape: tuple[int, ...] | None = None,
) -> FoldResult:
    """A copy of ``model`` (in eval mode) with every foldable Conv/Linear -> BatchNorm pair folded.

    ``probe`` is the batch used both for shape checks and for the equivalence numbers in the report; by
    default a seeded random normal batch of 8 at ``input_shape`` ((C,H,W) or (N,C,H,W)), or, when that
    is not given either, at (C, 64, 64) with C taken from the first convolution. ``model`` is not changed.
    """
    _refuse_unfoldable(model)
    probe = _make_probe(model, probe, input_shape)
    folded_model = copy.deepcopy(model)
    graph_module = _trace(folded_model)
    shapes = _output_ranks(graph_module, probe)
    pairs, left = _find_pairs(graph_module, folded_model, shapes)

    for layer_name, bn_name in pairs:
        layer = folded_model.get_submodule(layer_name)
        bn = folded_model.get_submodule(bn_name)
        w, b = fold_conv_bn_weights(
            layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
        layer.weight = nn.Parameter(w, requires_grad=layer.weight.requires_grad)
        layer.bias = nn.Parameter(b, requires_grad=layer.weight.requires_grad)
        _set_submodule(folded_model, bn_name, nn.Identity())
    folded_model.eval()

    max_abs, max_rel, agreement, original_err, folded_err = _compare(model, folded_model, probe)
    report = FoldReport(
        folded=tuple(pairs),
        left=tuple(left),
        max_abs_diff=max_abs,
        max_rel_diff=max_rel,
        top1_agreement=agreement,
        probe_shape=tuple(probe.shape),
        original_fp64_rel_error=original_err,
        folded_fp64_rel_error=folded_err,
    )
    return FoldResult(folded_model, report)


def count_batchnorm(model: nn.Module) -> int:
    """Number of BatchNorm modules still present (folded ones are ``nn.Identity``)."""
    return sum(isinstance(m, _BN_TYPES) for m in model.modules())


# ---------------------------------------------------------------------------------------------- helpers
def _refuse_unfoldable(model: nn.Module) -> None:
    if isinstance(model, torch.jit.ScriptModule):
        raise FoldError(
            "cannot fold a TorchScript model: torch.fx cannot trace it; `rescompress quantize` takes it as it "
            "is (it folds in the exported graph), `export --no-fold` exports it, or save the eager model's "
            "state_dict"
        )
    training = [name or "<model>" for name, m in model.named_modules() if m.training]
    if training:
        raise FoldError(
            f"model is in training mode ({training[0]} and {len(training) - 1} more); "
            "BatchNorm folding uses running statistics, call model.eval() first"
        )
    for name, m in model.named_modules():
        if isinstance(m, _BN_TYPES) and (not getattr(m, "track_running_stats", True) or m.running_mean is None):
            raise FoldError(
                f"BatchNorm {name} has no running statistics (track_running_stats=False): it normalizes "
                "with batch statistics at inference, so it cannot be folded"
            )


def _make_probe(
    model: nn.Module, probe: torch.Tensor | None, input_shape: tuple[int, ...] | None
) -> torch.Tensor:
    if probe is not None:
        return probe.detach()
    if input_shape is not None:
        shape = tuple(int(s) for s in input_shape)
        if len(shape) == 3:
            shape = (DEFAULT_PROBE_BATCH, *shape)
        # A fixed generator: the report is reproducible and the caller's RNG state is left alone.
        gen = torch.Generator().manual_seed(0)
        return torch.randn(shape, generator=gen)
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is None:
        raise FoldError("cannot guess the model's input shape (no Conv2d); pass input_shape or a probe batch")
    return _make_probe(model, None, (first_conv.in_channels, DEFAULT_PROBE_SIZE, DEFAULT_PROBE_SIZE))


class _Tracer(torch.fx.Tracer):
    """torch.fx's default tracer, with every BatchNorm type kept as one module call (torch.fx would trace
    into torchvision's FrozenBatchNorm2d, which is not a ``torch.nn`` module)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _BN_TYPES) or super().is_leaf_module(m, module_qualified_name)


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    try:
        graph = _Tracer().trace(model)
        return torch.fx.GraphModule(model, graph, type(model).__name__)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FoldError(
            f"torch.fx cannot trace {type(model).__name__} ({first}); BN folding needs a traceable model "
            "(no data-dependent control flow in forward)"
        ) from exc


@torch.no_grad()
def _output_ranks(gm: torch.fx.GraphModule, probe: torch.Tensor) -> dict[str, int]:
    """Rank of each call_module node's output, from one forward pass of the probe (for Linear -> BN1d)."""
    ranks: dict[str, int] = {}
    handles = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.Linear):
            continue
        # Only a Linear that feeds a BN needs its rank; skip the extra forward pass when there is none.
        if any(u.op == "call_module" and isinstance(gm.get_submodule(u.target), _BN_TYPES) for u in node.users):
            m = gm.get_submodule(node.target)

            def hook(_m, _inp, out, key=node.name):
                ranks[key] = out.dim()

            handles.append(m.register_forward_hook(hook))
    if not handles:
        return ranks
    try:
        _run_probe(gm, probe)
    finally:
        for h in handles:
            h.remove()
    return ranks


def _run_probe(model: nn.Module, probe: torch.Tensor) -> torch.Tensor:
    try:
        return model(probe)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise FoldError(
            f"the model does not run on a probe of shape {tuple(probe.shape)} ({type(exc).__name__}: "
            f"{first}); pass the model's input shape"
        ) from exc


def _find_pairs(
    gm: torch.fx.GraphModule, model: nn.Module, ranks: dict[str, int]
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(producer, bn) pairs that can be folded, and (bn, reason) for every BN that cannot."""
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    pairs: list[tuple[str, str]] = []
    left: list[tuple[str, str]] = []
    seen_bn: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), _BN_TYPES):
            continue
        bn_name = node.target
        if bn_name in seen_bn:
            continue
        seen_bn.add(bn_name)
        reason = _why_not_foldable(gm, node, calls, ranks)
        if reason is None:
            pairs.append((node.args[0].target, bn_name))
        else:
            left.append((bn_name, reason))

    called = set(calls)
    for name, m in model.named_modules():
        if isinstance(m, _BN_TYPES) and name not in called:
            left.append((name, "not used in forward"))
    return pairs, left


def _why_not_foldable(
    gm: torch.fx.GraphModule, bn_node: torch.fx.Node, calls: dict[str, int], ranks: dict[str, int]
) -> str | None:
    bn_name = bn_node.target
    bn = gm.get_submodule(bn_name)
    if calls[bn_name] > 1:
        return f"BatchNorm is applied {calls[bn_name]} times in forward"
    if len(bn_node.args) != 1 or bn_node.kwargs:
        return "BatchNorm is called with extra arguments"
    src = bn_node.args[0]
    if not isinstance(src, torch.fx.Node):
        return "BatchNorm input is not a tensor produced in the graph"
    if src.op != "call_module":
        what = getattr(src.target, "__name__", str(src.target))
        return f"input is produced by {src.op} {what}, not by a Conv/Linear module"
    producer = gm.get_submodule(src.target)
    if isinstance(producer, _CONV_TYPES):
        if type(bn) not in _BN_FOR_CONV[type(producer)]:
            return f"{type(bn).__name__} does not match {type(producer).__name__}"
        channels = producer.out_channels
    elif isinstance(producer, nn.Linear):
        if not isinstance(bn, nn.BatchNorm1d) or ranks.get(src.name) != 2:
            return "Linear output is not 2-D, so BatchNorm1d does not normalize its features"
        channels = producer.out_features
    else:
        return f"input is produced by {type(producer).__name__} ({src.target}), not by a Conv/Linear"
    if calls[src.target] > 1:
        return f"{src.target} is applied {calls[src.target]} times in forward (shared weights)"
    if len(src.users) != 1:
        others = sorted(u.name for u in src.users if u is not bn_node)
        return f"output of {src.target} is also used by {', '.join(others)}"
    if bn.running_mean.numel() != channels:
        return f"BatchNorm has {bn.running_mean.numel()} channels but {src.target} has {channels} outputs"
    return None


@torch.no_grad()
def _compare(
    original: nn.Module, folded: nn.Module, probe: torch.Tensor
) -> tuple[float, float, float, float | None, float | None]:
    ref = _run_probe(original, probe).double()
    out = folded(probe).double()
    diff = (out - ref).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    max_rel = max_abs / scale if scale > 0 else max_abs
    if ref.dim() == 2:
        from rescompress.measure.agreement import top1_agreement

        agreement = top1_agreement(ref.numpy(), out.numpy())
    elif ref.dim() > 2:
        agreement = float((ref.argmax(dim=-1) == out.argmax(dim=-1)).double().mean() * 100.0)
    else:
        agreement = 100.0
    original_err = folded_err = None
    if max_rel > FOLD_RTOL:
        # Over the tolerance: measure both float32 results against the exact (float64) original.
        try:
            exact = copy.deepcopy(original).double()(probe.double())
        except Exception:
            exact = None
        if isinstance(exact, torch.Tensor) and exact.shape == ref.shape:
            exact_scale = float(exact.abs().max()) or 1.0
            original_err = float((ref - exact).abs().max()) / exact_scale
            folded_err = float((out - exact).abs().max()) / exact_scale
    return max_abs, max_rel, agreement, original_err, folded_err


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


# ------------------------------------------------------------------------------------------ ONNX graphs
def fold_onnx_batchnorm(model):
    """(model, folded count): a copy of an ONNX graph with each ``Conv -> BatchNormalization`` pair folded.

    For files exported without constant folding (``torch.onnx.export(..., do_constant_folding=False)``
    or ``training=TrainingMode.PRESERVE`` on an eval-mode model). A pair folds when the BatchNormalization
    runs in inference mode (not ``training_mode=1``), reads the Conv's
    output and is its only reader, and the weights and statistics are constants; the same float64 formula
    as :func:`fold_conv_bn_weights`. Other BatchNormalization nodes are left (and counted by the caller).
    """
    import onnx
    from onnx import helper, numpy_helper

    from rescompress.export import constants_to_initializers

    m = onnx.ModelProto()
    m.CopyFrom(model)
    constants_to_initializers(m)
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, int] = {}
    for n in g.node:
        for t in n.input:
            readers[t] = readers.get(t, 0) + 1
    outputs = {o.name for o in g.output}

    def const(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy())

    drop: set[int] = set()
    for i, bn in enumerate(g.node):
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1 or len(bn.input) != 5:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in bn.attribute}
        conv = producer.get(bn.input[0])
        if (attrs.get("training_mode", 0) or conv is None or conv.op_type != "Conv" or len(conv.input) < 2
                or readers.get(bn.input[0], 0) != 1 or bn.input[0] in outputs):
            continue
        has_bias = len(conv.input) > 2 and bool(conv.input[2])
        names_in = [*bn.input[1:], conv.input[1], *([conv.input[2]] if has_bias else [])]
        if any(t not in inits for t in names_in):
            continue
        gamma, beta, mean, var, weight, *bias = (const(t) for t in names_in)
        w, b = fold_conv_bn_weights(weight, bias[0] if bias else None, mean, var, float(attrs.get("epsilon", 1e-5)),
                                    gamma, beta)
        stem = conv.name or conv.output[0]
        names = (f"{stem}_bn_folded_weight", f"{stem}_bn_folded_bias")
        g.initializer.extend([numpy_helper.from_array(w.numpy(), names[0]),
                              numpy_helper.from_array(b.numpy(), names[1])])
        x = conv.input[0]
        del conv.input[:]
        conv.input.extend([x, *names])
        conv.output[0] = bn.output[0]
        drop.add(i)
    if drop:
        kept = [n for i, n in enumerate(g.node) if i not in drop]
        del g.node[:]
        g.node.extend(kept)
        used = {t for n in g.node for t in n.input}
        live = [t for t in g.initializer if t.name in used]
        del g.initializer[:]
        g.initializer.extend(live)
        graph_inputs = [v for v in g.input if v.name in used or v.name not in inits]
        del g.input[:]
        g.input.extend(graph_inputs)
        del g.value_info[:]
    return m, len(drop)
