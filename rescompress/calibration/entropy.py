"""Entropy calibration (TensorRT's KL criterion, on a grid of thresholds: see ``entropy_amax``): the
threshold minimizing KL divergence to the clipped data."""

from __future__ import annotations

from rescompress.calibration.amax import INT8_LEVELS, entropy_amax
from rescompress.calibration.histogram import HistogramCalibrator, StreamingHistogram


class EntropyCalibrator(HistogramCalibrator):
    method = "entropy"

    def __init__(self, levels: int = INT8_LEVELS, histogram: StreamingHistogram | None = None) -> None:
        super().__init__(histogram)
        self.levels = levels

    def compute_amax(self) -> float:
        h = self.histogram
        return min(entropy_amax(h.counts, h.range, self.levels, zeros=h.zeros), h.amax)
