"""Recovery after pruning: BatchNorm re-estimation and fine-tuning with knowledge distillation.

Removing channels shifts the statistics every following BatchNorm saw in training, so re-estimating
running means/variances on a few hundred images (no labels, no gradients) often recovers much of the
accuracy. Fine-tuning then trains the pruned network with SGD (momentum, cosine learning rate) on
cross entropy plus, by default, a distillation term: the KL divergence between the temperature-softened
outputs of the unpruned teacher and of the pruned student (Hinton et al. 2015), scaled by T^2.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from rescompress.errors import RescompressError, UsageError

log = logging.getLogger(__name__)

ProgressFn = Callable[[Iterable, int, str], Iterable]


def no_progress(iterable: Iterable, total: int, description: str) -> Iterable:
    return iterable


class DivergedError(RescompressError):
    """Fine-tuning's loss stopped being finite (the learning rate is too high for the model)."""


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` chooses CUDA when present, else CPU; also ``cpu``, ``cuda``, ``cuda:N``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and not (kind == "cuda" and index.isdigit())):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise RescompressError(f"device {device} requested but CUDA is not available")
    return torch.device(device)


def _take_images(loader: Iterable, limit: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    seen = 0
    for x, y in loader:
        if seen >= limit:
            return
        if seen + len(x) > limit:
            x, y = x[: limit - seen], y[: limit - seen]
        seen += len(x)
        yield x, y


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable, num_images: int, device: torch.device | None = None) -> int:
    """Re-estimate every BatchNorm's running statistics on up to ``num_images`` images; returns the count.

    Statistics are reset and accumulated as an average over images (each batch weighs its image count:
    the momentum of a batch of ``n`` after ``seen`` images is ``n / (seen + n)``), so the result does not
    depend on the batch order or on a ragged last batch; everything else runs in eval mode. Batches of one
    image are skipped: they give no variance, and training-mode BatchNorm refuses them where a layer's output
    is 1x1.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or num_images <= 0:
        return 0
    device = device or next(model.parameters()).device
    saved = [(m.momentum, m.training) for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.train()
    seen = 0
    try:
        for x, _ in _take_images(loader, num_images):
            if len(x) < 2:
                continue
            for m in bns:
                m.momentum = len(x) / (seen + len(x))
            model(x.to(device))
            seen += len(x)
    finally:
        for m, (momentum, training) in zip(bns, saved, strict=True):
            m.momentum = momentum
            m.train(training)
        model.eval()
    if seen == 0:
        raise RescompressError("BatchNorm re-estimation needs at least 2 images (one image gives no variance); "
                               "give more data or --bn-recalib 0")
    return seen


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: float = 1.0
    lr: float | None = None  # None: chosen among LR_CANDIDATES by short trial runs (finetune_auto / choose_lr)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    distill: bool = True
    temperature: float = 4.0
    alpha: float = 0.5  # weight of the distillation term; 1 - alpha goes to cross entropy
    augment: bool = False  # random shifts (up to 1/8 of the side, edges replicated) and horizontal flips
    seed: int = 0
    max_batches: int | None = None
    ema: float = 0.0  # decay in [0, 1) of an exponential moving average of the weights, used at the end (0: off)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FinetuneReport:
    epochs: float
    batches: int
    images: int
    distill: bool
    first_loss: float
    last_loss: float
    device: str
    lr: float | None = None
    lr_choice: dict | None = None  # LrChoice.to_dict() when the learning rate was chosen by trials

    def to_dict(self) -> dict:
        return asdict(self)


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int | None = None,
                  flip: bool = True) -> torch.Tensor:
    """Random translation (crop of an edge-replicated padding) and horizontal flip of an (N, C, H, W) batch.

    The usual light augmentation for training image classifiers, done on the batch's own device with one
    gather, so it costs little next to a training step. ``pad`` defaults to 1/8 of the shorter side;
    ``generator`` lives on the CPU and draws column shifts, row shifts, then flips, so runs are seeded.
    """
    n, _, h, w = x.shape
    pad = max(1, round(min(h, w) / 8)) if pad is None else pad
    padded = nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = dx[:, None] + torch.arange(w, device=x.device)  # (N, W)
    if flip:
        mirror = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        cols = torch.where(mirror[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def as_two_class(logits: torch.Tensor) -> torch.Tensor:
    """A one-output (sigmoid) classifier's logit ``z`` as the two logits ``[0, z]``: softmax gives
    ``[1 - sigmoid(z), sigmoid(z)]``, so cross entropy is the binary cross entropy, distillation the
    Bernoulli KL, and argmax is ``z > 0``. Other logits are returned as they are."""
    return torch.cat([torch.zeros_like(logits), logits], dim=1) if logits.shape[1] == 1 else logits


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                      per_image: bool = False) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened logits, times T^2 so gradients keep their scale: the
    batch mean, or (``per_image``) one value per image."""
    t = temperature
    kl = nn.functional.kl_div(
        nn.functional.log_softmax(student / t, dim=1), nn.functional.log_softmax(teacher / t, dim=1),
        reduction="none" if per_image else "batchmean", log_target=True,
    )
    return (kl.sum(dim=1) if per_image else kl) * (t * t)


class _WeightAverage:
    """Exponential moving average of a model's floating-point parameters and buffers (BatchNorm statistics).

    The decay ramps up as ``min(decay, (1 + t) / (10 + t))`` so the first steps do not weigh the starting point
    for long."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay, self.steps = decay, 0
        self.live = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
        self.avg = [t.detach().clone() for t in self.live]

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(self.avg, [t.detach() for t in self.live], 1.0 - d)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for t, a in zip(self.live, self.avg, strict=True):
            t.copy_(a)


LR_CANDIDATES = (0.003, 0.01, 0.03, 0.06)
LR_TRIAL_SHARE = 0.1  # each trial trains on this share of the run's batches (at least LR_TRIAL_MIN)
LR_TRIAL_MIN = 20


@dataclass(frozen=True)
class LrChoice:
    """The learning rate chosen by trials and the held-out loss each candidate reached (inf, or null in
    JSON, where its trial diverged).

    ``lowest`` is the rate whose trial reached the lowest held-out loss; ``standard_error`` holds, for each
    finite candidate, the standard error of its per-image loss difference to ``lowest`` on the same held-out
    images (0 for ``lowest`` itself). ``lr`` is the next larger candidate when it is within one such standard
    error of ``lowest``, else ``lowest`` (``choose_rate``)."""

    lr: float
    held_out_loss: dict[float, float]
    trial_batches: int
    held_out_images: int
    lowest: float | None = None
    standard_error: dict[float, float] | None = None

    def to_dict(self) -> dict:
        return {"lr": self.lr,
                "held_out_loss": {str(k): v if math.isfinite(v) else None for k, v in self.held_out_loss.items()},
                "trial_batches": self.trial_batches, "held_out_images": self.held_out_images,
                "lowest": self.lowest,
                "standard_error": None if self.standard_error is None
                else {str(k): v for k, v in self.standard_error.items()}}


def _objective(logits: torch.Tensor, y: torch.Tensor, t_logits: torch.Tensor | None, config: FinetuneConfig,
               reduction: str = "mean") -> torch.Tensor:
    """Cross entropy, mixed with the distillation term when a teacher's logits are given; ``reduction`` "mean"
    (the training loss) or "none" (one value per image, whose mean is the "mean" value)."""
    loss = nn.functional.cross_entropy(logits, y, reduction=reduction)
    if t_logits is None:
        return loss
    kd = distillation_loss(logits, t_logits, config.temperature, per_image=reduction == "none")
    return (1 - config.alpha) * loss + config.alpha * kd


@torch.no_grad()
def held_out_losses(model: nn.Module, held: Iterable[tuple[torch.Tensor, torch.Tensor]], config: FinetuneConfig,
                    teacher: nn.Module | None, device: torch.device) -> torch.Tensor:
    """The fine-tuning objective of ``model`` in eval mode on each image of the ``held`` batches (float64, on
    the CPU, in the batches' order)."""
    model.eval()
    parts = []
    for x, y in held:
        x, y = x.to(device), y.to(device)
        t_logits = as_two_class(teacher(x)) if teacher is not None else None
        parts.append(_objective(as_two_class(model(x)), y, t_logits, config, reduction="none").double().cpu())
    if not parts:
        raise RescompressError("the held-out images for the learning-rate trials gave no batch (an iterable that "
                               "can be read only once?)")
    return torch.cat(parts)


def held_out_loss(model: nn.Module, held: Iterable[tuple[torch.Tensor, torch.Tensor]], config: FinetuneConfig,
                  teacher: nn.Module | None, device: torch.device) -> tuple[float, int]:
    """The fine-tuning objective (mean per image) of ``model`` in eval mode on the ``held`` batches, and how
    many images they held."""
    losses = held_out_losses(model, held, config, teacher, device)
    return float(losses.mean()), len(losses)


def choose_rate(per_image: dict[float, torch.Tensor | None]) -> tuple[float, float, dict[float, float]]:
    """(chosen rate, rate with the lowest mean loss, standard errors) from each candidate's per-image held-out
    losses (None: its trial diverged), all measured on the same images.

    Short trials judge large rates harshly: from the same pruned start, full one-epoch runs scored the larger
    rate of a pair 2.5-12% worse (resnet18) or between 2.4% better and 1.1% worse (ResNet-20) on the held-out
    training images where tenth-long trials scored it 18-47% or 5-13% worse (``bench_prune_recipe.py --part
    trial_bias``). So the next larger candidate, when the trials cannot tell it from the lowest one (its loss
    exceeds the lowest by no more than one standard error of the paired per-image difference), is not ruled out
    by them and is chosen: a "one-standard-error rule" leaning the way the trials err. It moves one candidate
    at most, as far as that evidence goes (it compared neighbouring rates), which also keeps a small held-out
    set, whose standard errors are large, from reaching for a much larger rate. Equal losses go to the larger
    rate too; a diverged trial is never chosen, and a diverged neighbour keeps the lowest.
    """
    finite = {lr: v for lr, v in per_image.items() if v is not None and bool(torch.isfinite(v).all())}
    if not finite:
        raise RescompressError("fine-tuning diverged at every trial learning rate; pass a smaller --lr")
    means = {lr: float(v.mean()) for lr, v in finite.items()}
    lowest = min(means, key=lambda lr: (means[lr], lr))
    se = {}
    for lr, v in finite.items():
        d = v - finite[lowest]
        se[lr] = float(d.std(unbiased=True) / math.sqrt(len(d))) if len(d) > 1 else 0.0
    order = sorted(per_image)
    up = order[order.index(lowest) + 1] if order.index(lowest) + 1 < len(order) else None
    chosen = up if up in finite and means[up] - means[lowest] <= se[up] else lowest
    return chosen, lowest, se


def choose_lr(
    model: nn.Module,
    fit_loader: Callable[[], Iterable],
    held: Iterable[tuple[torch.Tensor, torch.Tensor]],
    config: FinetuneConfig,
    total_batches: int,
    teacher: nn.Module | None = None,
    device: torch.device | None = None,
    candidates: tuple[float, ...] = LR_CANDIDATES,
    progress: ProgressFn = no_progress,
    trial_share: float = LR_TRIAL_SHARE,
) -> LrChoice:
    """Pick the fine-tuning learning rate by short trial runs, judged on images none of them trained on.

    The best rate differs from model to model (measured on Fashion-MNIST at 40% of the MACs kept: 0.06 gave
    the smallest top-1 drop on a ResNet-20 and a far larger one than 0.01 on a torchvision resnet18), so it is
    measured rather than guessed: each candidate fine-tunes a copy of ``model`` for ``trial_share`` of the
    run's ``total_batches`` (at least ``LR_TRIAL_MIN``, at most ``total_batches``; its own cosine schedule, a
    compressed run), on batches from a fresh ``fit_loader()`` each, and is judged by its objective on each image
    of ``held`` (read once per candidate, so it must be re-iterable). ``choose_rate`` then takes the next
    larger rate than the lowest-loss one when it is within one standard error of it; a diverged trial never
    wins.
    """
    device = device or next(model.parameters()).device
    trial_batches = min(total_batches, max(LR_TRIAL_MIN, round(trial_share * total_batches)))
    use_teacher = teacher if config.distill else None
    per_image: dict[float, torch.Tensor | None] = {}
    for lr in sorted(candidates):
        trial = copy.deepcopy(model)
        # epochs as large as the batch count, so a small trial split is passed over again rather than cut short
        trial_cfg = replace(config, lr=lr, epochs=float(trial_batches), max_batches=trial_batches, ema=0.0)
        try:
            finetune(trial, fit_loader(), trial_cfg, teacher=use_teacher, device=device,
                     progress=lambda it, total, _, lr=lr: progress(it, total, f"learning-rate trial {lr:g}"))
            per_image[lr] = held_out_losses(trial, held, config, use_teacher, device)
        except DivergedError:
            per_image[lr] = None
        del trial
    chosen, lowest, se = choose_rate(per_image)
    losses = {lr: float(v.mean()) if v is not None and bool(torch.isfinite(v).all()) else math.inf
              for lr, v in per_image.items()}
    images = max(len(v) for v in per_image.values() if v is not None)
    return LrChoice(chosen, losses, trial_batches, images, lowest, se)


def _total_batches(per_epoch: int, config: FinetuneConfig) -> int:
    """Batches a run of ``config.epochs`` over ``per_epoch`` batches trains on, capped by ``max_batches``."""
    total = max(1, math.ceil(per_epoch * config.epochs))
    return total if config.max_batches is None else min(total, config.max_batches)


def finetune_auto(
    model: nn.Module,
    fit_loader: Callable[[], Iterable],
    config: FinetuneConfig,
    teacher: nn.Module | None = None,
    device: torch.device | None = None,
    progress: ProgressFn = no_progress,
    trial_loader: Callable[[], Iterable] | None = None,
    held: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> FinetuneReport:
    """``finetune`` on ``fit_loader()``, after ``choose_lr`` (trials on ``trial_loader()``, judged on ``held``)
    when ``config.lr`` is None."""
    if config.lr is not None:
        return finetune(model, fit_loader(), config, teacher=teacher, device=device, progress=progress)
    if trial_loader is None or held is None:
        raise UsageError("choosing the learning rate needs trial data and held-out data")
    loader = fit_loader()
    total = _total_batches(len(loader), config)  # type: ignore[arg-type]
    choice = choose_lr(model, trial_loader, held, config, total, teacher=teacher, device=device, progress=progress)
    log.info("fine-tuning learning rate %g chosen by trials (held-out loss %s)", choice.lr, choice.held_out_loss)
    report = finetune(model, loader, replace(config, lr=choice.lr), teacher=teacher, device=device,
                      progress=progress)
    return replace(report, lr_choice=choice.to_dict())


def finetune(
    model: nn.Module,
    loader: Iterable,
    config: FinetuneConfig,
    teacher: nn.Module | None = None,
    device: torch.device | None = None,
    progress: ProgressFn = no_progress,
) -> FinetuneReport:
    """Train ``model`` in place on labeled batches; distill from ``teacher`` when ``config.distill``.

    ``config.lr`` must be set here; ``finetune_auto`` chooses it first when it is None."""
    if config.lr is None:
        raise UsageError("finetune needs a learning rate; choose_lr picks one")
    if not 0.0 <= config.ema < 1.0:
        raise UsageError(f"the weight-averaging decay must be in [0, 1), got {config.ema}")
    device = device or next(model.parameters()).device
    per_epoch = len(loader)  # type: ignore[arg-type]
    if per_epoch == 0:
        raise RescompressError("the fine-tuning data holds fewer images than one batch; lower --batch-size")
    total = _total_batches(per_epoch, config)
    use_teacher = config.distill and teacher is not None
    if use_teacher:
        teacher.to(device).eval()
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    losses: list[float] = []
    images = 0
    gen = torch.Generator().manual_seed(config.seed)
    averaged = _WeightAverage(model, config.ema) if config.ema > 0 else None

    def batches() -> Iterator:
        done = 0
        while done < total:
            for batch in loader:
                if done >= total:
                    return
                yield batch
                done += 1

    for x, y in progress(batches(), total, "fine-tuning"):
        x, y = x.to(device), y.to(device)
        if bool((y < 0).any()):
            raise RescompressError("fine-tuning needs labels for every image")
        if config.augment:
            x = augment_batch(x, gen)
        logits = as_two_class(model(x))
        t_logits = None
        if use_teacher:
            with torch.no_grad():
                t_logits = as_two_class(teacher(x))
        loss = _objective(logits, y, t_logits, config)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if not math.isfinite(loss.item()):
            raise DivergedError("fine-tuning diverged (loss is not finite); lower --lr")
        losses.append(loss.item())
        images += len(x)
        if averaged is not None:
            averaged.update()
    if averaged is not None:
        averaged.copy_to_model()
    model.eval()
    head = losses[: max(1, len(losses) // 10)]
    tail = losses[-max(1, len(losses) // 10):]
    return FinetuneReport(
        epochs=config.epochs, batches=len(losses), images=images, distill=use_teacher,
        first_loss=sum(head) / len(head), last_loss=sum(tail) / len(tail), device=str(device), lr=config.lr,
    )
