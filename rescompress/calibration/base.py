"""The one calibrator protocol: ``collect(x)`` per batch, ``reset()``, ``compute_amax()`` at the end.

Histogram calibrators (percentile, entropy, mse) can also be built on an already collected
:class:`StreamingHistogram` (``from_histogram``), so one pass over the data serves every method.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from rescompress.errors import UsageError

METHODS: tuple[str, ...] = ("max", "percentile", "entropy", "mse")
DEFAULT_PERCENTILE = 99.99


@runtime_checkable
class Calibrator(Protocol):
    method: str

    def collect(self, x: np.ndarray) -> None: ...

    def reset(self) -> None: ...

    def compute_amax(self) -> float: ...


def make_calibrator(method: str, *, levels: int = 127, percentile: float = DEFAULT_PERCENTILE, histogram=None):
    """A calibrator by method name; ``histogram`` (a collected StreamingHistogram) is shared, not copied."""
    from rescompress.calibration.entropy import EntropyCalibrator
    from rescompress.calibration.max_calib import MaxCalibrator
    from rescompress.calibration.mse import MseCalibrator
    from rescompress.calibration.percentile import PercentileCalibrator

    if method == "max":
        return MaxCalibrator(histogram=histogram)
    if method == "percentile":
        return PercentileCalibrator(percentile, histogram=histogram)
    if method == "entropy":
        return EntropyCalibrator(levels, histogram=histogram)
    if method == "mse":
        return MseCalibrator(levels, histogram=histogram)
    raise UsageError(f"unknown calibration method {method!r}; choose one of: {', '.join(METHODS)}")
