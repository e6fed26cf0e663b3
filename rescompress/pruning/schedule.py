"""Iterative pruning schedules as tiny pure functions: where each of K steps should land.

Pruning in K smaller steps (each followed by BN re-estimation or fine-tuning) lets the network adapt
between cuts. A step's target is interpolated between the start and the final target, linearly in the
quantity the user asked for (fraction of MACs kept, or fraction of channels removed).
"""

from __future__ import annotations

from rescompress.errors import UsageError


def linear_steps(start: float, end: float, steps: int) -> list[float]:
    """``steps`` values going linearly from just after ``start`` to exactly ``end``."""
    if steps < 1:
        raise UsageError(f"--steps must be at least 1, got {steps}")
    return [start + (end - start) * k / steps for k in range(1, steps + 1)]
