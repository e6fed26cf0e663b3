"""Input specifications and preprocessing presets shared by every stage.

A :class:`Preprocess` says how raw images become the tensor a model expects (size, channels, mean/std).
Presets are named, frozen objects; ``Preprocess.with_overrides`` applies command-line overrides and
validates them. The same object is written into ONNX metadata so later stages recover it from the file.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace

from rescompress.errors import RescompressError, UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a model input: optional resize, center crop to ``size``, normalize.

    ``resize`` is the shorter-side size before the center crop (``None``: resize straight to ``size``).
    ``mean``/``std`` have one entry per channel. ``channels`` is 1 (grayscale) or 3 (RGB); grayscale
    sources are replicated to 3 channels when ``channels == 3``.
    """

    preset: str
    size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: int | None = None

    def __post_init__(self) -> None:
        # RescompressError here (the values may come from a file's metadata); with_overrides turns it into a
        # usage error for values given as options.
        if self.channels not in (1, 3):
            raise RescompressError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.size) != 2 or min(self.size) < 1:
            raise RescompressError(f"input size must be two positive integers, got {self.size}")
        for name, vals in (("mean", self.mean), ("std", self.std)):
            if len(vals) not in (1, self.channels):
                allowed = "1 value" if self.channels == 1 else f"1 or {self.channels} values"
                raise RescompressError(f"{name} needs {allowed} for {self.channels}-channel input, got {len(vals)}")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)):
            raise RescompressError(f"mean and std must be finite numbers, got mean {self.mean}, std {self.std}")
        if any(s <= 0 for s in self.std):
            raise RescompressError(f"std values must be positive, got {self.std}")

    def same_pixels(self, other: Preprocess) -> bool:
        """True when both turn an image into the same input (the preset name aside; a 1-value mean equals
        the same value per channel)."""
        return (self.size, self.channels, self.resize, self.mean_per_channel, self.std_per_channel) == \
            (other.size, other.channels, other.resize, other.mean_per_channel, other.std_per_channel)

    @property
    def mean_per_channel(self) -> tuple[float, ...]:
        return self.mean * self.channels if len(self.mean) == 1 else self.mean

    @property
    def std_per_channel(self) -> tuple[float, ...]:
        return self.std * self.channels if len(self.std) == 1 else self.std

    def input_shape(self, batch: int = 1) -> tuple[int, int, int, int]:
        return (batch, self.channels, self.size[0], self.size[1])

    def with_overrides(
        self,
        size: int | tuple[int, int] | None = None,
        channels: int | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ) -> Preprocess:
        """Return a copy with the given fields replaced (``None`` keeps the preset's value).

        Changing the channel count without giving mean/std adapts them: a 1-value mean is replicated,
        a 3-value mean is averaged to one.
        """
        changes: dict = {}
        if size is not None:
            hw = (size, size) if isinstance(size, int) else tuple(size)
            changes["size"] = hw
            # A preset's resize-then-crop ratio only makes sense at its own size.
            changes["resize"] = None if self.resize is None else round(self.resize * max(hw) / max(self.size))
        if channels is not None and channels != self.channels:
            changes["channels"] = channels
            if mean is None:
                changes["mean"] = _adapt(self.mean, channels)
            if std is None:
                changes["std"] = _adapt(self.std, channels)
        if mean is not None:
            changes["mean"] = tuple(mean)
        if std is not None:
            changes["std"] = tuple(std)
        try:
            return replace(self, **changes) if changes else self
        except RescompressError as exc:  # values given as --input-size/--channels/--mean/--std
            raise UsageError(f"--{exc}" if str(exc).startswith(("mean", "std")) else str(exc)) from None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"] = list(self.size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        return cls(
            preset=str(d["preset"]),
            size=tuple(int(v) for v in d["size"]),
            channels=int(d["channels"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            resize=None if d.get("resize") is None else int(d["resize"]),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _adapt(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    if len(values) == 1:
        return values * channels if channels > 1 else values
    if channels == 1:
        return (sum(values) / len(values),)
    return values


PRESETS: dict[str, Preprocess] = {
    "imagenet": Preprocess("imagenet", (224, 224), 3, IMAGENET_MEAN, IMAGENET_STD, resize=256),
    "cifar": Preprocess("cifar", (32, 32), 3, CIFAR_MEAN, CIFAR_STD),
    "fashion-mnist": Preprocess("fashion-mnist", (28, 28), 1, FASHION_MNIST_MEAN, FASHION_MNIST_STD),
}


def get_preset(name: str) -> Preprocess:
    try:
        return PRESETS[name]
    except KeyError:
        raise UsageError(
            f"unknown preprocessing preset {name!r}; choose one of: {', '.join(PRESETS)}"
        ) from None
