"""Least-squares layer reconstruction after pruning: refit each layer to reproduce the unpruned model's output.

Removing a channel deletes its contribution to every layer that reads it. Instead of only slicing those
layers' weights, each pruned layer is refit, in the order the network runs them, so that its output on real
images matches the unpruned layer's output (at the output channels it keeps):

    W = argmin_W  sum_images || W_t x_t - W x_s ||^2  +  lam || W - W_0 ||^2

``x_t`` is the layer's input (im2col patches for a convolution) in the unpruned model, ``x_s`` the input the
same layer reads in the pruned model *after the layers before it were refit* (so each layer also absorbs the
error its predecessors left), ``W_t`` the unpruned weights at the kept output channels and ``W_0`` the plain
slice of them the pruning left. The solution is closed-form from two streamed statistics,
``H = sum x_s x_s^T`` and ``A = sum x_s x_t^T``:  ``W = (W_t A^T + lam W_0)(H + lam I)^-1``, with ``lam`` a
small fraction of ``H``'s mean diagonal so a layer seen on few images stays near its slice. This is the
reconstruction step of channel-pruning methods such as ThiNet (Luo et al. 2017) and He et al. 2017, applied
to the channels any criterion chose. Because the pre-BatchNorm outputs then match the unpruned ones, the
unpruned BatchNorm statistics fit again; BatchNorm re-estimation afterwards corrects what remains.

Statistics are accumulated batch by batch (memory: one batch of one layer's patches plus ``H`` and ``A``).
Each layer costs one forward pass of both models up to that layer; the pass stops at the layer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from rescompress.errors import RescompressError

log = logging.getLogger(__name__)

RIDGE = 1e-2  # lam as a fraction of mean(diag(H))


@dataclass(frozen=True)
class ReconstructReport:
    images: int
    layers: int
    # relative output error (||W_t x_t - W x_s|| / ||W_t x_t||) of the plain slice and of the refit, per layer
    error_before: dict[str, float]
    error_after: dict[str, float]

    def to_dict(self) -> dict:
        return asdict(self)


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass once the wanted layer's input is taken."""


def _capture_input(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    taken: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple) -> None:
        taken.append(args[0])
        raise _Stop

    handle = layer.register_forward_pre_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not taken:
        raise RescompressError("layer reconstruction: a layer did not run in the forward pass")
    return taken[0]


