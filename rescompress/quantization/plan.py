"""``QuantPlan``: the one calibration result every artifact is emitted from, saved as JSON.

Per activation tensor: its observed min/max, the method and the clipping amax (symmetric, and unsigned
for non-negative tensors), and the quantization parameters each target uses. Symmetric int8 with scale s
is the same grid as uint8 with zero point 128 and scale s (DESIGN decision 2), so the ONNX Runtime file
(u8 activations) and the TensorRT file (s8) share one calibration; for non-negative tensors the ORT file
uses uint8 with zero point 0 over ``[0, amax]`` (twice the resolution, and ORT then folds a preceding ReLU
into the quantize). Per weight: per-channel amax (symmetric int8, axis 0 of Conv/Gemm weights).
Provenance ties the plan to one model (fingerprint of the FP32 ONNX graph) so ``--plan`` can refuse a
plan made for another model.

An activation's per-target ``params`` (scale, zero point) are what every file and the TensorRT cache
are written from, and what ``--plan`` applies as they are. Its ``amax`` is the calibrated range they were
first derived from: where ``--method auto`` refined a tensor's scale on held-out images, its scale
differs from ``amax / levels``, and editing an activation's ``amax`` in a saved plan changes nothing (a
weight's per-channel ``amax`` is what its scales are computed from). A convolution output read only by
its ReLU is recorded with the ReLU output's range (min 0): it is never observed separately.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from rescompress import __version__
from rescompress.errors import RescompressError, UsageError
from rescompress.fileio import write_text_atomic

PLAN_FORMAT = "rescompress.quantplan/1"
TARGETS: tuple[str, ...] = ("onnxruntime", "tensorrt")
INT8_MAX = 127
UINT8_MAX = 255


@dataclass(frozen=True)
class QParams:
    """Per-tensor affine parameters: ``real = scale * (q - zero_point)``."""

    scale: float
    zero_point: int
    dtype: str  # "uint8" | "int8"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QParams:
        return cls(float(d["scale"]), int(d["zero_point"]), str(d["dtype"]))


# Below this a range is taken as all zeros: its scale would be a float32 subnormal that kernels may flush
# to zero (a division by zero), and values this small are zero for any following layer anyway.
MIN_AMAX = 1e-30


def _safe_scale(amax: float, levels: int) -> float:
    # A tensor that is all zeros still needs a positive scale (ONNX requires scale > 0).
    return float(amax) / levels if amax > MIN_AMAX and math.isfinite(amax) else 1.0


def symmetric_int8(amax: float) -> QParams:
    return QParams(_safe_scale(amax, INT8_MAX), 0, "int8")


def symmetric_uint8(amax: float) -> QParams:
    """The s8 grid expressed in uint8 (zero point 128), as ORT's u8 kernels want it."""
    return QParams(_safe_scale(amax, INT8_MAX), 128, "uint8")


def unsigned_uint8(amax: float) -> QParams:
    return QParams(_safe_scale(amax, UINT8_MAX), 0, "uint8")


