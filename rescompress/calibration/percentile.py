"""Percentile calibration: amax at the given percentile of |x| (default 99.99), from a streaming histogram."""

from __future__ import annotations

from rescompress.calibration.amax import percentile_amax
from rescompress.calibration.histogram import HistogramCalibrator, StreamingHistogram


class PercentileCalibrator(HistogramCalibrator):
    method = "percentile"

    def __init__(self, percentile: float = 99.99, histogram: StreamingHistogram | None = None) -> None:
        super().__init__(histogram)
        self.percentile = percentile

    def compute_amax(self) -> float:
        h = self.histogram
        return min(percentile_amax(h.counts, h.range, self.percentile), h.amax)
