"""The pruning loop: criterion scores -> per-group widths for the target -> Torch-Pruning removes channels.

:func:`prune_model` copies the model, then for each of ``steps`` schedule steps traces the channel groups,
scores them with the chosen criterion, finds the channel ratio whose (rounded) widths reach the step's
MAC target (or applies the requested ratio), removes the lowest-scoring channels of every group through
Torch-Pruning, checks that the network still runs with unchanged input and output shapes, and recovers
(least-squares layer reconstruction, BN re-estimation, then fine-tuning with distillation) when data is
given. A latency target is first turned into a MAC target by measuring pruned candidates in ONNX Runtime.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from rescompress.errors import RescompressError, UsageError
from rescompress.folding import count_batchnorm
from rescompress.profile import count_macs, count_params
from rescompress.pruning.finetune import (
    FinetuneConfig,
    FinetuneReport,
    ProgressFn,
    as_two_class,
    finetune_auto,
    no_progress,
    pick_device,
    recalibrate_bn,
)
from rescompress.pruning.groups import MacModel, build_graph, channel_groups, prune_groups
from rescompress.pruning.importance import CRITERIA, TaylorImportance, make_importance
from rescompress.pruning.reconstruct import (
    ReconstructReport,
    cache_bytes_per_image,
    fit_images,
    held_out_images,
    logit_error,
    reconstruct_layers,
    take_batches,
)
from rescompress.pruning.schedule import linear_steps
from rescompress.pruning.speed import LatencyResult, ort_latency
from rescompress.pruning.targets import (
    GroupSpec,
    channels_to_remove,
    default_round_to,
    effective_round_to,
    fit_fraction,
    plan_keep,
    refine_keep,
    round_keep,
    search_ratio,
    validate_fraction,
)
from rescompress.spec import Preprocess

log = logging.getLogger(__name__)

MAX_SEARCH_RATIO = 0.99


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how. Exactly one of ``ratio``, ``target_macs``, ``target_latency`` is set.

    ``ratio``: fraction of channels removed; ``target_macs`` / ``target_latency``: fraction of MACs /
    of measured ORT CPU latency kept. ``round_to=None`` picks the CPU's SIMD width. When data is given,
    ``reconstruct`` images refit the pruned layers (:mod:`rescompress.pruning.reconstruct`; ``None``: on,
    with ``_default_reconstruct`` images, only where no fine-tuning follows), then ``bn_recalib`` images
    re-estimate BatchNorm, after each step; ``finetune`` (epochs > 0) trains after each step, its epochs
    split evenly across the steps.
    """

    ratio: float | None = None
    target_macs: float | None = None
    target_latency: float | None = None
    criterion: str = "l1"
    ranking: str = "uniform"
    max_layer_ratio: float = 0.8
    # Uniform ranking with a MAC or latency target (not --ratio, not global ranking): groups written by several
    # convs (a residual stream) lose this times the other groups' channel ratio. 1 (the default) treats all
    # alike; 0 keeps the residual streams whole, which measured worse after fine-tuning (ResNet-20 at 40% of the
    # MACs, benchmarks/results/prune_recipe_select.json).
    residual_scale: float = 1.0
    round_to: int | None = None
    steps: int = 1
    bn_recalib: int = 1024
    reconstruct: int | None = None  # None: _default_reconstruct's count where data is given and no fine-tuning runs
    finetune: FinetuneConfig | None = None
    taylor_images: int = 256
    latency_batch: int = 8
    batch_size: int = 64
    seed: int = 0
    device: str = "auto"

    @property
    def active_finetune(self) -> FinetuneConfig | None:
        """``finetune`` when it trains (epochs > 0), else None: BatchNorm re-estimation only."""
        return self.finetune if self.finetune is not None and self.finetune.epochs > 0 else None

    def validate(self) -> None:
        given = [n for n in ("ratio", "target_macs", "target_latency") if getattr(self, n) is not None]
        if len(given) != 1:
            raise UsageError("give exactly one of --ratio, --target-macs, --target-latency")
        validate_fraction(self.ratio, "--ratio")
        validate_fraction(self.target_macs, "--target-macs")
        validate_fraction(self.target_latency, "--target-latency")
        validate_fraction(self.max_layer_ratio, "--max-layer-ratio")
        if self.ratio is not None and self.ratio > self.max_layer_ratio and self.ranking == "uniform":
            raise UsageError(
                f"--ratio {self.ratio} removes more than --max-layer-ratio {self.max_layer_ratio} of every layer"
            )
        if self.criterion not in CRITERIA:
            raise UsageError(
                f"unknown pruning criterion {self.criterion!r}; choose one of: {', '.join(CRITERIA)}"
            )
        if self.ranking not in ("uniform", "global"):
            raise UsageError(f"ranking must be 'uniform' or 'global', got {self.ranking!r}")
        pick_device(self.device)  # an unknown or unavailable device fails before the model is loaded
        if self.round_to is not None and self.round_to < 1:
            raise UsageError(f"--round-to must be a positive integer, got {self.round_to}")
        if self.steps < 1:
            raise UsageError(f"--steps must be at least 1, got {self.steps}")
        if self.bn_recalib < 0:
            raise UsageError(f"--bn-recalib must be >= 0, got {self.bn_recalib}")
        if self.reconstruct is not None and self.reconstruct < 0:
            raise UsageError(f"--reconstruct must be >= 0, got {self.reconstruct}")
        if not 0.0 <= self.residual_scale <= 1.0:  # NaN fails this too
            raise UsageError(f"residual_scale must be in [0, 1], got {self.residual_scale}")
        if self.finetune is not None and self.finetune.lr is not None and not 0 < self.finetune.lr <= 10:
            raise UsageError(f"--lr must be in (0, 10] or auto, got {self.finetune.lr}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["finetune"] = self.finetune.to_dict() if self.finetune else None
        return d


@dataclass(frozen=True)
class ModelStats:
    params: int
    macs: int
    top1: float | None = None  # percent, like `rescompress evaluate`
    latency_ms: dict[int, float] | None = None  # ORT CPU median per batch size

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.latency_ms is not None:
            d["latency_ms"] = {str(k): v for k, v in self.latency_ms.items()}
        return d


@dataclass(frozen=True)
class GroupChange:
    root: str
    width_before: int
    width_after: int
    round_step: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StepReport:
    step: int
    ratio: float  # fraction of the original channels (summed over groups) gone after this step
    macs: int
    params: int
    macs_target: int | None
    bn_recalib_images: int
    finetune: FinetuneReport | None
    reconstruct: ReconstructReport | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["finetune"] = self.finetune.to_dict() if self.finetune else None
        d["reconstruct"] = self.reconstruct.to_dict() if self.reconstruct else None
        return d


@dataclass(frozen=True)
class PruneReport:
    criterion: str
    ranking: str
    round_to: int
    round_to_reason: str
    target: dict
    steps: tuple[StepReport, ...]
    groups: tuple[GroupChange, ...]
    latency_search: tuple[dict, ...] = ()
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {
            "criterion": self.criterion, "ranking": self.ranking, "round_to": self.round_to,
            "round_to_reason": self.round_to_reason, "target": dict(self.target),
            "steps": [s.to_dict() for s in self.steps], "groups": [g.to_dict() for g in self.groups],
            "latency_search": list(self.latency_search), "notes": list(self.notes),
        }


@dataclass
class PruneResult:
    """The pruned model (eval mode, CPU) with before/after statistics and what was done."""

    model: nn.Module
    before: ModelStats
    after: ModelStats
    report: PruneReport
    latency: LatencyResult | None = None
    config: PruneConfig | None = None

    @property
    def macs_kept(self) -> float:
        return self.after.macs / self.before.macs

    def to_dict(self) -> dict:
        return {
            "before": self.before.to_dict(), "after": self.after.to_dict(), "macs_kept": self.macs_kept,
            "params_kept": self.after.params / self.before.params, "report": self.report.to_dict(),
            "latency": self.latency.to_dict() if self.latency else None,
            "config": self.config.to_dict() if self.config else None,
        }


# ------------------------------------------------------------------------------------------ helpers


def _is_labeled(data: Dataset) -> bool:
    info = getattr(data, "info", None)
    if info is not None and hasattr(info, "labeled"):
        return bool(info.labeled)
    _, y = data[0]
    return int(y) >= 0


def _loader(data: Dataset, batch_size: int, shuffle: bool, seed: int, limit: int | None = None,
            drop_last: bool = False):
    from rescompress.data import make_loader

    # Training drops a ragged last batch only when it is small (a batch of one breaks BatchNorm, a few images
    # give noisy batch statistics) and something is left; a larger remainder is trained on, not thrown away.
    n = len(data) if limit is None else min(limit, len(data))
    drop_last = drop_last and n >= batch_size and 0 < n % batch_size < max(2, batch_size // 4)
    return make_loader(data, batch_size=batch_size, shuffle=shuffle, seed=seed, limit=limit, drop_last=drop_last)


LR_HELD_OUT = 512  # at most this many fine-tuning images judge the learning-rate trials (--lr auto)


def _lr_held_out(n: int, batch_size: int) -> int:
    """How many of ``n`` fine-tuning images judge the learning-rate trials; refuses data too small to split."""
    n_held = min(LR_HELD_OUT, n // 10)
    if n_held < 2 or n - n_held < batch_size:
        raise UsageError(f"--lr auto needs a held-out tenth of the fine-tuning data and a batch to train on; "
                         f"{n} images are too few for --batch-size {batch_size} (pass a learning rate, e.g. --lr "
                         "0.01, or a smaller --batch-size)")
    return n_held


def _finetune_step(work, data, config: PruneConfig, ft: FinetuneConfig, teacher, device, progress, k: int):
    """Fine-tune ``work`` on ``data``; with ``ft.lr`` None, the rate is chosen first by trials that train on
    all but a seeded held-out tenth (at most ``LR_HELD_OUT`` images) and are judged on it; the run itself then
    trains on everything. ``prune_model`` chooses at the first of ``--steps`` only and keeps that rate."""
    tutor = copy.deepcopy(teacher) if ft.distill else None

    def everything():
        return _loader(data, config.batch_size, True, config.seed + k, drop_last=True)

    if ft.lr is not None:
        return finetune_auto(work, everything, ft, teacher=tutor, device=device, progress=progress)
    n = len(data)
    n_held = _lr_held_out(n, config.batch_size)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed + 7919 * k)).tolist()
    held, rest = Subset(data, order[:n_held]), Subset(data, order[n_held:])
    return finetune_auto(
        work, everything, ft, teacher=tutor, device=device, progress=progress,
        trial_loader=lambda: _loader(rest, config.batch_size, True, config.seed + k, drop_last=True),
        held=_loader(held, config.batch_size, False, config.seed),
    )


@torch.no_grad()
def _check_runs(model: nn.Module, example: torch.Tensor, expected_out: tuple[int, ...]) -> None:
    model.eval()
    try:
        out = model(example)
    except Exception as exc:  # a broken coupling would show up here as a shape mismatch
        raise RescompressError(f"the pruned model no longer runs ({type(exc).__name__}: {exc})") from exc
    if tuple(out.shape) != expected_out:
        raise RescompressError(f"pruning changed the output shape from {expected_out} to {tuple(out.shape)}")


@torch.no_grad()
def top1_accuracy(model: nn.Module, data: Dataset, batch_size: int = 256, limit: int | None = None,
                  device: torch.device | None = None) -> float:
    """Top-1 accuracy (a fraction) of ``model`` on labeled ``data`` (a seeded ``limit`` of its items)."""
    from rescompress.data import make_loader

    device = device or next(model.parameters()).device
    model.eval()
    correct = total = 0
    for x, y in make_loader(data, batch_size=batch_size, limit=limit):
        if bool((y < 0).any()):
            raise RescompressError("accuracy needs labeled evaluation data")
        correct += int((as_two_class(model(x.to(device))).argmax(1).cpu() == y).sum())
        total += len(y)
    return correct / max(1, total)


class _State:
    """Original widths by group root name, so rounding and caps stay fixed across steps, and which of the
    original output channels each layer still has (for layer reconstruction)."""

    def __init__(self) -> None:
        self.original: dict[str, int] = {}
        self.kept_out: dict[str, list[int]] = {}

    def record(self, groups, remove: dict[int, list[int]]) -> None:
        for g in groups:
            gone = set(remove.get(g.index, ()))
            kept = [i for i in range(g.width) if i not in gone]
            for name in g.out_layers:
                prev = self.kept_out.get(name, range(g.width))
                self.kept_out[name] = [prev[i] for i in kept]


def _specs(groups, state: _State, round_to: int, max_layer_ratio: float, convs: set[str] = frozenset(),
           residual_scale: float = 1.0) -> list[GroupSpec]:
    specs = []
    for g in groups:
        orig = state.original.setdefault(g.root_name, g.width)
        step = effective_round_to(orig, round_to)
        min_keep = min(orig, math.ceil(orig * (1.0 - max_layer_ratio) / step) * step)
        residual = sum(name in convs for name in g.out_layers) > 1  # several convs write the same channels
        specs.append(GroupSpec(g.index, g.width, step, max(1, min(min_keep, g.width)),
                               residual_scale if residual else 1.0))
    return specs


def _score(groups, criterion, model, data, config: PruneConfig) -> dict[int, torch.Tensor]:
    if isinstance(criterion, TaylorImportance):
        if data is None:
            raise UsageError("the taylor criterion needs data: pass --finetune-data")
        loader = _loader(data, min(config.batch_size, config.taylor_images), False, config.seed,
                         limit=config.taylor_images)
        criterion.accumulate(model, loader)
    try:
        return {g.index: criterion(g) for g in groups}
    finally:
        if isinstance(criterion, TaylorImportance):
            model.zero_grad(set_to_none=True)


def _prune_step(model, example, out_shape, config: PruneConfig, state: _State, round_to: int, *,
                ratio: float | None, macs_target: int | None, data) -> tuple[float, list[GroupChange]]:
    """One cut: plan widths so that ``ratio`` of the *original* channels are gone after it (or for
    ``macs_target``), remove channels, verify.

    Widths are planned from the original ones, not as a fraction of the current ones: rounding to
    ``round_to`` at every step would otherwise compound (three steps of 1/6, 1/5, 1/4 of a 64-wide layer
    rounded to 16 end at 16 channels, not 32)."""
    dg = build_graph(model, example)
    groups = channel_groups(model, dg)
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    specs = _specs(groups, state, round_to, config.max_layer_ratio, convs, config.residual_scale)
    criterion = make_importance(config.criterion, config.seed)
    scores = _score(groups, criterion, model, data, config)
    if macs_target is not None:
        mac_model = MacModel(model, groups, (1, *example.shape[1:]))

        def macs_at(r: float) -> int:
            return mac_model.macs(plan_keep(specs, r, config.ranking, scores))

        ratio = search_ratio(macs_at, macs_target, MAX_SEARCH_RATIO)
        keep = refine_keep(specs, plan_keep(specs, ratio, config.ranking, scores), mac_model.macs, macs_target)
    elif config.ranking == "uniform":
        keep = {s.index: min(s.width, round_keep(o, o * (1.0 - ratio), s.step, s.min_keep))
                for s, o in zip(specs, (state.original[g.root_name] for g in groups), strict=True)}
    else:  # global: the smallest share of the current channels whose rounded plan reaches the goal
        goal = int(round((1.0 - ratio) * sum(state.original[g.root_name] for g in groups)))

        def kept_at(r: float) -> int:
            return sum(plan_keep(specs, r, "global", scores).values())

        r = MAX_SEARCH_RATIO if kept_at(MAX_SEARCH_RATIO) > goal else search_ratio(kept_at, goal, MAX_SEARCH_RATIO)
        keep = plan_keep(specs, r, "global", scores)
    remove = {g.index: channels_to_remove(scores[g.index], keep[g.index]) for g in groups}
    prune_groups(dg, groups, remove)
    state.record(groups, remove)
    _check_runs(model, example, out_shape)
    changes = [GroupChange(g.root_name, g.width, keep[g.index], s.step) for g, s in zip(groups, specs, strict=True)]
    removed = 1.0 - sum(keep.values()) / sum(state.original[g.root_name] for g in groups)
    return removed, changes


# ------------------------------------------------------------------------------------------ entry point


def prune_model(
    model: nn.Module,
    preprocess: Preprocess,
    config: PruneConfig,
    data: Dataset | None = None,
    eval_data: Dataset | None = None,
    eval_limit: int | None = None,
    measure_latency: bool = False,
    latency_batches: tuple[int, ...] = (1, 8),
    progress: ProgressFn = no_progress,
) -> PruneResult:
    """Prune a copy of ``model`` to ``config``'s target; the input model is left untouched.

    ``data`` (a dataset of preprocessed images, labeled or not) feeds the taylor criterion, BN
    re-estimation and fine-tuning; ``eval_data`` (labeled) adds top-1 before/after; ``measure_latency``
    adds ORT CPU latency at ``latency_batches``.
    """
    config.validate()
    notes: list[str] = []
    if config.round_to is None:
        round_to, reason = default_round_to()
    else:
        round_to, reason = config.round_to, "--round-to"
    example = torch.randn(preprocess.input_shape(2), generator=torch.Generator().manual_seed(config.seed))
    teacher = copy.deepcopy(model).cpu().eval()
    work = copy.deepcopy(model).cpu().eval()
    with torch.no_grad():
        out_shape = tuple(teacher(example).shape)
    input_shape = preprocess.input_shape(1)
    before = ModelStats(count_params(teacher), count_macs(teacher, input_shape))

    labeled = data is not None and _is_labeled(data)
    ft = config.active_finetune
    if ft is not None and data is None:
        raise UsageError("fine-tuning needs data: pass --finetune-data")
    has_bn = count_batchnorm(teacher) > 0
    unlabeled = ft is not None and not labeled
    if unlabeled:
        ft = None
    if ft is not None and not has_bn:
        raise UsageError(
            "the model has no BatchNorm (folded): this fine-tuning recipe (its learning rate) is made for a model "
            "with BatchNorm and diverges without; prune and fine-tune the unfolded model and fold afterwards, or "
            "prune without fine-tuning (--epochs 0)"
        )
    if ft is not None and ft.lr is None:
        _lr_held_out(len(data), config.batch_size)  # refused now, not after pruning
    if data is None and config.bn_recalib > 0 and has_bn:
        notes.append("no data given: BatchNorm statistics were not re-estimated (accuracy may drop sharply)")
    rec_images = 0 if data is None else (config.reconstruct if config.reconstruct is not None
                                         else _default_reconstruct(teacher, example) if ft is None else 0)
    if data is None and config.reconstruct:
        notes.append("no data given: layers were not refit (--reconstruct needs --finetune-data)")
    if data is not None and rec_images > len(data):
        if config.reconstruct is not None:
            notes.append(f"layer reconstruction used the {len(data)} images the data holds, not {rec_images}")
        rec_images = len(data)
    if unlabeled:
        instead = [what for what, on in (("refitting the pruned layers to the unpruned outputs", rec_images > 0),
                                         ("re-estimating BatchNorm statistics", has_bn and config.bn_recalib > 0))
                   if on]
        notes.append("the fine-tuning data has no labels: "
                     + (" and ".join(instead) + " instead of fine-tuning" if instead else "no fine-tuning"))
    if data is not None and ft is None and not has_bn and rec_images == 0:
        notes.append("the model has no BatchNorm (folded) and --reconstruct is 0: nothing recovers the accuracy "
                     "lost by pruning; prune the unfolded model, then fold, or leave --reconstruct on")
    grouped = [n for n, m in teacher.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    if grouped:
        notes.append(f"{len(grouped)} grouped convolution(s) (e.g. {grouped[0]}, as in ResNeXt): the channels "
                     "that feed them are not pruned, so those blocks keep their inner width")

    target: dict = {}
    search: list[dict] = []
    macs_fraction = config.target_macs
    if config.target_latency is not None:
        macs_fraction, search = _latency_to_macs(teacher, example, out_shape, config, round_to, data, input_shape)
        target["target_latency"] = config.target_latency
        target["macs_fraction_found"] = macs_fraction
    if config.ratio is not None:
        target["ratio"] = config.ratio
    if config.target_macs is not None:
        target["target_macs"] = config.target_macs

    device = pick_device(config.device)
    state = _State()
    steps: list[StepReport] = []
    changes: dict[str, GroupChange] = {}
    per_step_ft = replace(ft, epochs=ft.epochs / config.steps) if ft is not None else None
    goals = (linear_steps(1.0, macs_fraction, config.steps) if macs_fraction is not None
             else linear_steps(0.0, config.ratio, config.steps))
    for k, goal in enumerate(goals, start=1):
        work.cpu().eval()
        if macs_fraction is not None:
            ratio, step_changes = _prune_step(work, example, out_shape, config, state, round_to, ratio=None,
                                              macs_target=int(goal * before.macs), data=data)
            macs_target = int(goal * before.macs)
        else:
            ratio, step_changes = _prune_step(work, example, out_shape, config, state, round_to,
                                              ratio=goal, macs_target=None, data=data)
            macs_target = None
        for c in step_changes:
            first = changes.get(c.root)
            changes[c.root] = replace(c, width_before=first.width_before) if first else c
        recal = 0
        ft_report = rec_report = None
        if rec_images > 0:
            work, rec_report, note = _reconstruct_step(teacher, work, state, config, data, rec_images, k, device)
            if note:
                notes.append(note)
        if data is not None and config.bn_recalib > 0:
            work.to(device)
            # Own batch size: statistics need several images per batch (one image gives no variance where a
            # layer's output is 1x1), whatever --batch-size the fine-tuning uses.
            bn_batch = max(config.batch_size, BN_RECALIB_BATCH)
            recal = recalibrate_bn(work, _loader(data, bn_batch, True, config.seed + k), config.bn_recalib, device)
        if per_step_ft is not None:
            work.to(device)
            ft_report = _finetune_step(work, data, config, per_step_ft, teacher, device, progress, k)
            if per_step_ft.lr is None:  # chosen once: later steps would judge on images earlier steps trained on
                per_step_ft = replace(per_step_ft, lr=ft_report.lr)
        work.cpu().eval()
        steps.append(StepReport(k, ratio, count_macs(work, input_shape), count_params(work), macs_target, recal,
                                ft_report, rec_report))
        log.info("step %d/%d: ratio %.3f, MACs %d", k, config.steps, ratio, steps[-1].macs)

    done = steps[-1].ratio
    if config.ratio is not None and (abs(done - config.ratio) > 0.05 or done == 0):
        why = []
        if round_to > 1:  # nearest multiples: narrow layers (steps of 4 on a 16-wide layer) can overshoot too
            why.append(f"widths are rounded to the nearest multiples of --round-to (here {round_to}; a smaller "
                       "one gets closer)")
        if done < config.ratio and config.ranking == "global":  # uniform ratios are refused above the cap
            why.append(f"--max-layer-ratio {config.max_layer_ratio:g} caps each layer")
        notes.append(f"removed {done:.0%} of the channels, not {config.ratio:.0%}: "
                     + ("; ".join(why) or "widths are whole channels"))
    sizes = [(before.macs, before.params)] + [(s.macs, s.params) for s in steps]
    idle = [s.step for s, prev in zip(steps, sizes[:-1], strict=True) if (s.macs, s.params) == prev]
    if idle and config.steps > 1:
        notes.append(f"step{'s' if len(idle) > 1 else ''} {', '.join(map(str, idle))} of {config.steps} removed no "
                     f"channel (the rounded widths did not change); fewer --steps or a smaller --round-to "
                     "spread the pruning")
    if search and min(p["latency_ratio"] for p in search) > config.target_latency:
        notes.append(f"no pruned candidate reached {config.target_latency:.0%} of the latency (best "
                     f"{min(p['latency_ratio'] for p in search):.0%}): pruned to the smallest MAC fraction tried, "
                     f"{macs_fraction:.0%}; try --target-macs")
    after = ModelStats(count_params(work), count_macs(work, input_shape))
    if eval_data is not None:
        before = replace(before, top1=100 * top1_accuracy(teacher, eval_data, limit=eval_limit))
        after = replace(after, top1=100 * top1_accuracy(work, eval_data, limit=eval_limit))
    latency = None
    if measure_latency:
        latency = ort_latency({"before": teacher, "after": work}, input_shape, batch_sizes=tuple(latency_batches))
        before = replace(before, latency_ms=dict(latency.median_ms["before"]))
        after = replace(after, latency_ms=dict(latency.median_ms["after"]))
    report = PruneReport(
        criterion=config.criterion, ranking=config.ranking, round_to=round_to, round_to_reason=reason,
        target=target, steps=tuple(steps), groups=tuple(changes.values()), latency_search=tuple(search),
        notes=tuple(notes),
    )
    # The config as run: the default reconstruction resolved to its image count.
    return PruneResult(work.eval(), before, after, report, latency, replace(config, reconstruct=rec_images))


def _reconstruct_step(teacher: nn.Module, work: nn.Module, state: _State, config: PruneConfig, data,
                      rec_images: int, k: int, device: torch.device) -> tuple[nn.Module, ReconstructReport, str | None]:
    """Refit ``work``'s pruned layers (:func:`reconstruct_layers`) and judge the refit as a whole.

    The refit is judged on the images no layer was fit on, after a BatchNorm re-estimation on the fit images
    alone (the judged images must stay out of it too: statistics taken on them would flatter any model there),
    and kept only if the logits come closer to the unpruned model's than with the plain pruned weights; each
    layer's own check cannot see what the layers after it make of its change. Returns the model to go on with
    (the refit or the plain pruned one), the report, and a note when the refit was dropped.
    """
    work.to(device)
    teacher.to(device)
    try:
        batches = take_batches(_loader(data, max(config.batch_size, BN_RECALIB_BATCH), True, config.seed + k),
                               rec_images, device)
        sliced = copy.deepcopy(work)
        report = reconstruct_layers(teacher, work, state.kept_out, batches)
        if not report.layers:  # every layer kept its slice: the model is the plain pruned one
            return work, report, None
        fit, held = fit_images(batches), held_out_images(batches)
        judged = [work, sliced]
        if config.bn_recalib > 0:
            judged = [copy.deepcopy(m) for m in judged]
            for m in judged:
                if count_batchnorm(m) and sum(len(b) for b in fit) >= 2:
                    recalibrate_bn(m, [(b, torch.zeros(len(b))) for b in fit], config.bn_recalib, device)
        report = replace(report, logit_error_refit=logit_error(teacher, judged[0], held),
                         logit_error_sliced=logit_error(teacher, judged[1], held))
        if report.logit_error_refit < report.logit_error_sliced:
            return work, report, None
        note = (f"step {k}: layer reconstruction left the logits further from the unpruned model's on held-out "
                f"images (relative error {report.logit_error_refit:.3f}, plain pruned weights "
                f"{report.logit_error_sliced:.3f}): kept the plain pruned weights")
        return sliced, replace(report, used=False), note
    finally:
        teacher.cpu()


BN_RECALIB_BATCH = 32  # smallest batch for BatchNorm re-estimation and layer reconstruction
# Layer reconstruction is on by default only where no fine-tuning follows (unlabeled data, --epochs 0): there it
# recovers far more than BatchNorm re-estimation alone (benchmarks/results/prune_recovery_*.json); followed by one
# epoch of fine-tuning its first version (one fixed ridge) was measured worse
# (benchmarks/results/prune_recipe_reconstruct_final.json).
RECONSTRUCT_IMAGES = 512
RECONSTRUCT_MIN_IMAGES = 32
RECONSTRUCT_CACHE_BYTES = 1 << 30  # the default image count keeps the block-input cache under this


def _default_reconstruct(teacher: nn.Module, example: torch.Tensor) -> int:
    """RECONSTRUCT_IMAGES, fewer where the block-input cache would outgrow RECONSTRUCT_CACHE_BYTES (large inputs:
    resnet50 at 224x224 gets 83 images), but never fewer than RECONSTRUCT_MIN_IMAGES (which can pass the budget
    for very large inputs)."""
    per_image = max(1, cache_bytes_per_image(teacher, example[:1]))
    return max(RECONSTRUCT_MIN_IMAGES, min(RECONSTRUCT_IMAGES, RECONSTRUCT_CACHE_BYTES // per_image))


LATENCY_PROBES = (0.7, 0.85, 1.0, 1.15, 1.3)  # MAC fractions tried, as multiples of the latency target


def _latency_to_macs(teacher, example, out_shape, config: PruneConfig, round_to: int, data,
                     input_shape) -> tuple[float, list[dict]]:
    """Find the MAC fraction whose pruned model runs at ``target_latency`` of the original (ORT CPU).

    Candidates pruned to a few MAC fractions around the target are timed together with the original in
    one interleaved run (so machine load hits all alike), and a line through their latency ratios is
    solved for the target (``targets.fit_fraction``).
    """
    goal = config.target_latency
    base_macs = count_macs(teacher, input_shape)
    models: dict[str, nn.Module] = {"base": teacher}
    fracs: dict[str, float] = {}
    for mult in LATENCY_PROBES:
        frac = min(0.98, goal * mult)
        cand = copy.deepcopy(teacher)
        try:
            _prune_step(cand, example, out_shape, config, _State(), round_to, ratio=None,
                        macs_target=int(frac * base_macs), data=data)
        except RescompressError:
            continue  # this probe is beyond the per-layer cap; the others still bracket the target
        name = f"macs_{frac:.3f}"
        models[name] = cand
        fracs[name] = count_macs(cand, input_shape) / base_macs
    if not fracs:
        raise RescompressError(
            f"no model near {goal:.0%} of the latency can be pruned within --max-layer-ratio {config.max_layer_ratio}"
        )
    lat = ort_latency(models, input_shape, batch_sizes=(config.latency_batch,), rounds=5, iters=5)
    points = [(fracs[n], lat.ratio(n, "base", config.latency_batch)) for n in fracs]
    found = fit_fraction(points, goal)
    trace = [{"macs_fraction": x, "latency_ratio": y, "batch": config.latency_batch} for x, y in points]
    log.info("latency search: %s -> MAC fraction %.3f", trace, found)
    return found, trace
