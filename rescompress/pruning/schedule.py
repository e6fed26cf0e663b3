"""Iterative pruning schedules as tiny pure functions: where each of K steps should land.

Pruning in K smaller steps (each followed by BN re-estimation or fine-tuning) lets the network adapt
between cuts. A step's target is interpolated between the start and the final target, linearly in the
quantity the user asked for (fraction of MACs kept, or fraction of channels removed).
"""

from __future__ import annotations

from rescompress.errors import RescompressError


def linear_steps(start: float, end: float, steps: int) -> list[float]:
    """``steps`` values going linearly from just after ``start`` to exactly ``end``."""
    if steps < 1:
        raise RescompressError(f"--steps must be at least 1, got {steps}")
    return [start + (end - start) * k / steps for k in range(1, steps + 1)]


def step_ratio(done: float, goal: float) -> float:
    """Fraction of the *current* channels to remove so that ``goal`` of the original ones are gone,
    when ``done`` of them are gone already."""
    if not 0.0 <= done <= goal < 1.0:
        raise RescompressError(f"invalid schedule step: {done} -> {goal}")
    return 1.0 - (1.0 - goal) / (1.0 - done)
