"""Optimization profiles for TensorRT engines: batch ranges, their parsing, and splitting work across them.

A TensorRT engine with a dynamic batch dimension is built for one or more *optimization profiles*, each a
``min ≤ opt ≤ max`` range of batch sizes (kernels are tuned for ``opt``). This module holds the pure part:
``parse_profile("1:8:32")``, the full input shapes a profile means for a given ``(C, H, W)``, and how a
runner splits a batch larger than any profile's ``max`` into chunks. Nothing here needs TensorRT.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rescompress.errors import UsageError


class ProfileError(UsageError):
    """A batch profile string or combination of profiles is invalid."""


@dataclass(frozen=True)
class ProfileSpec:
    """One optimization profile over the batch dimension: ``min ≤ opt ≤ max``, all ≥ 1."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if min(self.min, self.opt, self.max) < 1:
            raise ProfileError(f"batch profile {self.text} must use positive batch sizes")
        if not self.min <= self.opt <= self.max:
            raise ProfileError(f"batch profile {self.text} must satisfy min <= opt <= max")

    @property
    def text(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"

    @property
    def is_static(self) -> bool:
        return self.min == self.max

    def contains(self, batch: int) -> bool:
        return self.min <= batch <= self.max

    def shapes(self, chw: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """The (min, opt, max) input shapes for an input whose non-batch dimensions are ``chw``."""
        rest = tuple(int(d) for d in chw)
        return (self.min, *rest), (self.opt, *rest), (self.max, *rest)

    def to_dict(self) -> dict:
        return {"min": self.min, "opt": self.opt, "max": self.max}

    @classmethod
    def from_dict(cls, d: dict) -> ProfileSpec:
        return cls(int(d["min"]), int(d["opt"]), int(d["max"]))


def parse_profile(text: str) -> ProfileSpec:
    """``"1:8:32"`` -> ProfileSpec(1, 8, 32); a single ``"8"`` -> 8:8:8 (a static batch of 8)."""
    parts = [p.strip() for p in str(text).strip().split(":")]
    if len(parts) not in (1, 3) or any(not p for p in parts):
        raise ProfileError(f"batch profile {text!r} must be N or MIN:OPT:MAX, e.g. 8 or 1:8:32")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ProfileError(f"batch profile {text!r} must contain integers, e.g. 1:8:32") from None
    if len(values) == 1:
        values = values * 3
    return ProfileSpec(*values)


def parse_profiles(texts: Sequence[str] | str) -> tuple[ProfileSpec, ...]:
    """Several profiles, from repeated options or one comma-separated string (``"1:1:1,8:16:32"``)."""
    items = [texts] if isinstance(texts, str) else list(texts)
    specs: list[ProfileSpec] = []
    for item in items:
        specs.extend(parse_profile(t) for t in str(item).split(",") if t.strip())
    if not specs:
        raise ProfileError("at least one batch profile is needed, e.g. --batch 1:8:32")
    if len(set(specs)) != len(specs):
        raise ProfileError(f"duplicate batch profiles: {', '.join(s.text for s in specs)}")
    return tuple(specs)


def choose_profile(profiles: Sequence[ProfileSpec], batch: int) -> int | None:
    """Index of the profile to run ``batch`` images in one go, or None if no profile holds it.

    Among the profiles that contain ``batch``, the one whose ``opt`` is closest wins, because TensorRT
    tuned its kernels for that size.
    """
    fitting = [i for i, p in enumerate(profiles) if p.contains(batch)]
    if not fitting:
        return None
    return min(fitting, key=lambda i: (abs(profiles[i].opt - batch), i))


def plan_batches(profiles: Sequence[ProfileSpec], batch: int) -> list[tuple[int, int, int]]:
    """Split ``batch`` images into ``(start, stop, profile_index)`` chunks that the profiles can run.

    A batch that no profile holds is cut into the largest chunks some profile's ``max`` allows; a
    remainder smaller than every profile's ``min`` cannot run and is refused with a message naming them.
    """
    if batch < 1:
        raise ProfileError(f"batch size must be positive, got {batch}")
    if not profiles:
        raise ProfileError("the engine has no optimization profiles")
    chunks: list[tuple[int, int, int]] = []
    start = 0
    while start < batch:
        remaining = batch - start
        index = choose_profile(profiles, remaining)
        size = remaining
        if index is None:
            smaller = [p.max for p in profiles if p.max <= remaining]
            if not smaller:
                raise ProfileError(
                    f"a batch of {remaining} images fits none of the engine's profiles "
                    f"({', '.join(p.text for p in profiles)}); rebuild with a --batch range covering it"
                )
            size = max(smaller)
            index = choose_profile(profiles, size)
        chunks.append((start, start + size, index))
        start += size
    return chunks
