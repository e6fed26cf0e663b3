"""Max calibration: amax is the largest |x| seen (exact, no histogram needed)."""

from __future__ import annotations

import math

import numpy as np

from rescompress.calibration.amax import max_amax
from rescompress.errors import RescompressError


class MaxCalibrator:
    method = "max"

    def __init__(self, histogram=None) -> None:
        # A shared histogram already tracks the exact max; reuse it instead of collecting again.
        self._histogram = histogram
        self._amax = 0.0

    def reset(self) -> None:
        self._amax = 0.0
        if self._histogram is not None:
            self._histogram.reset()

    def collect(self, x: np.ndarray) -> None:
        amax = max_amax(np.asarray(x))
        if not math.isfinite(amax):  # max(0.0, nan) is 0.0: a NaN would vanish silently
            raise RescompressError("activation values contain NaN or Inf; check the model weights and inputs")
        self._amax = max(self._amax, amax)

    def compute_amax(self) -> float:
        if self._histogram is not None:
            return max(self._amax, self._histogram.amax)
        return self._amax