@dataclass(frozen=True)
class ActivationEntry:
    name: str
    method: str
    min: float
    max: float
    amax: float  # symmetric clipping range (127 levels per side)
    amax_unsigned: float | None  # clipping range for [0, amax] over 255 levels; None if the tensor goes < 0
    params: dict[str, QParams]  # target -> parameters

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "params"}
        d["params"] = {t: p.to_dict() for t, p in self.params.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ActivationEntry:
        return cls(
            name=str(d["name"]), method=str(d["method"]), min=float(d["min"]), max=float(d["max"]),
            amax=float(d["amax"]),
            amax_unsigned=None if d.get("amax_unsigned") is None else float(d["amax_unsigned"]),
            params={t: QParams.from_dict(p) for t, p in d["params"].items()},
        )


def asymmetric_uint8(vmin: float, vmax: float, amax: float) -> QParams:
    """uint8 over the observed ``[min, max]`` clipped to ``[-amax, amax]``: the same clipping as the
    symmetric grid, but no code is spent on a side the tensor never reaches (e.g. a normalized image
    in [-0.8, 2.0] gets a 30% finer step)."""
    lo, hi = max(min(vmin, 0.0), -amax), min(max(vmax, 0.0), amax)
    if not hi - lo > MIN_AMAX or not math.isfinite(hi - lo):
        return QParams(1.0, 128, "uint8")
    scale = (hi - lo) / UINT8_MAX
    return QParams(float(scale), int(np.clip(round(-lo / scale), 0, UINT8_MAX)), "uint8")


ORT_RANGES: tuple[str, ...] = ("asymmetric", "unsigned", "symmetric")


def activation_entry(
    name: str, method: str, vmin: float, vmax: float, amax: float, amax_unsigned: float | None,
    ort_range: str = "asymmetric",
) -> ActivationEntry:
    """Build the entry and derive each target's parameters from the calibrated ranges.

    ``ort_range`` picks the ONNX Runtime grid: ``symmetric`` (zero point 128, exactly TensorRT's grid),
    ``unsigned`` (non-negative tensors use [0, amax] over 255 levels, others symmetric) or
    ``asymmetric`` (unsigned where non-negative, else the observed range clipped at amax).
    """
    if ort_range not in ORT_RANGES:
        raise UsageError(f"unknown ORT range mode {ort_range!r}; choose {', '.join(ORT_RANGES)}")
    if ort_range != "symmetric" and amax_unsigned is not None and vmin >= 0.0:
        ort = unsigned_uint8(amax_unsigned)
    elif ort_range == "asymmetric":
        ort = asymmetric_uint8(vmin, vmax, amax)
    else:
        ort = symmetric_uint8(amax)
    return ActivationEntry(
        name, method, float(vmin), float(vmax), float(amax),
        None if amax_unsigned is None else float(amax_unsigned),
        {"onnxruntime": ort, "tensorrt": symmetric_int8(amax)},
    )


@dataclass(frozen=True)
class WeightEntry:
    name: str
    axis: int
    amax: tuple[float, ...]  # per output channel

    @property
    def scales(self) -> np.ndarray:
        a = np.asarray(self.amax, dtype=np.float64)
        return np.where(a > MIN_AMAX, a / INT8_MAX, 1.0 / INT8_MAX).astype(np.float32)  # never a subnormal

    def to_dict(self) -> dict:
        return {"name": self.name, "axis": self.axis, "amax": list(self.amax)}

    @classmethod
    def from_dict(cls, d: dict) -> WeightEntry:
        return cls(str(d["name"]), int(d["axis"]), tuple(float(v) for v in d["amax"]))


@dataclass(frozen=True)
class Provenance:
    model_fingerprint: str
    data_fingerprint: str | None
    num_images: int
    method: str
    percentile: float | None
    library_versions: dict[str, str | None]
    tool_version: str = __version__
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    # The input pipeline the ranges were measured through (Preprocess.to_dict()), and the --exclude patterns
    # of that run: a reused plan needs both (None / () in plans written before they were recorded).
    preprocess: dict | None = None
    exclude: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Provenance:
        return cls(
            model_fingerprint=str(d["model_fingerprint"]), data_fingerprint=d.get("data_fingerprint"),
            num_images=int(d["num_images"]), method=str(d["method"]),
            percentile=None if d.get("percentile") is None else float(d["percentile"]),
            library_versions=dict(d.get("library_versions", {})),
            tool_version=str(d.get("tool_version", "")), created=str(d.get("created", "")),
            preprocess=d.get("preprocess"), exclude=tuple(d.get("exclude") or ()),
        )


@dataclass(frozen=True)
class QuantPlan:
    activations: dict[str, ActivationEntry]
    weights: dict[str, WeightEntry]
    provenance: Provenance
    # Hessian weight rounding: {"method", "file" (beside the plan: int8 levels per weight), "sha256", "images"}
    rounding: dict | None = None
    # Channel equalization applied before calibration (equalize.py): {"alpha", "images", "scales": {group's
    # first tensor: [factor per channel]}, "fp32_cache_scales": {tensor: scale in the FP32 file}}
    equalization: dict | None = None

    def activation(self, name: str) -> ActivationEntry:
        try:
            return self.activations[name]
        except KeyError:
            raise RescompressError(
                f"the quantization plan has no range for tensor {name!r}; recalibrate (drop --plan)"
            ) from None

    def weight(self, name: str) -> WeightEntry:
        try:
            return self.weights[name]
        except KeyError:
            raise RescompressError(
                f"the quantization plan has no scales for weight {name!r}; recalibrate (drop --plan)"
            ) from None

    def with_method(self, entries: dict[str, ActivationEntry], method: str) -> QuantPlan:
        return replace(self, activations=entries, provenance=replace(self.provenance, method=method))

    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "provenance": self.provenance.to_dict(),
            "activations": {k: v.to_dict() for k, v in sorted(self.activations.items())},
            "weights": {k: v.to_dict() for k, v in sorted(self.weights.items())},
            **({"rounding": self.rounding} if self.rounding else {}),
            **({"equalization": self.equalization} if self.equalization else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> QuantPlan:
        if d.get("format") != PLAN_FORMAT:
            raise RescompressError(f"not a rescompress quantization plan (format {d.get('format')!r})")
        return cls(
            activations={k: ActivationEntry.from_dict(v) for k, v in d["activations"].items()},
            weights={k: WeightEntry.from_dict(v) for k, v in d["weights"].items()},
            provenance=Provenance.from_dict(d["provenance"]),
            rounding=dict(d["rounding"]) if d.get("rounding") else None,
            equalization=dict(d["equalization"]) if d.get("equalization") else None,
        )

    def save(self, path: Path | str) -> Path:
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path | str) -> QuantPlan:
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RescompressError(f"cannot read quantization plan {path}: {exc}") from exc
        try:
            return cls.from_dict(d)
        except (KeyError, TypeError, ValueError) as exc:
            raise RescompressError(f"{path} is not a valid quantization plan: {exc!r}") from exc

    def check_model(self, fingerprint: str, preprocess: dict | None = None) -> None:
        """Refuse a plan measured through other preprocessing (other mean/std give other activation ranges:
        the scales would be silently wrong), or made for another graph. Preprocessing first: an exported
        graph carries its input size, so another --input-size changes the fingerprint too."""
        recorded = self.provenance.preprocess
        differ = []
        if preprocess is not None and recorded is not None:
            from rescompress.spec import Preprocess

            a, b = Preprocess.from_dict(recorded), Preprocess.from_dict(preprocess)
            if not a.same_pixels(b):  # the name alone, or a mean given once or per channel, changes no pixel
                differ = [k for k in ("size", "channels", "resize", "mean", "std")
                          if recorded.get(k) != preprocess.get(k)]
            if a.size != b.size:
                h, w = a.size
                raise RescompressError(
                    f"the quantization plan was calibrated at {h}x{w} input, this run uses "
                    f"{b.size[0]}x{b.size[1]}; pass --input-size {h if h == w else f'{h}x{w}'} (or recalibrate)"
                )
        if differ:
            shown = ", ".join(f"{k} {recorded.get(k)} vs {preprocess.get(k)}" for k in differ[:3])
            raise RescompressError(
                f"the quantization plan was calibrated with other preprocessing ({shown}); use the plan's "
                "(drop or match the --preset/--mean/--std/--channels options) or recalibrate without --plan"
            )
        if fingerprint != self.provenance.model_fingerprint:
            raise RescompressError(
                "the quantization plan was made for another model (fingerprint "
                f"{self.provenance.model_fingerprint[:12]} != {fingerprint[:12]}); recalibrate without --plan"
            )


def model_fingerprint(model) -> str:
    """SHA-256 of the FP32 graph (nodes and weights), independent of file metadata."""
    return hashlib.sha256(model.graph.SerializeToString(deterministic=True)).hexdigest()
