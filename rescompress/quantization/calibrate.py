"""From collected histograms and FP32 weights to a :class:`QuantPlan`, for one calibration method.

Activation ranges come from the histograms (one pass over the data serves every method: ``auto`` only
recomputes amax); weight ranges are per-channel max of the FP32 initializers. Non-negative tensors also
get an unsigned amax (255 levels on ``[0, amax]``) for the ONNX Runtime target.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from rescompress.calibration import (
    INT8_LEVELS,
    UINT8_LEVELS,
    StreamingHistogram,
    make_calibrator,
    per_channel_max,
)
from rescompress.errors import RescompressError
from rescompress.quantization.placement import QuantizedWeight
from rescompress.quantization.plan import ActivationEntry, WeightEntry, activation_entry


def activation_amax(h: StreamingHistogram, method: str, levels: int, percentile: float) -> float:
    return float(make_calibrator(method, levels=levels, percentile=percentile, histogram=h).compute_amax())


def activation_entries(
    histograms: dict[str, StreamingHistogram], method: str, percentile: float, ort_range: str = "asymmetric"
) -> dict[str, ActivationEntry]:
    """One entry per tensor with ``method``'s ranges (symmetric, and unsigned where the tensor is >= 0)."""
    out = {}
    done: dict[int, tuple[float, float | None]] = {}  # tensors sharing one histogram share its ranges
    for name, h in histograms.items():
        if id(h) not in done:
            amax = activation_amax(h, method, INT8_LEVELS, percentile)
            amax_u = None
            if h.nonnegative:
                amax_u = amax if method in ("max", "percentile") else activation_amax(
                    h, method, UINT8_LEVELS, percentile)
            done[id(h)] = (amax, amax_u)
        amax, amax_u = done[id(h)]
        out[name] = activation_entry(name, method, h.min, h.max, amax, amax_u, ort_range=ort_range)
    return out


def check_finite_weights(model: onnx.ModelProto) -> None:
    for init in model.graph.initializer:
        if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16):
            arr = numpy_helper.to_array(init)
            if not np.isfinite(arr).all():
                raise RescompressError(f"weight {init.name!r} contains NaN or Inf; the model cannot be quantized")


def weight_entries(model: onnx.ModelProto, weights: Iterable[QuantizedWeight]) -> dict[str, WeightEntry]:
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for w in weights:
        if w.initializer in out:
            continue
        arr = numpy_helper.to_array(inits[w.initializer])
        out[w.initializer] = WeightEntry(w.initializer, w.axis, tuple(float(v) for v in per_channel_max(arr, w.axis)))
    return out
