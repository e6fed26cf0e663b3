"""Percentile calibration: amax at the given percentile of |x| (default 99.99), from a streaming histogram."""

from __future__ import annotations

import numpy as np

from rescompress.calibration.amax import percentile_amax
from rescompress.calibration.histogram import StreamingHistogram


class PercentileCalibrator:
    method = "percentile"

    def __init__(self, percentile: float = 99.99, histogram: StreamingHistogram | None = None) -> None:
        self.percentile = percentile
        self.histogram = histogram if histogram is not None else StreamingHistogram()

    def reset(self) -> None:
        self.histogram.reset()

    def collect(self, x: np.ndarray) -> None:
        self.histogram.collect(x)

    def compute_amax(self) -> float:
        h = self.histogram
        return min(percentile_amax(h.counts, h.range, self.percentile), h.amax)
