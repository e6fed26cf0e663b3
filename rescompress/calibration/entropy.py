"""Entropy calibration (TensorRT's algorithm): the threshold minimizing KL divergence to the clipped data."""

from __future__ import annotations

import numpy as np

from rescompress.calibration.amax import INT8_LEVELS, entropy_amax
from rescompress.calibration.histogram import StreamingHistogram


class EntropyCalibrator:
    method = "entropy"

    def __init__(self, levels: int = INT8_LEVELS, histogram: StreamingHistogram | None = None) -> None:
        self.levels = levels
        self.histogram = histogram if histogram is not None else StreamingHistogram()

    def reset(self) -> None:
        self.histogram.reset()

    def collect(self, x: np.ndarray) -> None:
        self.histogram.collect(x)

    def compute_amax(self) -> float:
        h = self.histogram
        return min(entropy_amax(h.counts, h.range, self.levels, zeros=h.zeros), h.amax)
