"""MSE calibration: the amax minimizing expected squared quantization + clipping error."""

from __future__ import annotations

from rescompress.calibration.amax import INT8_LEVELS, mse_amax
from rescompress.calibration.histogram import HistogramCalibrator, StreamingHistogram


class MseCalibrator(HistogramCalibrator):
    method = "mse"

    def __init__(self, levels: int = INT8_LEVELS, histogram: StreamingHistogram | None = None) -> None:
        super().__init__(histogram)
        self.levels = levels

    def compute_amax(self) -> float:
        h = self.histogram
        return min(mse_amax(h.counts, h.range, self.levels, zeros=h.zeros), h.amax)