def _features(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of the features its weight multiplies (im2col for a conv), plus a 1 for the bias."""
    if isinstance(layer, nn.Conv2d):
        cols = nn.functional.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                                    stride=layer.stride)  # (N, C*kh*kw, L)
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        rows = x.reshape(-1, x.shape[-1])
    if layer.bias is not None:
        rows = torch.cat([rows, torch.ones_like(rows[:, :1])], dim=1)
    return rows


def _flat_weight(layer: nn.Module) -> torch.Tensor:
    w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    if layer.bias is not None:
        w = torch.cat([w, layer.bias.detach()[:, None]], dim=1)
    return w.double()


def _set_weight(layer: nn.Module, w: torch.Tensor) -> None:
    if layer.bias is not None:
        layer.bias.data.copy_(w[:, -1].to(layer.bias.dtype))
        w = w[:, :-1]
    layer.weight.data.copy_(w.reshape(layer.weight.shape).to(layer.weight.dtype))


def _reconstructible(layer: nn.Module) -> bool:
    if isinstance(layer, nn.Linear):
        return True
    return isinstance(layer, nn.Conv2d) and layer.groups == 1 and layer.padding_mode == "zeros"


@torch.no_grad()
def _execution_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda _m, _a, n=name: order.append(n))
               for name, m in model.named_modules() if _reconstructible(m)]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    seen: set[str] = set()
    return [n for n in order if not (n in seen or seen.add(n))]


@torch.no_grad()
def reconstruct_layers(
    teacher: nn.Module,
    student: nn.Module,
    kept_out: dict[str, list[int]],
    batches: list[torch.Tensor],
    ridge: float = RIDGE,
) -> ReconstructReport:
    """Refit ``student``'s convs and linears in place, in execution order, to reproduce ``teacher``'s outputs.

    ``kept_out[name]`` lists the teacher's output channels the student's layer ``name`` kept (all when
    absent). ``batches`` are input batches already on the models' device; both models run in eval mode.
    Layers whose weights would not change (the student's input is the teacher's and nothing was removed)
    are skipped. Grouped convolutions are left as they are.
    """
    teacher.eval()
    student.eval()
    t_layers = dict(teacher.named_modules())
    s_layers = dict(student.named_modules())
    images = sum(len(b) for b in batches)
    if images == 0:
        raise RescompressError("layer reconstruction needs images")
    before: dict[str, float] = {}
    after: dict[str, float] = {}
    for name in _execution_order(student, batches[0]):
        t_layer, s_layer = t_layers.get(name), s_layers[name]
        if t_layer is None or type(t_layer) is not type(s_layer):
            continue
        keep = kept_out.get(name)
        w_t = _flat_weight(t_layer)
        if keep is not None:
            w_t = w_t[torch.as_tensor(keep, device=w_t.device)]
        w_0 = _flat_weight(s_layer)
        if w_t.shape[0] != w_0.shape[0]:
            raise RescompressError(f"layer reconstruction: {name} keeps {w_0.shape[0]} outputs, "
                                   f"but {len(keep or ())} were recorded")
        h = a = None
        y_energy = 0.0
        for x in batches:
            xs = _features(s_layer, _capture_input(student, s_layer, x)).float()
            xt = _features(t_layer, _capture_input(teacher, t_layer, x)).float()
            hb, ab = (xs.T @ xs).double(), (xs.T @ xt).double()  # float32 products, float64 sums
            h = hb if h is None else h + hb
            a = ab if a is None else a + ab
            y_energy += float((xt @ w_t.T.float()).double().pow(2).sum())
        if torch.equal(h, a) and w_t.shape == w_0.shape and torch.equal(w_t, w_0):
            continue  # same input, same weights: nothing to refit (e.g. the stem)
        lam = ridge * float(h.diagonal().mean().clamp_min(1e-12))
        eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
        rhs = w_t @ a.T + lam * w_0
        try:
            w = torch.linalg.solve(h + lam * eye, rhs.T).T
        except RuntimeError as exc:  # singular even with the ridge: keep the slice
            log.warning("layer reconstruction skipped %s (%s)", name, exc)
            continue
        before[name] = _rel_error(w_0, w_t, h, a, y_energy)
        after[name] = _rel_error(w, w_t, h, a, y_energy)
        if after[name] <= before[name]:
            _set_weight(s_layer, w)
        else:
            after[name] = before[name]
    log.info("reconstructed %d layers on %d images", len(after), images)
    return ReconstructReport(images, len(after), before, after)


def _rel_error(w: torch.Tensor, w_t: torch.Tensor, h: torch.Tensor, a: torch.Tensor, y_energy: float) -> float:
    """||W_t x_t - W x_s|| / ||W_t x_t|| summed over the images, from the statistics alone.

    ||y - W x_s||^2 = ||y||^2 - 2 tr(W A W_t^T) + tr(W H W^T), with y = W_t x_t.
    """
    cross = float((w @ a @ w_t.T).diagonal().sum())
    quad = float((w @ h @ w.T).diagonal().sum())
    err = max(0.0, y_energy - 2.0 * cross + quad)
    return (err / max(y_energy, 1e-30)) ** 0.5


def take_batches(loader: Iterable, num_images: int, device: torch.device) -> list[torch.Tensor]:
    """Up to ``num_images`` images of ``loader`` as batches on ``device`` (labels dropped)."""
    out: list[torch.Tensor] = []
    seen = 0
    for x, *_ in loader:
        if seen >= num_images:
            break
        x = x[: num_images - seen]
        out.append(x.to(device))
        seen += len(x)
    return out
