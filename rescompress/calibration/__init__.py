"""Calibration: streaming statistics of activations and the math that turns them into int8 ranges.

One protocol (:class:`Calibrator`: ``collect``/``reset``/``compute_amax``), one calibrator per file
(max, percentile, entropy, mse), the pure amax functions in :mod:`~rescompress.calibration.amax`, and
:mod:`~rescompress.calibration.collect` that streams an ONNX model over data into histograms.
"""

from rescompress.calibration.amax import (
    INT8_LEVELS,
    UINT8_LEVELS,
    entropy_amax,
    max_amax,
    mse_amax,
    per_channel_max,
    percentile_amax,
)
from rescompress.calibration.base import DEFAULT_PERCENTILE, METHODS, Calibrator, make_calibrator
from rescompress.calibration.histogram import StreamingHistogram

__all__ = [
    "DEFAULT_PERCENTILE", "INT8_LEVELS", "METHODS", "UINT8_LEVELS", "Calibrator", "StreamingHistogram",
    "entropy_amax", "make_calibrator", "max_amax", "mse_amax", "per_channel_max", "percentile_amax",
]
