"""MSE calibration: the amax minimizing expected squared quantization + clipping error."""

from __future__ import annotations

import numpy as np

from rescompress.calibration.amax import INT8_LEVELS, mse_amax
from rescompress.calibration.histogram import StreamingHistogram


class MseCalibrator:
    method = "mse"

    def __init__(self, levels: int = INT8_LEVELS, histogram: StreamingHistogram | None = None) -> None:
        self.levels = levels
        self.histogram = histogram if histogram is not None else StreamingHistogram()

    def reset(self) -> None:
        self.histogram.reset()

    def collect(self, x: np.ndarray) -> None:
        self.histogram.collect(x)

    def compute_amax(self) -> float:
        h = self.histogram
        return min(mse_amax(h.counts, h.range, self.levels, zeros=h.zeros), h.amax)
