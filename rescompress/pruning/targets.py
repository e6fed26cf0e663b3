"""Turning a target (channel ratio or MAC fraction) into a kept width per channel group.

Widths are rounded to multiples of ``round_to`` because CPU kernels work on SIMD lanes (16 fp32 lanes
with AVX-512, 8 with AVX2): an odd width pays for a full lane anyway. A group narrower than four lanes
cannot be rounded like that (a 16-channel CIFAR layer rounded to 16 can only stay 16), so the effective
step of a group is ``round_to`` halved until it is at most a quarter of the group's original width; a
group is never rounded to zero channels nor above its own width. ``uniform`` removes the same fraction
from every group; ``global`` ranks all channels together by mean-normalized score and removes the least
important, never more than ``max_layer_ratio`` of any group.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rescompress.errors import RescompressError, UsageError


def default_round_to(features: dict | None = None) -> tuple[int, str]:
    """The width multiple that suits this CPU's fp32 SIMD width, and why."""
    if features is None:
        from rescompress.system import cpu_features

        features = cpu_features()
    if features.get("avx512f"):
        return 16, "AVX-512 (16 fp32 lanes)"
    if features.get("avx2"):
        return 8, "AVX2 (8 fp32 lanes)"
    return 4, "no AVX2/AVX-512 (4 lanes assumed)"


def effective_round_to(width: int, round_to: int) -> int:
    """``round_to`` halved until it is at most a quarter of ``width`` (at least 1)."""
    if round_to < 1:
        raise UsageError(f"--round-to must be a positive integer, got {round_to}")
    step = round_to
    while step > 1 and step > width // 4:
        step //= 2
    return max(1, step)


def round_keep(width: int, keep: float, step: int, min_keep: int = 1) -> int:
    """``keep`` channels rounded to the nearest multiple of ``step``, within [max(step, min_keep), width]."""
    if keep >= width:
        return width
    rounded = int(math.floor(keep / step + 0.5)) * step
    floor = max(step, min_keep)
    return int(min(width, max(floor, rounded)))


@dataclass(frozen=True)
class GroupSpec:
    """What the planner needs to know about one group: current width, rounding step, minimum kept."""

    index: int
    width: int
    step: int
    min_keep: int
    scale: float = 1.0  # uniform ranking removes ``scale`` times the ratio from this group


def plan_keep(
    specs: list[GroupSpec], ratio: float, mode: str, scores: dict[int, torch.Tensor] | None = None
) -> dict[int, int]:
    """Kept channels per group when removing a ``ratio`` of channels (``uniform`` or ``global``)."""
    if not 0.0 <= ratio < 1.0:
        raise RescompressError(f"pruning ratio must be in [0, 1), got {ratio}")
    if mode == "uniform":
        return {s.index: round_keep(s.width, s.width * (1.0 - ratio * s.scale), s.step, s.min_keep) for s in specs}
    if mode != "global":
        raise RescompressError(f"ranking mode must be 'uniform' or 'global', got {mode!r}")
    if scores is None:
        raise RescompressError("global ranking needs channel scores")
    entries = []
    for s in specs:
        sc = scores[s.index].to(torch.float64)
        norm = sc / sc.mean().clamp_min(1e-12)
        entries += [(float(v), s.index) for v in norm]
    budget = int(round(ratio * sum(s.width for s in specs)))
    removable = {s.index: s.width - s.min_keep for s in specs}
    removed = {s.index: 0 for s in specs}
    for _, gi in sorted(entries, key=lambda e: e[0]):
        if budget <= 0:
            break
        if removed[gi] < removable[gi]:
            removed[gi] += 1
            budget -= 1
    return {s.index: round_keep(s.width, s.width - removed[s.index], s.step, s.min_keep) for s in specs}


def channels_to_remove(scores: torch.Tensor, keep: int) -> list[int]:
    """Indices of the ``len(scores) - keep`` lowest-scoring channels (ties broken by index)."""
    n = len(scores)
    if keep >= n:
        return []
    order = torch.argsort(scores.to(torch.float64), stable=True)
    return sorted(int(i) for i in order[: n - keep])


def search_ratio(macs_at: Callable[[float], int], target: int, max_ratio: float, iters: int = 40) -> float:
    """The smallest channel ratio in [0, max_ratio] whose predicted MACs are at most ``target``.

    MACs fall (in steps, because of rounding) as the ratio grows, so bisection finds the first step at or
    below the target. Raises if even ``max_ratio`` cannot reach it.
    """
    if macs_at(0.0) <= target:
        return 0.0
    if macs_at(max_ratio) > target:
        raise RescompressError(
            f"the target cannot be reached within each layer's cap (--max-layer-ratio) and rounding "
            f"(--round-to): best reachable {macs_at(max_ratio):,} MACs, target {target:,}; "
            "loosen the target or raise --max-layer-ratio"
        )
    lo, hi = 0.0, max_ratio
    for _ in range(iters):
        mid = (lo + hi) / 2
        if macs_at(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def refine_keep(
    specs: list[GroupSpec], keep: dict[int, int], macs_of: Callable[[dict[int, int]], int], target: int
) -> dict[int, int]:
    """Grow groups back one rounding step at a time while the MACs stay at or under ``target``.

    The ratio search moves every group at once, so with coarse rounding steps it can land well under the
    target; this closes the gap, giving width back first to the groups cut hardest (relative width).
    """
    keep = dict(keep)
    while True:
        order = sorted((keep[s.index] / s.width, s.index, s) for s in specs if keep[s.index] + s.step <= s.width)
        for _, _, s in order:
            trial = {**keep, s.index: keep[s.index] + s.step}
            if macs_of(trial) <= target:
                keep = trial
                break
        else:
            return keep


def fit_fraction(points: list[tuple[float, float]], goal: float) -> float:
    """The MAC fraction whose latency ratio is ``goal``, from measured (MAC fraction, latency ratio) points.

    A least-squares line through all points (one noisy measurement should not decide alone), solved for
    ``goal`` and kept inside the measured range; if noise makes the slope non-positive, the largest
    measured fraction whose ratio is at or under ``goal`` (else the smallest fraction) is used.
    """
    if not points:
        raise RescompressError("no latency measurements to fit")
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    n = len(points)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in points) / var if var > 0 else 0.0
    if slope <= 0:
        under = [x for x, y in points if y <= goal]
        return max(under) if under else min(xs)
    frac = mx + (goal - my) / slope
    return min(max(xs), max(min(xs), frac))


def validate_fraction(value: float | None, option: str, allow_one: bool = False) -> None:
    """Refuse a fraction outside (0, 1) (or (0, 1] with ``allow_one``) with a one-line message."""
    if value is None:
        return
    ok = 0.0 < value <= 1.0 if allow_one else 0.0 < value < 1.0
    if not ok or math.isnan(value):
        bound = "(0, 1]" if allow_one else "(0, 1)"
        raise UsageError(f"{option} must be in {bound}, got {value}")
