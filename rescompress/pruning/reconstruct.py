"""Least-squares layer reconstruction after pruning: refit each layer to reproduce the unpruned model's output.

Removing a channel deletes its contribution to every layer that reads it. Instead of only slicing those
layers' weights, each pruned layer is refit, in the order the network runs them, so that its output on real
images matches the unpruned layer's output (at the output channels it keeps):

    W = argmin_W  sum_images || W_t x_t - W x_s ||^2  +  lam || W - W_0 ||^2

``x_t`` is the layer's input (im2col patches for a convolution) in the unpruned model, ``x_s`` the input the
same layer reads in the pruned model *after the layers before it were refit* (so each layer also absorbs the
error its predecessors left), ``W_t`` the unpruned weights at the kept output channels and ``W_0`` the plain
slice of them the pruning left. The solution is closed-form from two streamed statistics,
``H = sum x_s x_s^T`` and ``A = sum x_s x_t^T``:  ``W = (W_t A^T + lam W_0)(H + lam I)^-1``. Each output
channel takes, of the slice and the refits with several ``lam`` (fractions of ``H``'s mean diagonal), the one
that reproduces the unpruned output best on held-out images. This is the reconstruction step of
channel-pruning methods such as ThiNet (Luo et al. 2017) and He et al. 2017, applied to the channels any
criterion chose. Because the pre-BatchNorm outputs then match
the unpruned ones, the unpruned BatchNorm statistics fit again (at the first pruning step; at later steps the
targets are still the unpruned model's pre-BatchNorm outputs, while the BatchNorm statistics are the re-estimated
ones); BatchNorm re-estimation afterwards corrects what remains.

Statistics are accumulated batch by batch (memory: one batch of one layer's patches in both models, ``H``, ``A``,
and
the cached inputs of the ResNet block being refit, for every image, in both models). A layer inside a block
costs a pass of that block from its cached inputs; a layer outside (stem, classifier) a pass from the image.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from rescompress.errors import RescompressError
from rescompress.pruning.finetune import _take_images

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ReconstructReport:
    images: int
    layers: int  # layers refit
    # relative output error (||W_t x_t - W x_s|| / ||W_t x_t||) on the held-out images, of the plain slice and of
    # the result, per layer looked at (for a layer kept as sliced, both are the slice's)
    error_before: dict[str, float]
    error_after: dict[str, float]
    kept_slice: tuple[str, ...] = ()  # looked at, left as sliced: no refit did better on the held-out images
    # relative logit error vs the unpruned model on the held-out images, with the plain pruned weights and with
    # the refit (each after BatchNorm re-estimation where the pruner runs one); the refit is used only if lower
    logit_error_sliced: float | None = None
    logit_error_refit: float | None = None
    used: bool = True

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


@dataclass
class _Stats:
    """Streamed least-squares statistics of one layer: H = sum x_s x_s^T, A = sum x_s x_t^T, sum ||W_t x_t||^2."""

    h: torch.Tensor | None = None
    a: torch.Tensor | None = None
    y_energy: torch.Tensor | None = None  # per output channel

    def add(self, xs: torch.Tensor, xt: torch.Tensor, w_t: torch.Tensor) -> None:
        if len(xs) == 0:
            return
        hb, ab = (xs.T @ xs).double(), (xs.T @ xt).double()  # float32 products, float64 sums
        yb = (xt @ w_t.T.to(xt.dtype)).double().pow(2).sum(0)
        self.h = hb if self.h is None else self.h.add_(hb)
        self.a = ab if self.a is None else self.a.add_(ab)
        self.y_energy = yb if self.y_energy is None else self.y_energy.add_(yb)

    def channel_errors(self, w: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
        """Squared output error of each output channel over the images, from the statistics alone:
        ||y - w x_s||^2 = ||y||^2 - 2 w A w_t^T + w H w^T, with y = w_t x_t."""
        cross = ((w @ self.a) * w_t).sum(1)
        quad = ((w @ self.h) * w).sum(1)
        return (self.y_energy - 2.0 * cross + quad).clamp_min(0.0)

    def error(self, w: torch.Tensor, w_t: torch.Tensor) -> float:
        """||W_t x_t - W x_s|| / ||W_t x_t|| over the images and channels."""
        if self.h is None:
            return float("nan")
        return (float(self.channel_errors(w, w_t).sum()) / max(float(self.y_energy.sum()), 1e-30)) ** 0.5

    def solve(self, w_t: torch.Tensor, w_0: torch.Tensor, lam: float) -> torch.Tensor:
        """argmin_W ||W_t x_t - W x_s||^2 + lam ||W - W_0||^2 = (W_t A^T + lam W_0)(H + lam I)^-1."""
        reg = self.h.clone()
        reg.diagonal().add_(lam)  # in place: no identity matrix the size of H
        return torch.linalg.solve(reg, (w_t @ self.a.T + lam * w_0).T).T


def _fit_split(n: int) -> int:
    """How many of a batch's ``n`` images feed the fit; the rest (a quarter) judge it."""
    return n if n < 2 else n - max(1, n // 4)


class _Runner:
    """Where each layer's input comes from: a forward pass from the image, or from cached block inputs.

    Re-running the network from the image for every layer costs a number of passes that grows with the
    depth squared. ResNet blocks (``layerN.M``) form a chain, so the inputs of the block being refit are kept
    for every batch (for both models) and only that block runs; when the block is done, its outputs become the
    next block's inputs. Layers outside the blocks (the stem, the classifier) run from the image. The chain is
    checked on the first batch (each block's output is the next one's input); where it does not hold, every
    layer runs from the image.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, batches: list[torch.Tensor]) -> None:
        self.teacher, self.student, self.batches = teacher, student, batches
        self.s_mods, self.t_mods = dict(student.named_modules()), dict(teacher.named_modules())
        self.blocks = _block_chain(student, batches[0])
        self.block_of = {}
        for name in self.blocks:
            for sub, m in self.s_mods[name].named_modules():
                if _reconstructible(m):
                    self.block_of[f"{name}.{sub}"] = name
        self.current: str | None = None
        self.cache: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    def inputs(self, name: str, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``b``'s input of layer ``name`` in the student and in the teacher."""
        s_layer, t_layer = self.s_mods[name], self.t_mods[name]
        block = self.block_of.get(name)
        if block is None:
            x = self.batches[b]
            return _capture_input(self.student, s_layer, x), _capture_input(self.teacher, t_layer, x)
        self._enter(block)
        s_block, t_block = self.s_mods[block], self.t_mods[block]
        return (_capture_input(s_block, s_layer, self.cache[0][b]),
                _capture_input(t_block, t_layer, self.cache[1][b]))

    def _enter(self, block: str) -> None:
        if block == self.current:
            return
        s_mods, t_mods = self.s_mods, self.t_mods
        index = self.blocks.index(block)
        if self.current is not None and self.blocks.index(self.current) == index - 1:
            prev = self.current  # advance the cache through the block just refit
            self.cache = ([s_mods[prev](x) for x in self.cache[0]], [t_mods[prev](x) for x in self.cache[1]])
        else:
            self.cache = ([_capture_input(self.student, s_mods[block], x) for x in self.batches],
                          [_capture_input(self.teacher, t_mods[block], x) for x in self.batches])
        self.current = block

    def release(self) -> None:
        self.cache = None
        self.current = None


@torch.no_grad()
def _block_chain(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The ResNet blocks (``layerN.M``) in execution order, if each one's output is the next one's input."""
    return _trace_blocks(model, x)[0]


@torch.no_grad()
def _trace_blocks(model: nn.Module, x: torch.Tensor) -> tuple[list[str], int]:
    """:func:`_block_chain`'s blocks, and the largest block input or output of one image (elements)."""
    blocks = [n for n, _ in model.named_modules() if re.fullmatch(r"layer\d+\.\d+", n)]
    if not blocks:
        return [], 0
    mods = dict(model.named_modules())
    order: list[str] = []
    state: dict = {"prev": None, "chained": True, "largest": 0}

    def hook(_m: nn.Module, args: tuple, out: torch.Tensor, n: str) -> None:
        prev, x = state["prev"], args[0]
        if prev is not None and x is not prev and not (x.shape == prev.shape and torch.equal(x, prev)):
            state["chained"] = False
        state["prev"] = out  # only the last output is held, not every block's
        state["largest"] = max(state["largest"], x[0].numel(), out[0].numel())
        order.append(n)

    handles = [mods[n].register_forward_hook(lambda m, a, out, n=n: hook(m, a, out, n)) for n in blocks]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    if not state["chained"] or sorted(order) != sorted(blocks) or len(order) != len(blocks):
        return [], state["largest"]  # a block runs twice or not at all, or its output is not the next one's input
    return order, state["largest"]


@torch.no_grad()
def cache_bytes_per_image(model: nn.Module, example: torch.Tensor) -> int:
    """Memory the block-input cache of :func:`reconstruct_layers` takes per image, for both models (the
    largest block input or output, twice: a block's inputs and outputs coexist while the cache advances)."""
    return 2 * 2 * _trace_blocks(model, example)[1] * example.element_size()


RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # lam candidates, as fractions of mean(diag(H))


@torch.no_grad()
def reconstruct_layers(
    teacher: nn.Module,
    student: nn.Module,
    kept_out: dict[str, list[int]],
    batches: list[torch.Tensor],
    ridges: tuple[float, ...] = RIDGES,
) -> ReconstructReport:
    """Refit ``student``'s convs and linears in place, in execution order, to reproduce ``teacher``'s outputs.

    ``kept_out[name]`` lists the teacher's output channels the student's layer ``name`` kept (all when
    absent). ``batches`` are input batches already on the models' device; both models run in eval mode.

    A quarter of each batch's images is held out and never enters a fit: each output channel takes, of the
    plain slice and the refits with each of ``ridges``, the one that reproduces the teacher best on the
    held-out images (a layer with more weights than its images give equations, such as a classifier refit on
    fewer images than it has inputs, would otherwise learn those images by heart). Layers
    whose weights would not change (the stem: same input, same weights) are skipped; grouped convolutions are
    left as they are. The report's errors are the held-out ones.
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
    kept_slice: list[str] = []
    runner = _Runner(teacher, student, batches)
    try:
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
            fit, check = _Stats(), _Stats()
            for b, x in enumerate(batches):
                xs, xt = runner.inputs(name, b)
                cut = _fit_split(len(x))
                rows_s, rows_t = _features(s_layer, xs).float(), _features(t_layer, xt).float()
                per_image = len(rows_s) // len(x)
                fit.add(rows_s[: cut * per_image], rows_t[: cut * per_image], w_t)
                check.add(rows_s[cut * per_image :], rows_t[cut * per_image :], w_t)
            same_input = all(st.h is None or torch.equal(st.h, st.a) for st in (fit, check))
            if same_input and w_t.shape == w_0.shape and torch.equal(w_t, w_0):
                continue  # same input, same weights: nothing to refit (e.g. the stem)
            judge = check if check.h is not None else fit  # one-image batches: nothing held out
            # lam's unit: the mean diagonal of H over all the images (summed without adding the matrices)
            diag = sum(st.h.diagonal() for st in (fit, check) if st.h is not None)
            scale = float(diag.mean().clamp_min(1e-12))
            # Candidates: the slice and one refit per ridge, each solved on the fit images only (the held-out
            # images must stay unseen by every layer before the ones they judge). Each output channel takes the
            # candidate with the least held-out error: a channel's error is scaled by its BatchNorm afterwards,
            # so a layer-wide choice would let loud channels decide for quiet ones the BatchNorm amplifies.
            candidates = [w_0]
            for r in ridges:
                try:
                    candidates.append(fit.solve(w_t, w_0, r * scale))
                except RuntimeError:  # singular even with this ridge
                    continue
            errs = torch.stack([judge.channel_errors(w, w_t) for w in candidates])  # (candidates, channels)
            errs = errs.nan_to_num(nan=float("inf"))  # a solve that returned NaN is never chosen
            pick = errs.argmin(0)
            w = torch.stack(candidates)[pick, torch.arange(len(pick), device=pick.device)]
            before[name] = judge.error(w_0, w_t)
            after[name] = judge.error(w, w_t)
            if bool((pick == 0).all()):
                kept_slice.append(name)  # the plain slice generalizes better everywhere: keep it
                continue
            _set_weight(s_layer, w)
    finally:
        runner.release()
    log.info("reconstructed %d layers on %d images (%d kept as sliced)", len(after) - len(kept_slice), images,
             len(kept_slice))
    return ReconstructReport(images, len(after) - len(kept_slice), before, after, tuple(kept_slice))


def fit_images(batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """The images of ``batches`` that :func:`reconstruct_layers` fit on."""
    return [b[: _fit_split(len(b))] for b in batches]


def held_out_images(batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """The images of ``batches`` that :func:`reconstruct_layers` held out (all, where it could hold none out)."""
    held = [b[_fit_split(len(b)) :] for b in batches]
    held = [b for b in held if len(b)]
    return held or batches


@torch.no_grad()
def logit_error(teacher: nn.Module, student: nn.Module, batches: list[torch.Tensor]) -> float:
    """||student(x) - teacher(x)|| / ||teacher(x)|| over the batches (eval mode)."""
    teacher.eval()
    student.eval()
    err = ref = 0.0
    for x in batches:
        t, s = teacher(x).double(), student(x).double()
        err += float((s - t).pow(2).sum())
        ref += float(t.pow(2).sum())
    return (err / max(ref, 1e-30)) ** 0.5


def take_batches(loader: Iterable, num_images: int, device: torch.device) -> list[torch.Tensor]:
    """Up to ``num_images`` images of ``loader`` as batches on ``device`` (labels dropped)."""
    return [x.to(device) for x, _ in _take_images(loader, num_images)]
